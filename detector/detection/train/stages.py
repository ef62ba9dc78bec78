"""The training stages in order, what each one's result depends on, and the record of
finished ones: the plan.  `detector.detection.train.pipeline` holds the code that runs
each stage and the loop over them.

Torch-free on purpose: `tools/train.py` imports `STAGE_NAMES` for its `--stop-after` choices
before it imports anything heavy (spawned selective-search workers re-import the script).

A stage either always runs (`reusable=False`: proposals and conv maps live in content-keyed
caches, so a rerun costs little and rebuilds what the later stages read) or is reused when
its recorded digest is unchanged and its `outputs` (files in the run folder) exist.

Each stage's digest hashes only the settings that change its result, plus the digests of
the stages it reads from, so a change propagates downstream and nowhere else:

    features   the feature-cache key (backbone, weights, scales, max_size, dtype) and flips
    rpn        (proposals.method: rpn) data, feature key, seed, the head's training settings
    proposals  search options (not `workers`); or rpn + the proposal settings; or the content
               of a proposals file
    finetune   "base" (data, proposals, feature key, levels, projection, scale rule, seed,
               target norm: everything pool5 depends on) + finetune settings (not
               `checkpoint_every`; the trunk blocks' only when some train) + the box loss's
               weight when bbox.method is finetune
    rpn_refit  (learned proposals and fine-tuned trunk blocks) finetune + the proposal settings
    svm        finetune (+ rpn_refit) + svm settings
    bbox       base + the ridge settings (+ finetune, or rpn_refit, when the trunk's last
               blocks were fine-tuned: pool5 then comes from them); or finetune
               (bbox.method: finetune)
    model      svm + bbox + finetune + the whole config but the settings below

Settings that never change a result (`detector.config.RESULT_NEUTRAL`: `proposals.workers`,
`features.device`, `features.ram_cache_mb`, `finetune.checkpoint_every`, `backbone.download`)
and the whole `classifier` section (image classification's; detection never reads it) are
left out of every digest.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from detector.cache import atomic_write_json, params_digest


@dataclass(frozen=True)
class StageSpec:
    name: str
    reusable: bool = True  # False: runs every time (its results live in content-keyed caches)
    outputs: Callable[..., tuple] = lambda cfg: ()  # run-folder files a reused stage's record needs
    applies: Callable[..., bool] = lambda cfg: True  # False: the config has no such stage (skipped)


def learned_proposals(cfg) -> bool:
    return cfg.proposals.method == "rpn"


def tuned_trunk(cfg) -> bool:
    """Whether fine-tuning trains the trunk's last blocks too."""
    return bool(cfg.finetune.enabled and cfg.finetune.trunk_trainable_blocks > 0)


def refit_proposals(cfg) -> bool:
    """Whether the learned proposals' head is trained again on the fine-tuned trunk's maps."""
    return learned_proposals(cfg) and tuned_trunk(cfg)


STAGES = (
    StageSpec("features", reusable=False),
    StageSpec("rpn", outputs=lambda cfg: ("rpn.npz",), applies=learned_proposals),
    StageSpec("proposals", reusable=False),
    StageSpec("finetune", outputs=lambda cfg: ("finetune.npz",)),
    StageSpec("rpn_refit", outputs=lambda cfg: ("rpn_refit.npz",), applies=refit_proposals),
    StageSpec("svm", outputs=lambda cfg: ("svm.npz",)),
    StageSpec("bbox", outputs=lambda cfg: ("bbox.npz",) if cfg.bbox.enabled else ()),
    StageSpec("model", outputs=lambda cfg: ("model.safetensors",)),
)
STAGE_NAMES = tuple(s.name for s in STAGES)

# The learned proposals' settings that decide the boxes, not the head: the training windows'
# count and the proposal step's own settings (post_nms_top_n is test time only).
RPN_PROPOSAL_KEYS = ("train_top_n", "pre_nms_top_n", "nms_iou", "min_size", "post_nms_top_n")
# Fine-tuning's settings of the trainable trunk blocks: left out of the digests while the trunk is frozen.
TRUNK_KEYS = ("trunk_trainable_blocks", "trunk_lr_mult", "images_per_batch")


def mirror_maps(cfg) -> bool:
    """Whether training needs the mirror images' conv maps (flip augmentation of the fc layers or
    of the learned proposals' head)."""
    return bool((cfg.finetune.enabled and cfg.finetune.flip) or (learned_proposals(cfg) and cfg.rpn.flip))


def relevant_config(cfg) -> dict:
    """The config as a dict, without the settings that never change a result
    (`config.RESULT_NEUTRAL`) and without the classifier's section (no detection stage reads it)."""
    from detector.config import result_settings

    d = result_settings(cfg)
    d.pop("classifier", None)
    return d


def data_digest(ds) -> str:
    """What the training set is: image ids, boxes, labels, class names."""
    return params_digest({"ids": [r.image_id for r in ds], "boxes": [r.boxes.tolist() for r in ds],
                          "labels": [r.labels.tolist() for r in ds], "classes": list(ds.class_names)})


def stage_digests(cfg, data_sig: str, feature_key: str, proposals_file: str | None = None) -> dict[str, str]:
    """Digest of every stage's inputs (see the module docstring), plus the per-image row
    sets the SVM and box-regression stages train from ("svm_rows", "bbox_rows").
    proposals_file: the digest of a published proposals file used instead of selective search."""
    from detector.config import box_layer_trained

    c = relevant_config(cfg)
    d = {"features": params_digest({"key": feature_key, "flips": mirror_maps(cfg)})}
    if learned_proposals(cfg):
        rpn_train = {k: v for k, v in c["rpn"].items() if k not in RPN_PROPOSAL_KEYS}
        d["rpn"] = params_digest({"data": data_sig, "features": feature_key, "rpn": rpn_train, "seed": c["seed"]})
        proposals = {"rpn": d["rpn"], **{k: c["rpn"][k] for k in RPN_PROPOSAL_KEYS if k != "post_nms_top_n"}}
    else:
        d["rpn"] = "-"
        proposals = c["proposals"]
    d["proposals"] = params_digest({"file": proposals_file} if proposals_file else proposals)
    base = params_digest({"data": data_sig, "proposals": d["proposals"], "features": feature_key,
                          "levels": c["spp"]["levels"], "projection": c["spp"]["projection"],
                          "scale_rule": c["features"]["scale_rule"], "seed": c["seed"],
                          "target_norm": c["svm"]["target_norm"]})
    ft = dict(c["finetune"]) if cfg.finetune.enabled else {"enabled": False}
    if not tuned_trunk(cfg):  # the trunk's settings change nothing then (and older runs keep their digests)
        for k in TRUNK_KEYS:
            ft.pop(k, None)
    joint_box = box_layer_trained(cfg)
    if joint_box:  # the box layer trains with the fc layers
        ft = {**ft, "box_loss_weight": c["bbox"]["loss_weight"]}
    d["finetune"] = params_digest({"base": base, "finetune": ft, "features": d["features"]})
    # with both, the rows are read from the refit head's proposals on the fine-tuned trunk
    d["rpn_refit"] = params_digest({"finetune": d["finetune"], "proposals": proposals}) if refit_proposals(cfg) \
        else "-"
    svm_rows = {"finetune": d["finetune"], "layer": c["svm"]["layer"]}
    if refit_proposals(cfg):
        svm_rows["rpn_refit"] = d["rpn_refit"]
    d["svm_rows"] = params_digest(svm_rows)
    d["svm"] = params_digest({"rows": d["svm_rows"], "svm": c["svm"]})
    rows = {"base": base, "iou": c["bbox"]["iou_thresh"]}
    if c["bbox"]["reference"] != "proposal":  # the rows hold the window boxes as their boxes
        rows["reference"] = c["bbox"]["reference"]
    if tuned_trunk(cfg):  # pool5 is read from the fine-tuned trunk's maps (and its proposals, if learned)
        rows["finetune"] = d["rpn_refit"] if refit_proposals(cfg) else d["finetune"]
    d["bbox_rows"] = params_digest(rows)
    if joint_box:
        d["bbox"] = params_digest({"finetune": d["finetune"], "method": "finetune"})
    else:  # the ridge regressors' own settings only (the keys of `finetune` would rerun it for nothing)
        ridge = {k: v for k, v in c["bbox"].items() if k not in ("method", "loss_weight", "reference")}
        d["bbox"] = params_digest({"rows": d["bbox_rows"], "bbox": ridge})
    d["model"] = params_digest({"svm": d["svm"], "bbox": d["bbox"], "finetune": d["finetune"], "config": c})
    return d


class StageRecords:
    """`RUN_DIR/stages.json`: each finished stage's digest, time and summary; and, for this
    run, which stages ran and which were reused."""

    def __init__(self, run_dir: Path):
        self.path = Path(run_dir) / "stages.json"
        self.done = json.loads(self.path.read_text()) if self.path.is_file() else {}
        self.ran: dict[str, float] = {}
        self.reused: list[str] = []

    def fresh(self, name: str, digest: str, files=()) -> bool:
        return self.done.get(name, {}).get("digest") == digest and all(Path(f).is_file() for f in files)

    def finish(self, name: str, digest: str, seconds: float, **info) -> None:
        from detector.distributed import world

        self.done[name] = {"digest": digest, "seconds": round(seconds, 2), **info}
        self.ran[name] = seconds
        if world().main:  # under torchrun, rank 0 keeps the record
            atomic_write_json(self.path, self.done)

    def reuse(self, name: str) -> None:
        self.reused.append(name)

    def report(self) -> str:
        ran = ", ".join(f"{k} {v:.1f} s" for k, v in self.ran.items()) or "none"
        return f"stages run: {ran}" + (f"; reused: {', '.join(self.reused)}" if self.reused else "")
