"""The classification tools' own defaults (tools/train_classifier.py, tools/test_classifier.py).

Detection and classification share one Config; its dataclass defaults are detection's
measured choices.  Classification starts from these instead (configs/classification.yaml
holds the same values, tests/test_config.py checks that they agree), and a --config file
and --set overrides go on top.  Why each value (BENCHMARKS.md, "Classification"):

- backbone.cut stride32: the stride-16 cut that suits detection's small windows gives 4x the
  top-1 error on flowers17 (0.121 against 0.029 for the centre view).
- classifier.input scales: the head trains on the views of the `multi` test scheme, taken
  at every test scale (paper section 3.1.3 trains at several sizes so that the network
  sees the scales it will be tested at); trained on 224 px crops only, views at 448 and
  560 px are ones it never saw, and multi-view testing lost to the centre view.
- classifier.test_views center: the default test scheme must beat the centre view on two
  image sets to be a multi-view one.  With that training, `multi` (6 scales x 18 views + 2
  full-image views, paper section 3.1.5 / Table 3) beats the centre view on flowers17
  (0.0147 against 0.0184 top-1 error) but not on DeepPCB defect crops (0.1167 against
  0.1000), and no other view set wins on both, so the best single view is the default and
  tools/test_classifier.py says so in one line (CENTER_NOTE); --views multi / breakdown
  still measure the others.
"""
from __future__ import annotations

from typing import Optional, Sequence

CLASSIFICATION_DEFAULTS = {
    "backbone.cut": "stride32",
    "classifier.input": "scales",
    "classifier.view_size": 224,
    "classifier.view_scale": 256,
    "classifier.full_scale": 256,
    "classifier.fc_dims": [1024, 1024],
    "classifier.dropout": 0.5,
    "classifier.epochs": 100,
    "classifier.lr": 0.01,
    "classifier.lr_steps": [70],
    "classifier.batch_size": 64,
    "classifier.trunk_trainable_blocks": 0,
    "classifier.test_scales": [224, 256, 300, 360, 448, 560],
    "classifier.test_views": "center",
    "classifier.average": "softmax",
}
SOURCE = "detector/classification/defaults.py (= configs/classification.yaml)"
CENTER_NOTE = ("the classification default is the centre view: no multi-view set beat it on both flowers17 "
               "and DeepPCB crops (BENCHMARKS.md, \"Classification\"); --views breakdown compares them on yours")


def load_classification_config(path: Optional[str], overrides: Sequence[str] = ()):
    """(config, one line saying what it was built from): the classification defaults, then
    the file (if any), then the overrides."""
    from detector.config import load_config

    cfg = load_config(path, list(overrides), base=CLASSIFICATION_DEFAULTS)
    line = (f"config: {path} over the classification defaults, {SOURCE}" if path
            else f"config: the classification defaults, {SOURCE} (no --config given)")
    if overrides:
        line += "; --set " + " ".join(overrides)
    return cfg, line
