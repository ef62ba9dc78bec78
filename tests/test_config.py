"""Typed config: YAML files and key=value overrides, unknown keys rejected."""
import pytest

from detector.config import Config, ConfigError, config_from_dict, load_config


def test_defaults_and_overrides_are_typed(tmp_path):
    cfg = load_config(None, ["features.scales=[480, 688]", "svm.C=0.01", "backbone.random_init=true",
                             "classes=[a, b]"])
    assert cfg.features.scales == [480, 688] and cfg.svm.C == 0.01 and cfg.backbone.random_init is True
    assert cfg.classes == ["a", "b"]
    assert cfg.svm.pos_weight == Config().svm.pos_weight


@pytest.mark.parametrize("item,msg", [
    ("features.scale=[1]", "unknown config key 'features.scale'"),
    ("nope=1", "unknown config key 'nope'"),
    ("svm.C=abc", "expected a number"),
    ("finetune.iterations=1.5", "expected an integer"),
    ("bbox.enabled=1", "true/false"),
    ("svm", "key=value"),
    ("features.scales=[]", "non-empty"),
])
def test_bad_overrides_are_rejected(item, msg):
    with pytest.raises(ConfigError, match=msg):
        load_config(None, [item])


def test_yaml_file_then_overrides_and_roundtrip(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("features:\n  scales: [480]\nsvm:\n  C: 0.5\n")
    cfg = load_config(p, ["svm.C=0.25"])
    assert cfg.features.scales == [480] and cfg.svm.C == 0.25
    assert config_from_dict(cfg.to_dict()) == cfg
    (tmp_path / "bad.yaml").write_text("svm:\n  Cc: 1\n")
    with pytest.raises(ConfigError, match="bad.yaml.*svm.Cc"):
        load_config(tmp_path / "bad.yaml")


def test_shipped_configs_load():
    from pathlib import Path

    files = sorted((Path(__file__).resolve().parents[1] / "configs").glob("*.yaml"))
    assert files, "configs/ should ship YAML files"
    for f in files:
        load_config(f)


def test_test_time_overrides_only_touch_the_test_section():
    from detector.config import apply_test_overrides

    cfg = Config()
    apply_test_overrides(cfg, ["test.max_per_image=50", "test.nms_iou=0.4"])
    assert cfg.test.max_per_image == 50 and cfg.test.nms_iou == 0.4
    with pytest.raises(ConfigError, match="only test"):
        apply_test_overrides(cfg, ["features.scales=[480]"])
    assert cfg.features.scales == Config().features.scales
    with pytest.raises(ConfigError, match="nms_iou must be in"):
        apply_test_overrides(cfg, ["test.nms_iou=0"])


def test_tools_print_input_errors_without_traceback(capsys):
    from detector.cli import run_tool

    def bad_config(argv):
        return load_config(None, ["nope=1"]) and 0

    assert run_tool(bad_config) == 2
    assert "error: unknown config key 'nope'" in capsys.readouterr().err

    def bug(argv):  # not an input error: must still raise, with its traceback
        raise KeyError("x")

    with pytest.raises(KeyError):
        run_tool(bug)
