"""Fixtures shared by several test files: one smoke training on generated data per session."""
import shutil
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


def smoke_training(tmp: Path, overrides: tuple = ()) -> tuple:
    """configs/smoke.yaml with `overrides`, trained in `tmp` on 16 synthetic images (the smoke
    runs' data, made with the same seed): (tmp, dataset, model path)."""
    from detector.config import load_config
    from detector.datasets.synthetic import make_synthetic
    from detector.detection.train.pipeline import train

    data = make_synthetic(tmp / "data", num_train=16, num_test=6, image_size=(160, 120), seed=3)
    cfg = load_config(ROOT / "configs" / "smoke.yaml", list(overrides))
    model_path = train(str(data), str(tmp / "run"), cfg, cache_root=str(tmp / "cache"), progress=False)
    return tmp, data, model_path


@pytest.fixture(scope="session")
def smoke_run(tmp_path_factory):
    """(folder, dataset, model path) of configs/smoke.yaml trained on 16 synthetic images.
    test_smoke.py retrains into this run with other settings; `pristine_model` is a copy
    taken right after the first training, for tests that need it unchanged."""
    tmp, data, model_path = smoke_training(tmp_path_factory.mktemp("smoke"))
    shutil.copy(model_path, tmp / "pristine.safetensors")
    return tmp, data, model_path


@pytest.fixture(scope="session")
def pristine_model(smoke_run):
    return smoke_run[0] / "pristine.safetensors"


@pytest.fixture(scope="session")
def rpn_run(tmp_path_factory):
    """(folder, dataset, model path) of configs/smoke.yaml with learned proposals
    (proposals.method: rpn, a 30-iteration head) on the smoke run's kind of data."""
    return smoke_training(tmp_path_factory.mktemp("rpn"), ["proposals.method=rpn", "rpn.iterations=30",
                                                          "rpn.checkpoint_every=10"])


@pytest.fixture(scope="session")
def box_run(tmp_path_factory):
    """(folder, dataset, model path) of configs/smoke.yaml with Fast R-CNN's box layer
    (bbox.method: finetune) on the smoke run's kind of data."""
    return smoke_training(tmp_path_factory.mktemp("box"), ["bbox.method=finetune"])
