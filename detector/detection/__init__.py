"""Object detection (paper section 4): `SPPDetector` and `detect()`, the SVMs and box
regressors (`WindowPredictor`), matching windows to ground truth, the test-time procedure,
detection over a dataset split; `detection.train` holds the training stages.

Imports nothing heavy: `tools/train.py` reads the stage list through this package without
torch."""
