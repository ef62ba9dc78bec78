#!/usr/bin/env python
"""On paper: the wall time of a VOC 2007 and a COCO training + test on 1, 4, 16 and 64 nodes
of 2 cores and on 1 and 8 GPUs, from per-image and per-stage figures measured on BCCD
(BENCHMARKS.md, "Many processes and scale on paper", says where each comes from).

Nothing is run: the figures below are the inputs; edit them with your own measurements
(`bench/train_cost.py`, `tools/test_voc.py`) to project for your machines.

  python bench/scale_projection.py
"""
import math

# One 2-core node, one process, BCCD at 1 scale (688), Lite0: bench/train_cost.py's full run.
PROPOSALS_S = 0.441          # selective search, s per image
MAPS_S = 0.515               # conv maps of the image and its mirror image
ROWS_S = 0.163               # SVM / regression rows pass
DETECT_S = 0.43              # tools/test_voc.py per image, proposals cached
SVM_S_PER_IMAGE_CLASS = 13.3 / (292 * 3)   # rank-0 SVM training, linear in images x classes
BBOX_S_PER_IMAGE = 22.5 / 292              # box regression (~200 examples per BCCD image)
FINETUNE_S_PER_ITER = 273.7 / 3000         # 128 windows per iteration
ITERATIONS = 90_000                        # the release's fine-tuning schedule
ALLREDUCE_S = 2 * 27.2e6 / 1.25e9          # ring all-reduce of fc6-fc8's 27.2 MB on 10 GbE
# One H200 + 16 cores (issue 15, before the device path: upper bounds).
GPU_MAPS_S, GPU_DETECT_S, GPU_FINETUNE_S_PER_ITER = 11 / 292, 0.146, 330 / 3000
GPU_PROPOSALS_S = 2 * PROPOSALS_S / 16     # selective search over 16 cores

DATASETS = {"VOC 2007 trainval (5,011 images) + test (4,952), 20 classes": (5011, 4952, 20),
            "COCO train2017 (118,287 images) + val2017 (5,000), 80 classes": (118287, 5000, 80)}


def fmt(seconds: float) -> str:
    return f"{seconds / 3600:.1f} h" if seconds >= 3600 else f"{seconds / 60:.0f} min"


def main() -> None:
    for name, (n_train, n_test, classes) in DATASETS.items():
        svm = SVM_S_PER_IMAGE_CLASS * n_train * classes
        bbox = BBOX_S_PER_IMAGE * n_train
        print(f"\n{name}: SVM training {fmt(svm)} and box regression {fmt(bbox)} in one process\n")
        print("| machines | sharded training stages | fine-tuning | SVMs + box regression | test | total |")
        print("|---|---|---|---|---|---|")
        rows = [(f"{n} × 2 cores", n, (PROPOSALS_S + MAPS_S + ROWS_S) * n_train / n,
                 ITERATIONS * (FINETUNE_S_PER_ITER / n + (ALLREDUCE_S if n > 1 else 0)),
                 (PROPOSALS_S + DETECT_S) * n_test / n) for n in (1, 4, 16, 64)]
        rows += [(f"{g} GPU{'s' if g > 1 else ''}", g, (GPU_PROPOSALS_S + GPU_MAPS_S + ROWS_S / 8) * n_train / g,
                  ITERATIONS * (GPU_FINETUNE_S_PER_ITER / g + (ALLREDUCE_S if g > 1 else 0)),
                  (GPU_PROPOSALS_S + GPU_DETECT_S) * n_test / g) for g in (1, 8)]
        for label, n, sharded, finetune, test in rows:
            rank0 = svm + bbox                                   # everything on rank 0
            split = svm * math.ceil(classes / n) / classes + bbox  # SVM classes shared by the ranks
            if n == 1:
                print(f"| {label} | {fmt(sharded)} | {fmt(finetune)} | {fmt(rank0)} | {fmt(test)} | "
                      f"**{fmt(sharded + finetune + rank0 + test)}** |")
            else:
                print(f"| {label} | {fmt(sharded)} | {fmt(finetune)} | {fmt(rank0)} → {fmt(split)} | {fmt(test)} | "
                      f"**{fmt(sharded + finetune + rank0 + test)} → {fmt(sharded + finetune + split + test)}** |")


if __name__ == "__main__":
    main()
