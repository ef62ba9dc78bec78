"""A full disk (ENOSPC), an exceeded quota (EDQUOT) or a read-only file system (EROFS) while
writing a cache, run folder or output stops the tool with one `error:` line naming the folder,
leaves no partial file, and a rerun with space resumes.  The errors are injected where every
write goes through: the fsync of detector.cache.atomic_write_bytes."""
import errno
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
SMOKE = str(ROOT / "configs" / "smoke.yaml")


def fail_writes(monkeypatch, code=errno.ENOSPC, after=0):
    """Every write after the first `after` fails with `code`."""
    import detector.cache as cache

    real, calls = cache.os.fsync, []

    def fsync(fd):
        calls.append(fd)
        if len(calls) > after:
            raise OSError(code, "injected")
        return real(fd)

    monkeypatch.setattr(cache.os, "fsync", fsync)
    return calls


@pytest.mark.parametrize("code,words", [(errno.ENOSPC, "no space left on device"),
                                        (errno.EDQUOT, "disk quota exceeded"),
                                        (errno.EROFS, "read-only file system")])
def test_a_failed_write_names_the_folder_and_size_and_leaves_nothing_behind(tmp_path, monkeypatch, code, words):
    from detector.cache import atomic_write_bytes
    from detector.errors import DiskError

    target = tmp_path / "cache" / "entry.npz"
    atomic_write_bytes(target, b"old content")
    fail_writes(monkeypatch, code)
    with pytest.raises(DiskError) as e:
        atomic_write_bytes(target, b"x" * 2_500_000)
    msg = str(e.value)
    assert msg.startswith(f"{tmp_path / 'cache'}: {words} writing entry.npz (2.5 MB needed;") and "free" in msg
    assert not isinstance(e.value, OSError)  # per-image loops that skip unreadable images must not catch it
    assert target.read_bytes() == b"old content"  # the old file stands, no temporary file is left
    assert sorted(p.name for p in target.parent.iterdir()) == ["entry.npz"]


def test_other_os_errors_pass_through_unchanged(tmp_path, monkeypatch):
    from detector.cache import atomic_write_bytes

    fail_writes(monkeypatch, errno.EIO)
    with pytest.raises(OSError) as e:
        atomic_write_bytes(tmp_path / "a.bin", b"1")
    assert e.value.errno == errno.EIO


def test_full_disk_stops_feature_extraction_at_once_and_a_rerun_resumes(tmp_path, monkeypatch, capsys):
    from detector.datasets.synthetic import make_synthetic
    from tools import extract_features

    data = make_synthetic(tmp_path / "data", num_train=4, num_test=0, image_size=(96, 80), seed=1)
    argv = ["--dataset", str(data), "--split", "trainval", "--cache", str(tmp_path / "feat"), "--config", SMOKE]
    calls = fail_writes(monkeypatch, after=2)  # params.json and one image's maps fit, then the disk is full
    from detector.cli import run_tool

    assert run_tool(extract_features.main, argv) == 2
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len([ln for ln in lines if ln.startswith("error:")]) == 1
    error = next(ln for ln in lines if ln.startswith("error:"))
    assert "no space left on device" in error and str(tmp_path / "feat") in error
    assert "unreadable" not in err and "skipped" not in err  # not mistaken for bad images
    assert len(calls) == 3  # it stopped at the first failure: no other image was tried
    assert not list((tmp_path / "feat").rglob("*.tmp"))
    monkeypatch.undo()
    assert extract_features.main(argv) == 0
    assert "3 computed, 1 already cached, 0 skipped" in capsys.readouterr().out


def test_full_disk_in_a_proposal_search_is_not_a_bad_image(tmp_path, monkeypatch):
    from detector.config import load_config
    from detector.datasets.synthetic import make_synthetic
    from detector.errors import DiskError
    from detector.proposals import compute_proposals

    data = make_synthetic(tmp_path / "data", num_train=2, num_test=0, image_size=(96, 80), seed=2)
    paths = sorted((data / "JPEGImages").glob("*.jpg"))
    cfg = load_config(SMOKE).proposals
    fail_writes(monkeypatch, after=1)  # params.json only
    with pytest.raises(DiskError, match="no space left on device"):
        compute_proposals(paths, tmp_path / "props", cfg, workers=1, progress=False)


def test_full_disk_during_training_is_one_error_line_not_unreadable_images(tmp_path, monkeypatch, capsys):
    from detector.cli import run_tool
    from detector.datasets.synthetic import make_synthetic
    from tools import train

    data = make_synthetic(tmp_path / "data", num_train=4, num_test=0, image_size=(96, 80), seed=4)
    argv = ["--dataset", str(data), "--out", str(tmp_path / "run"), "--cache", str(tmp_path / "cache"),
            "--config", SMOKE, "--set", "proposals.workers=1", "--quiet", "--stop-after", "features"]
    assert run_tool(train.main, argv) == 0  # proposals and maps cached
    shutil.rmtree(tmp_path / "cache" / "features")
    fail_writes(monkeypatch, after=1)
    capsys.readouterr()
    assert run_tool(train.main, argv) == 2
    err = capsys.readouterr().err
    assert [ln for ln in err.splitlines() if ln.startswith("error:")] == [ln for ln in err.splitlines()
                                                                         if "error" in ln.lower()]
    assert err.count("error:") == 1 and "no space left on device" in err and "unreadable" not in err
    assert str(tmp_path / "cache" / "features") in err
    monkeypatch.undo()
    assert run_tool(train.main, argv) == 0
    assert np.load(next((tmp_path / "cache" / "features").rglob("*_s160.npz")))["features"].ndim == 3
