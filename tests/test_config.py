"""Typed config: YAML files and key=value overrides, unknown keys rejected."""
from pathlib import Path

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


CONFIGS = Path(__file__).resolve().parents[1] / "configs"
PAPER = {"backbone.name": "zf5", "finetune.fc_dims": [4096, 4096], "finetune.iterations": 90000,
         "finetune.lr": 0.001, "finetune.lr_steps": [30000, 60000], "finetune.batch_size": 128,
         "finetune.fg_fraction": 0.25, "svm.C": 0.001, "svm.pos_weight": 2.0, "svm.intercept_scaling": 10.0,
         "svm.neg_iou": 0.3, "svm.retrain_every": 2000, "bbox.lam": 4000.0, "bbox.iou_thresh": 0.5,
         "test.score_thresh": -1.5, "test.nms_iou": 0.3, "test.max_per_image": 100, "test.bbox_iterations": 1, "spp.levels": [1, 2, 3, 6],
         "bbox.reference": "proposal", "test.nms_after_regression": False, "test.box_voting_iou": 0.0}
# What each shipped config's comments and the README say it holds.
CLAIMS = {
    "default.yaml": {},  # "identical to detector/config.py's dataclasses": checked field by field below
    "zf5_paper.yaml": {**PAPER, "features.scales": [688], "features.scale_rule": "code"},
    "zf5_paper_5scales.yaml": {**PAPER, "features.scales": [480, 576, 688, 864, 1200],
                               "features.scale_rule": "paper"},
    "bccd.yaml": {"classes": ["Platelets", "RBC", "WBC"], "features.scales": [688], "finetune.iterations": 6000,
                  "finetune.lr_steps": [4000], "backbone.name": "efficientnet_lite0"},
    "bccd_rpn.yaml": {"classes": ["Platelets", "RBC", "WBC"], "features.scales": [688], "proposals.method": "rpn",
                      "backbone.name": "efficientnet_lite0"},
    "synthetic.yaml": {"features.scales": [320], "finetune.iterations": 800, "proposals.resize": 320},
    "smoke.yaml": {"features.scales": [160], "finetune.iterations": 30, "proposals.workers": 1},
    "classifier_smoke.yaml": {"classifier.input": "multisize", "classifier.view_size": 64,
                              "classifier.sizes": [64, 48], "classifier.epochs": 4},
    "flowers17.yaml": {"backbone.cut": "stride32", "classifier.input": "crop224", "classifier.view_size": 224, "classifier.view_scale": 256,
                       "classifier.sizes": [224, 180], "classifier.size_schedule": "alternate",
                       "classifier.full_scale": 256, "classifier.trunk_trainable_blocks": 0,
                       "classifier.test_scales": [224, 256, 300, 360, 448, 560], "classifier.test_views": "full"},
    "classification.yaml": {},  # CLASSIFICATION_DEFAULTS: checked key by key below
}


def _get(cfg, dotted):
    for part in dotted.split("."):
        cfg = getattr(cfg, part)
    return cfg


def test_every_shipped_config_resolves_to_what_it_claims():
    assert sorted(p.name for p in CONFIGS.glob("*.yaml")) == sorted(CLAIMS)
    for name, claims in CLAIMS.items():
        cfg = load_config(CONFIGS / name)
        for key, value in claims.items():
            assert _get(cfg, key) == value, (name, key)
    assert load_config(CONFIGS / "default.yaml") == Config()
    # the 5-scale file differs from its base only where it says so
    a, b = load_config(CONFIGS / "zf5_paper.yaml").to_dict(), load_config(CONFIGS / "zf5_paper_5scales.yaml").to_dict()
    a["features"].update(scales=b["features"]["scales"], scale_rule="paper")
    assert a == b
    # so does the learned-proposals file from bccd.yaml
    a, b = load_config(CONFIGS / "bccd.yaml").to_dict(), load_config(CONFIGS / "bccd_rpn.yaml").to_dict()
    a["proposals"]["method"] = "rpn"
    assert a == b


def test_base_chains_merge_mappings_and_replace_lists(tmp_path):
    (tmp_path / "sub").mkdir()
    (tmp_path / "a.yaml").write_text("features:\n  scales: [480, 688]\n  max_size: 1500\nsvm:\n  C: 0.5\n")
    (tmp_path / "sub" / "b.yaml").write_text("_base_: ../a.yaml\nfeatures:\n  scales: [600]\n")
    (tmp_path / "sub" / "c.yaml").write_text("_base_: b.yaml\nsvm:\n  pos_weight: 3.0\n")
    cfg = load_config(tmp_path / "sub" / "c.yaml", ["svm.C=0.25"])
    assert cfg.features.scales == [600] and cfg.features.max_size == 1500
    assert cfg.svm.C == 0.25 and cfg.svm.pos_weight == 3.0
    (tmp_path / "loop1.yaml").write_text("_base_: loop2.yaml\n")
    (tmp_path / "loop2.yaml").write_text("_base_: loop1.yaml\n")
    with pytest.raises(ConfigError, match="loops back"):
        load_config(tmp_path / "loop1.yaml")
    (tmp_path / "orphan.yaml").write_text("_base_: missing.yaml\n")
    with pytest.raises(ConfigError, match="missing.yaml.*the _base_ of .*orphan.yaml"):
        load_config(tmp_path / "orphan.yaml")
    (tmp_path / "badbase.yaml").write_text("_base_: [a.yaml]\n")
    with pytest.raises(ConfigError, match="one file name"):
        load_config(tmp_path / "badbase.yaml")


@pytest.mark.parametrize("items,msg", [
    (["finetune.enabled=false"], "needs svm.layer=pool5"),
    (["backbone.name=zf6"], "backbone.name must be one of"),
    (["backbone.cut=stride8"], "backbone.cut"),
    (["finetune.fc_dims=[512]"], "two sizes"),
    (["finetune.bg_iou_lo=0.6"], "bg_iou_lo < fg_iou"),
    (["features.device=tpu"], "features.device"),
    (["features.max_size=600"], "below the largest scale"),
    (["svm.layer=fc8"], "svm.layer"),
    (["classes=[a, a]"], "distinct"),
    (["classifier.input=warp"], "classifier.input"),
    (["classifier.view_size=300"], "must fit in view_scale"),
    (["classifier.sizes=[224]"], "two or more distinct"),
    (["classifier.sizes=[224, 224]"], "two or more distinct"),
    (["classifier.size_schedule=each"], "size_schedule"),
    (["classifier.crop_positions=grid16"], "crop_positions"),
    (["classifier.trunk_trainable_blocks=-1"], "trunk_trainable_blocks"),
    (["finetune.trunk_trainable_blocks=-1"], "finetune.trunk_trainable_blocks must be >= 0"),
    (["finetune.images_per_batch=0"], "finetune.images_per_batch"),
    (["finetune.trunk_trainable_blocks=1", "finetune.enabled=false", "svm.layer=pool5"], "needs finetune.enabled"),
    (["classifier.fc_dims=[64]"], "two sizes"),
    (["classifier.test_scales=[16]"], "test_scales"),
    (["classifier.epochs=0"], "epochs >= 1"),
])
def test_cross_field_rules_are_config_errors(items, msg):
    with pytest.raises(ConfigError, match=msg):
        load_config(None, items)
    assert load_config(None, ["finetune.enabled=false", "svm.layer=pool5"]).finetune.enabled is False


def test_config_knows_every_backbone():
    from detector.core.backbones import BACKBONES
    from detector.config import BACKBONE_NAMES

    assert tuple(BACKBONES) == BACKBONE_NAMES


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


def test_classification_yaml_is_the_classification_defaults():
    """configs/classification.yaml and detector/classification/defaults.py hold the same values,
    and detection's own defaults are not touched by them."""
    from detector.classification.defaults import CLASSIFICATION_DEFAULTS

    from_file = load_config(CONFIGS / "classification.yaml")
    assert from_file == load_config(None, base=CLASSIFICATION_DEFAULTS)
    for key, value in CLASSIFICATION_DEFAULTS.items():
        assert _get(from_file, key) == value, key
    import yaml

    flat = {f"{section}.{k}": v for section, keys in yaml.safe_load((CONFIGS / "classification.yaml").read_text())
            .items() for k, v in keys.items()}
    assert flat == CLASSIFICATION_DEFAULTS  # the file sets exactly those keys, no more
    assert load_config(None).backbone.cut == "stride16"  # detection's default is unchanged
