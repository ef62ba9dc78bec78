"""Stage digests: each stage reruns exactly when something its result depends on changes."""
import dataclasses

import pytest

from detector.config import load_config
from detector.config import RESULT_NEUTRAL
from detector.detection.train.stages import STAGE_NAMES, stage_digests


def digests(*overrides):
    return stage_digests(load_config(None, list(overrides)), "data", "features")


def changed(*overrides):
    a, b = digests(), digests(*overrides)
    return {k for k in a if a[k] != b[k]}


@pytest.mark.parametrize("item", ["proposals.workers=3", "features.device=cpu", "finetune.checkpoint_every=7",
                                  "backbone.download=true"])
def test_settings_that_change_no_result_change_no_digest(item):
    assert changed(item) == set()


def test_irrelevant_list_names_real_fields():
    from detector.config import Config

    cfg = Config()
    for section, key in RESULT_NEUTRAL:
        assert key in {f.name for f in dataclasses.fields(getattr(cfg, section))}


@pytest.mark.parametrize("item,expected", [
    ("bbox.lam=2000.0", {"bbox", "model"}),
    ("bbox.iou_thresh=0.6", {"bbox_rows", "bbox", "model"}),
    ("svm.C=0.01", {"svm", "model"}),
    ("svm.layer=fc6", {"svm_rows", "svm", "model"}),
    ("test.nms_iou=0.4", {"model"}),
    ("finetune.lr=0.01", {"finetune", "svm_rows", "svm", "model"}),
    ("proposals.top_k=500", {"proposals", "finetune", "svm_rows", "svm", "bbox_rows", "bbox", "model"}),
    ("spp.levels=[1,2,4]", {"finetune", "svm_rows", "svm", "bbox_rows", "bbox", "model"}),
])
def test_a_change_reaches_its_stage_and_everything_downstream_only(item, expected):
    assert changed(item) == expected


def test_data_and_feature_changes_reach_every_trained_stage():
    a = stage_digests(load_config(None), "data", "features")
    b = stage_digests(load_config(None), "other data", "features")
    c = stage_digests(load_config(None), "data", "other features")
    trained = {"finetune", "svm_rows", "svm", "bbox_rows", "bbox", "model"}
    assert {k for k in a if a[k] != b[k]} == trained
    assert {k for k in a if a[k] != c[k]} == trained | {"features"}
    assert set(STAGE_NAMES) <= set(a)


@pytest.mark.parametrize("item", ["classifier.input=full", "classifier.epochs=7", "classifier.fc_dims=[64, 64]",
                                  "classifier.test_scales=[224]", "classifier.trunk_trainable_blocks=2"])
def test_classifier_settings_change_no_detection_digest(item):
    assert changed(item) == set()


@pytest.mark.parametrize("item,expected", [
    ("rpn.lr=0.02", {"rpn", "proposals", "finetune", "svm_rows", "svm", "bbox_rows", "bbox", "model"}),
    ("rpn.anchor_sizes=[32,64]", {"rpn", "proposals", "finetune", "svm_rows", "svm", "bbox_rows", "bbox", "model"}),
    ("rpn.train_top_n=500", {"proposals", "finetune", "svm_rows", "svm", "bbox_rows", "bbox", "model"}),
    ("rpn.post_nms_top_n=100", {"model"}),  # test time only
    ("rpn.checkpoint_every=7", set()),
    ("proposals.mode=quality", {"model"}),  # selective search's settings do not reach learned proposals
])
def test_learned_proposals_digests(item, expected):
    rpn = ["proposals.method=rpn"]
    a = stage_digests(load_config(None, rpn), "data", "features")
    b = stage_digests(load_config(None, rpn + [item]), "data", "features")
    assert {k for k in a if a[k] != b[k]} == expected


def test_the_rpn_stage_exists_only_with_learned_proposals_and_mirror_maps_follow_it():
    from detector.detection.train.stages import STAGES, mirror_maps

    spec = STAGES[STAGE_NAMES.index("rpn")]
    assert STAGE_NAMES.index("features") < STAGE_NAMES.index("rpn") < STAGE_NAMES.index("proposals")
    assert not spec.applies(load_config(None)) and spec.applies(load_config(None, ["proposals.method=rpn"]))
    assert stage_digests(load_config(None), "d", "f")["rpn"] == "-"
    no_ft_flip = ["finetune.flip=false"]
    assert not mirror_maps(load_config(None, no_ft_flip))
    assert mirror_maps(load_config(None, no_ft_flip + ["proposals.method=rpn"]))
    assert not mirror_maps(load_config(None, no_ft_flip + ["proposals.method=rpn", "rpn.flip=false"]))


@pytest.mark.parametrize("item", ["finetune.trunk_lr_mult=0.1", "finetune.images_per_batch=4"])
def test_trunk_block_settings_change_nothing_while_the_trunk_is_frozen(item):
    assert changed(item) == {"model"}  # only the model file, which embeds the config


def test_fine_tuned_trunk_blocks_reach_the_regression_rows_too():
    # pool5 of the SVM and the regression rows is then read from the fine-tuned blocks' maps
    assert changed("finetune.trunk_trainable_blocks=1") == {"finetune", "svm_rows", "svm", "bbox_rows", "bbox",
                                                            "model"}
    a = digests("finetune.trunk_trainable_blocks=1")
    b = digests("finetune.trunk_trainable_blocks=1", "finetune.trunk_lr_mult=0.1")
    assert {k for k in a if a[k] != b[k]} == {"finetune", "svm_rows", "svm", "bbox_rows", "bbox", "model"}


def test_the_refit_proposal_head_sits_between_fine_tuning_and_the_rows():
    both = ("proposals.method=rpn", "finetune.trunk_trainable_blocks=1")
    assert digests("proposals.method=rpn")["rpn_refit"] == "-"
    assert digests("finetune.trunk_trainable_blocks=1")["rpn_refit"] == "-"
    a, b = digests(*both), digests(*both, "finetune.lr=0.01")
    assert {k for k in a if a[k] != b[k]} == {"finetune", "rpn_refit", "svm_rows", "svm", "bbox_rows", "bbox", "model"}
    c = digests(*both, "rpn.train_top_n=500")  # the proposals the later stages read
    assert {k for k in a if a[k] != c[k]} >= {"rpn_refit", "svm_rows", "bbox_rows"}
    from detector.config import load_config
    from detector.detection.train.stages import STAGES

    applies = {s.name: s.applies(load_config(None, list(both))) for s in STAGES}
    assert applies["rpn_refit"] and not STAGES[STAGE_NAMES.index("rpn_refit")].applies(load_config(None))
    assert STAGE_NAMES.index("finetune") < STAGE_NAMES.index("rpn_refit") < STAGE_NAMES.index("svm")
