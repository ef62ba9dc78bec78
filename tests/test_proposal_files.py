"""Published proposals in every tool: export, train and test from a file give what the cache gives."""
import hashlib
from pathlib import Path

import numpy as np
import pytest

SMOKE = str(Path(__file__).resolve().parents[1] / "configs" / "smoke.yaml")


def _sha(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def exported(smoke_run, tmp_path_factory):
    from tools import compute_proposals

    tmp, data, _ = smoke_run
    out = tmp_path_factory.mktemp("files")
    for split in ("trainval", "test"):
        assert compute_proposals.main(["--dataset", str(data), "--split", split, "--cache", str(tmp / "cache" / "proposals"),
                                       "--config", SMOKE, "--no-progress",
                                       "--export", str(out / f"{split}.npz")]) == 0
    return out


def test_training_from_an_exported_file_gives_the_same_model_bytes(smoke_run, pristine_model, exported, tmp_path):
    from detector.config import load_config
    from detector.detection.train.pipeline import train

    tmp, data, _ = smoke_run
    path = train(str(data), str(tmp_path / "run"), load_config(SMOKE), cache_root=str(tmp / "cache"), progress=False,
                 proposals_file=str(exported / "trainval.npz"))
    assert _sha(path) == _sha(pristine_model)


def test_test_voc_and_detect_take_a_proposals_file(smoke_run, exported, tmp_path, capsys):
    from detector.cli import detect_main
    from tools import test_voc

    tmp, data, model_path = smoke_run
    maps = []
    for extra in ([], ["--proposals", str(exported / "test.npz")]):
        assert test_voc.main(["--model", str(model_path), "--dataset", str(data), "--split", "test", "--cache",
                              str(tmp / "cache"), "--out", str(tmp_path / "e"), "--quiet", *extra]) == 0
        maps.append(capsys.readouterr().out.strip().splitlines()[-1])
    assert maps[0] == maps[1] and maps[0].startswith("mAP = ")
    from detector.proposals import load_proposals

    image = sorted((data / "JPEGImages").glob("*.jpg"))[-1]  # a test image (ids sorted: trainval first)
    boxes = load_proposals(exported / "test.npz")[image.stem][:5]
    np.savez(tmp_path / "mine.npz", format=np.array("spp-proposals/1"), image_ids=np.array([image.stem]),
             offsets=np.array([0, len(boxes)]), boxes=boxes)
    import detector

    n = len(detector.load(model_path).detect(image, proposals=boxes)["scores"])
    assert detect_main([str(image), "--model", str(model_path), "--out", str(tmp_path / "d"), "--thresh=-100",
                        "--proposals", str(tmp_path / "mine.npz")]) == 0
    assert f"{image}: {n} detections" in capsys.readouterr().out


def test_a_file_without_some_images_names_the_first_missing_ids(smoke_run, exported, tmp_path, capsys):
    from detector.cli import run_tool
    from detector.proposals import load_proposals, write_proposals_npz
    from tools import train

    tmp, data, _ = smoke_run
    props = load_proposals(exported / "trainval.npz")
    dropped = sorted(props)[:2]
    write_proposals_npz(tmp_path / "partial.npz", {k: v for k, v in props.items() if k not in dropped})
    rc = run_tool(train.main, ["--dataset", str(data), "--out", str(tmp_path / "r"), "--cache", str(tmp / "cache"),
                               "--config", SMOKE, "--proposals", str(tmp_path / "partial.npz")])
    err = capsys.readouterr().err
    assert rc == 2 and err.count("error:") == 1 and f"first: {dropped[0]!r}, {dropped[1]!r}" in err
