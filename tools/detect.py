#!/usr/bin/env python
"""Detect objects in images with a trained model; print them and write PNGs with boxes.

  python tools/detect.py --model data/runs/demo/model.safetensors image1.jpg [image2.png ...] --out data/detections
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from detector.cli import detect_cli  # noqa: E402

if __name__ == "__main__":
    sys.exit(detect_cli())
