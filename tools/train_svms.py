#!/usr/bin/env python
"""Train the per-class SVMs (paper section 4.1) of a run: reuses the run's cached proposals, conv
features and fine-tuned fc layers (computing any that are missing) and stops after the SVMs
and box regressors.  `tools/train.py` then only writes the model file.

  python tools/train_svms.py --dataset data/synthetic --out data/runs/demo --set svm.C=0.01
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from detector.cli import run_tool  # noqa: E402
from tools.train import main as train_main  # noqa: E402


def main(argv=None) -> int:
    return train_main(list(sys.argv[1:] if argv is None else argv) + ["--stop-after", "bbox"])


if __name__ == "__main__":
    sys.exit(run_tool(main))
