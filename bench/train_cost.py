#!/usr/bin/env python
"""What training costs: seconds per stage, peak memory, feature-cache size, and how the
feature and SVM stages grow with the number of training images.

1. The full run: `detector.detection.train.pipeline.train` on the training split with --config and --set,
   into a fresh run directory and a fresh cache (proposals and conv maps), so nothing is
   reused.  Reports the seconds of every stage (RUN_DIR/stages.json; the SVM stage includes
   the pass that writes the SVM and regression rows, shown apart), peak RSS of the training process and of its worker
   processes (proposal workers), and the conv-feature cache size per image and scale
   (mirror-image maps, written for flip augmentation, counted apart).
2. Scaling runs, one per --sizes entry (default 50,100,200,all): the same training on a
   seeded, nested random subset of the training split, each with a fresh run directory and
   a fresh feature cache, and with finetune.iterations set to --scaling-iterations
   (default 300) to keep them affordable.  They share one proposal cache with the full run,
   so their proposal stage is mostly cache reads; proposals are reported per image from the
   run that computed them.

Each training runs in its own child process (its own peak RSS, its log in OUT/<run>/train.log).
The subsets live in a throwaway dataset folder under --out whose Annotations/ and JPEGImages/
are symlinks to the real dataset's (images are never copied; nothing is written into the
dataset).  --out is wiped at the start (only if an earlier run of this script made it).

  python bench/train_cost.py [--dataset ../shared/datasets/BCCD] [--config configs/bccd.yaml]
                             [--set finetune.iterations=3000] [--sizes 50,100,200,all]
                             [--out data/bench/train_cost] [--skip-full]
"""
from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402  (puts the repo root on sys.path)

MARKER = ".bench_train_cost"
MB = 1024.0 * 1024.0


# --------------------------------------------------------------------------- child: one training run

def run_child(spec_file: str) -> int:
    """Train once, in this process, and record wall time and peak RSS beside the run."""
    import resource

    from detector.config import load_config
    from detector.detection.train.pipeline import load_training_set, train

    spec = json.loads(Path(spec_file).read_text())
    cfg = load_config(spec["config"], spec["overrides"])
    n_images = len(load_training_set(spec["dataset"], spec["split"], cfg))
    t = time.perf_counter()
    train(spec["dataset"], spec["run_dir"], cfg, spec["split"], spec["cache"], progress=spec["progress"])
    wall = time.perf_counter() - t
    ru_self = resource.getrusage(resource.RUSAGE_SELF)
    ru_children = resource.getrusage(resource.RUSAGE_CHILDREN)
    info = {"images": n_images, "scales": list(cfg.features.scales), "wall_seconds": wall,
            # Linux reports ru_maxrss in KiB; for RUSAGE_CHILDREN it is the largest single child, not a sum.
            "maxrss_self_mb": ru_self.ru_maxrss / 1024.0, "maxrss_children_mb": ru_children.ru_maxrss / 1024.0,
            "cpu_user_s": ru_self.ru_utime + ru_children.ru_utime, "cpu_sys_s": ru_self.ru_stime + ru_children.ru_stime}
    (Path(spec["run_dir"]) / "bench_rusage.json").write_text(json.dumps(info, indent=1))
    return 0


# --------------------------------------------------------------------------- parent

def prepare_out(out: Path) -> None:
    if out.exists():
        if (out / MARKER).is_file():
            shutil.rmtree(out)
        elif any(out.iterdir()):
            raise SystemExit(f"{out} exists, is not empty and was not made by this script; choose another --out")
    out.mkdir(parents=True, exist_ok=True)
    (out / MARKER).write_text("made by bench/train_cost.py; deleted by its next run\n")


def make_subset_dataset(src: Path, dst: Path, split: str, sizes: list, seed: int = 0) -> tuple[dict, int]:
    """A dataset folder that links to src's annotations and images and has its own split files:
    src's splits (linked) plus bench_<n>.txt, nested random subsets of `split`.  Returns
    {size label: split name} and the split's size."""
    import numpy as np

    dst.mkdir(parents=True)
    for name in ("Annotations", "JPEGImages"):
        if not (src / name).is_dir():
            raise SystemExit(f"{src}: no {name}/ folder; --dataset must be a VOC-layout dataset")
        (dst / name).symlink_to((src / name).resolve(), target_is_directory=True)
    main = dst / "ImageSets" / "Main"
    main.mkdir(parents=True)
    for f in sorted((src / "ImageSets" / "Main").glob("*.txt")):
        (main / f.name).symlink_to(f.resolve())
    split_file = src / "ImageSets" / "Main" / f"{split}.txt"
    if not split_file.is_file():
        raise SystemExit(f"{split_file}: split file not found")
    ids = list(dict.fromkeys(line.split()[0] for line in split_file.read_text().splitlines() if line.strip()))
    order = [ids[i] for i in np.random.default_rng(seed).permutation(len(ids))]
    splits = {}
    for s in sizes:
        if s == "all" or s >= len(ids):
            splits["all"] = split
            continue
        name = f"bench_{s}"
        (main / f"{name}.txt").write_text("\n".join(sorted(order[:s])) + "\n")
        splits[str(s)] = name
    return splits, len(ids)


def feature_cache_sizes(cache_root: Path) -> dict:
    """Bytes and file counts of the conv-feature cache, plain and mirror-image maps apart."""
    out = {"plain_bytes": 0, "plain_files": 0, "flip_bytes": 0, "flip_files": 0}
    for f in (cache_root / "features").rglob("*.npz"):
        kind = "flip" if f.stem.endswith("_flip") else "plain"
        out[f"{kind}_bytes"] += f.stat().st_size
        out[f"{kind}_files"] += 1
    return out


def dir_bytes(d: Path) -> int:
    return sum(f.stat().st_size for f in d.rglob("*") if f.is_file()) if d.is_dir() else 0


def launch(name: str, out: Path, dataset: Path, split: str, config: str, overrides: list, progress: bool) -> dict:
    run = out / name
    cache = run / "cache"
    cache.mkdir(parents=True)
    (cache / "proposals").symlink_to((out / "proposals").resolve(), target_is_directory=True)
    spec = {"dataset": str(dataset), "split": split, "config": config, "overrides": overrides,
            "run_dir": str(run / "run"), "cache": str(cache), "progress": progress}
    (run / "spec.json").write_text(json.dumps(spec, indent=1))
    print(f"[{time.strftime('%H:%M:%S')}] run {name}: split {split}, overrides {overrides or 'none'}; "
          f"log {run / 'train.log'}", flush=True)
    t = time.perf_counter()
    with open(run / "train.log", "w") as log:
        rc = subprocess.call([sys.executable, str(Path(__file__).resolve()), "--child", str(run / "spec.json")],
                             stdout=log, stderr=None if progress else subprocess.STDOUT)
    res = {"name": name, "rc": rc, "parent_wall_s": time.perf_counter() - t}
    if rc != 0:
        print(f"  run {name} FAILED (exit {rc}); see {run / 'train.log'}", flush=True)
        return res
    res.update(json.loads((run / "run" / "bench_rusage.json").read_text()))
    res["stages"] = json.loads((run / "run" / "stages.json").read_text())
    res["cache"] = feature_cache_sizes(cache)
    print(f"  done in {res['parent_wall_s']:.0f} s", flush=True)
    return res


def stage_seconds(res: dict, name: str) -> float:
    return float(res["stages"].get(name, {}).get("seconds", float("nan")))


def report_full(res: dict, out: Path) -> None:
    n, scales = res["images"], res["scales"]
    st = res["stages"]
    svm = st.get("svm", {})
    feat_s = float(svm.get("feature_seconds", float("nan")))
    rows = []
    notes = {"proposals": f"{st.get('proposals', {}).get('boxes_per_image', 0):.0f} boxes/image, "
                          f"computed fresh",
             "features": f"{len(scales)} scale(s) {scales}" + (", + mirror maps" if res["cache"]["flip_files"] else ""),
             "finetune": f"{st.get('finetune', {}).get('iterations', '?')} iterations"}
    for name in ("proposals", "features", "finetune"):
        if name in st:
            s = stage_seconds(res, name)
            rows.append([name, f"{s:.1f}", f"{s / n:.3f}", notes.get(name, "")])
    if "svm" in st:
        s = stage_seconds(res, "svm")
        rows.append(["svm: feature pass", f"{feat_s:.1f}", f"{feat_s / n:.3f}", "pool5 + fc of GT + proposals"])
        rows.append(["svm: training + mining", f"{s - feat_s:.1f}", f"{(s - feat_s) / n:.3f}", "liblinear"])
    if "bbox" in st:
        s = stage_seconds(res, "bbox")
        rows.append(["bbox regression", f"{s:.1f}", f"{s / n:.3f}", f"{st['bbox'].get('examples', '?')} examples"])
    total = sum(stage_seconds(res, k) for k in st)
    rows.append(["sum of stages", f"{total:.1f}", f"{total / n:.3f}", ""])
    rows.append(["wall, whole child process", f"{res['parent_wall_s']:.1f}", f"{res['parent_wall_s'] / n:.3f}",
                 "incl. imports, dataset loading, model file"])
    print(f"full run: {n} training images, config as given; stage seconds from {out / 'full' / 'run' / 'stages.json'}")
    print(common.table(["stage", "seconds", "s / image", "notes"], rows, "lrrl"))
    print()
    c = res["cache"]
    per = n * len(scales)
    print("peak RSS: training process {:.0f} MB; largest worker process (proposals) {:.0f} MB".format(
        res["maxrss_self_mb"], res["maxrss_children_mb"]))
    print(f"CPU time: user {res['cpu_user_s']:.0f} s, system {res['cpu_sys_s']:.0f} s (process + workers)")
    line = (f"feature cache: {c['plain_bytes'] / MB:.1f} MB in {c['plain_files']} files = "
            f"{c['plain_bytes'] / MB / per:.3f} MB per image per scale")
    if c["flip_files"]:
        line += (f"; mirror maps: {c['flip_bytes'] / MB:.1f} MB in {c['flip_files']} files = "
                 f"{c['flip_bytes'] / MB / per:.3f} MB per image per scale")
    print(line)
    pbytes = dir_bytes(out / "proposals")
    print(f"proposal cache: {pbytes / MB:.1f} MB = {pbytes / 1024 / n:.1f} KB per image")
    print()


def report_scaling(results: list, iterations: int) -> None:
    rows = []
    for r in results:
        if r.get("rc"):
            rows.append([r["name"], "failed"] + [""] * 9)
            continue
        n = r["images"]
        feat = stage_seconds(r, "features")
        ft = stage_seconds(r, "finetune")
        svm = stage_seconds(r, "svm")
        svm_f = float(r["stages"].get("svm", {}).get("feature_seconds", float("nan")))
        bbox = stage_seconds(r, "bbox")
        rows.append([r["name"], str(n), f"{feat:.1f}", f"{feat / n:.3f}", f"{ft:.1f}", f"{svm_f:.1f}",
                     f"{svm - svm_f:.1f}", f"{svm / n:.3f}", f"{bbox:.1f}", f"{r['maxrss_self_mb']:.0f}",
                     f"{r['parent_wall_s']:.0f}"])
    print(f"scaling with the number of training images (finetune.iterations={iterations}; fresh feature "
          f"cache each; shared proposal cache)")
    print(common.table(["run", "images", "features s", "s/img", "finetune s", "svm feat s", "svm train s",
                        "svm s/img", "bbox s", "peak RSS MB", "wall s"], rows))
    print()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--dataset", default=common.DEFAULT_DATASET, help="a VOC-layout dataset")
    ap.add_argument("--train-split", default="trainval")
    ap.add_argument("--config", default=common.DEFAULT_CONFIG)
    ap.add_argument("--set", dest="overrides", nargs="+", default=[], metavar="KEY=VALUE",
                    help="config overrides for every run, e.g. --set finetune.iterations=1000")
    ap.add_argument("--sizes", default="50,100,200,all", help="training-set sizes of the scaling runs ('' for none)")
    ap.add_argument("--scaling-iterations", type=int, default=300, help="finetune.iterations of the scaling runs")
    ap.add_argument("--skip-full", action="store_true", help="only the scaling runs")
    ap.add_argument("--out", default=str(common.ROOT / "data" / "bench" / "train_cost"),
                    help="work folder (wiped at the start)")
    ap.add_argument("--quiet", action="store_true", help="no progress bars")
    args = ap.parse_args(argv)
    if args.child:
        return run_child(args.child)

    from detector.config import ConfigError, load_config

    sizes: list = []
    for v in [v.strip() for v in args.sizes.split(",") if v.strip()]:
        if v == "all":
            sizes.append("all")
        elif v.isdigit() and int(v) > 0:
            sizes.append(int(v))
        else:
            ap.error(f"--sizes: expected positive integers or 'all', got {v!r}")
    try:
        cfg = load_config(args.config, args.overrides)
    except ConfigError as e:
        ap.error(str(e))
    common.print_header("training cost")
    out = Path(args.out).resolve()
    dataset = Path(args.dataset).resolve()
    if out == dataset or dataset in out.parents:
        ap.error("--out must not lie inside the dataset")
    prepare_out(out)
    (out / "proposals").mkdir()
    data = out / "dataset"
    splits, n_split = make_subset_dataset(dataset, data, args.train_split, sizes)
    print(f"dataset: {dataset}, split {args.train_split} ({n_split} ids); config {args.config}, overrides "
          f"{args.overrides or 'none'}; scales {cfg.features.scales}; torch threads in each run: torch's default")
    print(f"work folder: {out}")
    print()

    t0 = time.perf_counter()
    progress = not args.quiet
    full = None
    if not args.skip_full:
        full = launch("full", out, data, args.train_split, args.config, args.overrides, progress)
    scaling = []
    seen = set()
    for s in sizes:
        label = "all" if s == "all" else str(s)
        split = splits[label if label in splits else "all"]
        if split in seen:  # e.g. 500 on a 292-image split is 'all' again
            continue
        seen.add(split)
        name = "n_all" if split == args.train_split else f"n_{s}"
        scaling.append(launch(name, out, data, split, args.config,
                              [o for o in args.overrides if not o.startswith("finetune.iterations=")]
                              + [f"finetune.iterations={args.scaling_iterations}"], progress))
    print()
    print(f"all runs: {time.perf_counter() - t0:.0f} s")
    print()
    if full is not None and not full.get("rc"):
        report_full(full, out)
    first = next((r for r in ([full] if full else []) + scaling if r and not r.get("rc")), None)
    if first is not None:
        from detector.proposals.store import usable_cores

        s = stage_seconds(first, "proposals")
        workers = cfg.proposals.workers or usable_cores()
        print(f"proposals (computed fresh by run '{first['name']}', {workers} worker processes): "
              f"{s:.1f} s = {s / first['images']:.3f} s per image; later runs read them from the shared cache")
        print()
    if scaling:
        report_scaling(scaling, args.scaling_iterations)
    failed = [r["name"] for r in ([full] if full else []) + scaling if r.get("rc")]
    if failed:
        print(f"FAILED runs: {', '.join(failed)}")
        return 1
    return 0


if __name__ == "__main__":  # the guard matters: proposal workers are spawned processes
    sys.exit(main())
