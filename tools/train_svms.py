#!/usr/bin/env python
"""Train the per-class SVMs (SPEC §5) of a run: reuses the run's cached proposals, conv
features and fine-tuned fc layers (computing any that are missing) and stops after the SVMs
and box regressors.  `tools/train.py` then only writes the model file.

  python tools/train_svms.py --dataset data/synthetic --out data/runs/demo --set svm.C=0.01
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tools.train import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:] + ["--stop-after", "bbox"]))
