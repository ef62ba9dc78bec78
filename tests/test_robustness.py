"""Batch detection that survives bad images, per-class thresholds, drawn tags inside the image,
one-line warnings and messages that name the problem once."""
import shutil
import warnings

import pytest

from detector.errors import ConfigError


def test_batch_detection_skips_a_bad_image_and_keeps_outputs_apart(smoke_run, tmp_path, capsys):
    from detector.cli import detect_main, run_tool

    _, data, model_path = smoke_run
    jpgs = sorted((data / "JPEGImages").glob("*.jpg"))[:2]
    for sub, src in (("a", jpgs[0]), ("b", jpgs[1])):
        (tmp_path / sub).mkdir()
        shutil.copy(src, tmp_path / sub / "x.jpg")  # the same file name in two folders
    (tmp_path / "a" / "broken.jpg").write_bytes(b"not an image")
    inputs = [str(tmp_path / "a" / "x.jpg"), str(tmp_path / "a" / "broken.jpg"), str(tmp_path / "b" / "x.jpg")]
    rc = run_tool(detect_main, inputs + ["--model", str(model_path), "--out", str(tmp_path / "out")])
    out, err = capsys.readouterr()
    assert rc == 1
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "broken.jpg" in errors[0] and "skipped" in errors[0]
    assert err.strip().splitlines()[-1].startswith("1 of 3 images failed")
    assert sorted(p.relative_to(tmp_path / "out").as_posix() for p in (tmp_path / "out").rglob("*.png")) == \
        ["a/x.png", "b/x.png"]
    assert out.count("detections (score >=") == 2


def test_output_paths_mirror_the_inputs_below_their_common_folder(tmp_path):
    from detector.detection.batch import output_paths

    got = output_paths(["d/a/x.jpg", "d/b/x.jpg", "d/a/y.png"], tmp_path)
    assert got == [tmp_path / "a" / "x.png", tmp_path / "b" / "x.png", tmp_path / "a" / "y.png"]
    assert output_paths(["one/img.jpg"], tmp_path) == [tmp_path / "img.png"]


def test_per_class_thresholds_from_a_number_a_list_or_a_mapping():
    from detector.detection.postprocess import class_thresholds

    names = ["cat", "dog", "eel"]
    assert class_thresholds(0.5, names).tolist() == [0.5] * 3
    assert class_thresholds([0.1, 0.2, 0.3], names).tolist() == [0.1, 0.2, 0.3]
    from detector.config import TestConfig
    rest = TestConfig.score_thresh  # "*" defaults to the config's default threshold
    assert class_thresholds({"dog": 1.0}, names).tolist() == [rest, 1.0, rest]
    assert class_thresholds({"dog": 1.0, "*": 0.0}, names).tolist() == [0.0, 1.0, 0.0]
    with pytest.raises(ConfigError, match=r"unknown class\(es\) \['zebra'\]"):
        class_thresholds({"zebra": 1.0}, names)
    with pytest.raises(ConfigError, match="2 values for 3 classes"):
        class_thresholds([0.0, 1.0], names)


def test_a_threshold_mapping_reaches_detect_and_the_tools(smoke_run, tmp_path, capsys):
    import detector
    from detector.cli import detect_main, run_tool
    from detector.images import load_image

    _, data, model_path = smoke_run
    model = detector.load(model_path)
    image = sorted((data / "JPEGImages").glob("*.jpg"))[0]
    props = model.proposals(load_image(image))
    base = model.detect(image, proposals=props, score_thresh=-10.0)
    name = base["label_names"][0]
    only = model.detect(image, proposals=props, score_thresh={name: -10.0, "*": 1e9})
    assert len(only["scores"]) > 0 and set(only["label_names"]) == {name}
    rc = run_tool(detect_main, [str(image), "--model", str(model_path), "--out", str(tmp_path),
                                "--set", "test.score_thresh={zebra: 1}"])
    assert rc == 2 and "unknown class(es) ['zebra']" in capsys.readouterr().err
    with pytest.raises(ConfigError, match="test.score_thresh must be"):
        model.configure_test(["test.score_thresh=[a, b]"])


def test_tags_stay_inside_the_image():
    from detector.detection.visualize import tag_position

    assert tag_position(50, 40, 30, 11, 200, 100) == (50, 29)  # above the box when it fits
    assert tag_position(50, 5, 30, 11, 200, 100) == (50, 5)  # else inside its top edge
    assert tag_position(190, 5, 30, 11, 200, 100) == (170, 5)  # shifted left at the right edge
    assert tag_position(-3, 95, 30, 11, 200, 100) == (0, 84)  # and up at the bottom


def test_warnings_print_as_one_line_in_the_tools():
    from detector.cli import run_tool
    from detector.datasets.validate import DatasetWarning

    old = warnings.formatwarning
    try:
        assert run_tool(lambda argv: 0) == 0  # installs the tools' warning format
        fmt = warnings.formatwarning
        assert fmt("a.xml: box dropped", DatasetWarning, "/x/voc.py", 239, "rec = _load_one(...)") == \
            "warning (DatasetWarning): a.xml: box dropped\n"
        assert fmt("plain", UserWarning, "/x/y.py", 1) == "warning: plain\n"
    finally:
        warnings.formatwarning = old


def test_messages_name_the_problem_once(tmp_path, caplog):
    from detector.core.feature_cache import extract_all
    from detector.images import ImageError, load_image

    with pytest.raises(ImageError, match="is a folder, not an image file"):
        load_image(tmp_path)
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"")

    class NoCache:
        def complete(self, p, f):
            return False

        def get(self, p, f):
            load_image(p)

    with caplog.at_level("WARNING"):
        stats = extract_all([str(bad)], NoCache(), progress=False)
    assert stats["failed"][0][0] == str(bad) and str(bad) not in stats["failed"][0][1]
    assert caplog.text.count(str(bad)) == 1
