"""Selective-search proposals computed once per image, in parallel, and cached on disk.

Layout: `<cache_dir>/<params key>/<image content digest>.npz` holding `boxes`
([N, 4] float32, our pixel convention, best first) and `image_size` (w, h).
The params key hashes the search options, the OpenCV version and
proposals.search.ALGO_VERSION; `params.json` beside the entries says what they are.
Entries are written atomically by the worker that computed them, so an
interrupted run keeps its finished work and the next run skips it.
"""
from __future__ import annotations

import logging
import os
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from concurrent.futures.process import BrokenProcessPool
from multiprocessing import get_context
from pathlib import Path
from typing import Iterable, Optional, Sequence, Union

import numpy as np

from detector.cache import atomic_save_npz, atomic_write_json, file_digest, load_npz, make_dir, params_digest
from detector.datasets.records import ImageRecord
from detector.errors import DatasetError, DiskError, ProposalsError
from detector.images import ImageError
from . import search as _ss

log = logging.getLogger(__name__)


def cache_params(options: dict) -> dict:
    import cv2

    return {"method": "selective_search", **options, "opencv": cv2.__version__,
            "algo_version": _ss.ALGO_VERSION}


class ProposalStore:
    """Proposals of single images, from the cache when present, else computed and stored."""

    def __init__(self, cache_dir: Union[str, os.PathLike], cfg):
        self.options = _ss.search_options(cfg)  # cfg: a ProposalConfig
        self.params = cache_params(self.options)
        self.key = params_digest(self.params)
        self.dir = Path(cache_dir) / self.key
        make_dir(self.dir)
        meta = self.dir / "params.json"
        if not meta.exists():
            atomic_write_json(meta, self.params)

    def file_for_digest(self, digest: str) -> Path:
        return self.dir / f"{digest}.npz"

    def file(self, image_path: Union[str, os.PathLike]) -> Path:
        return self.file_for_digest(file_digest(image_path))

    def load(self, cache_file: Path) -> Optional[np.ndarray]:
        """Cached boxes, or None for a missing or invalid entry (which is then recomputed)."""
        z = load_npz(cache_file)
        if z is None:
            return None
        boxes = z.get("boxes")
        if boxes is None or boxes.ndim != 2 or boxes.shape[1] != 4 or boxes.dtype != np.float32:
            log.warning("cache file %s has no valid 'boxes' array; recomputing it", cache_file)
            return None
        return boxes

    def get(self, item: Union[ImageRecord, str, os.PathLike]) -> np.ndarray:
        """Boxes for one record or image path (computed here, in this process, if not cached)."""
        path = item.path if isinstance(item, ImageRecord) else item
        f = self.file(path)
        boxes = self.load(f)
        if boxes is None:
            boxes = _compute_and_store(str(path), str(f), self.options)
        return boxes


def _compute_and_store(path: str, cache_file: str, options: dict) -> np.ndarray:
    from detector.images import load_image

    opts = dict(options)
    mode = opts.pop("mode")
    rgb = load_image(path)
    boxes = _ss.selective_search(rgb, mode, **opts)
    atomic_save_npz(cache_file, boxes=boxes, image_size=np.array([rgb.shape[1], rgb.shape[0]], np.int64))
    return boxes


def _init_worker() -> None:
    import cv2

    cv2.setNumThreads(1)  # parallelism comes from the processes; more threads would oversubscribe


def _worker(task: tuple) -> tuple:
    """(index, path, cache file, options) -> (index, boxes | None, error | None, seconds).

    A top-level function, so spawned workers can import it.
    """
    i, path, cache_file, options = task
    t0 = time.perf_counter()
    try:
        boxes = _compute_and_store(path, cache_file, options)
    except DiskError:  # a full disk is not a bad image: it stops the run
        raise
    except Exception as e:  # one bad image must not lose the others' work
        msg = str(e)
        if msg.startswith(path + ": "):  # ImageError already names the file; the caller does too
            msg = msg[len(path) + 2:]
        why = msg if isinstance(e, ImageError) else f"{type(e).__name__}: {msg}"
        return i, None, why, time.perf_counter() - t0
    return i, boxes, None, time.perf_counter() - t0


class ProposalSet(dict):
    """dict image_id -> boxes [N, 4] float32, plus what happened while computing it.

    Failed images (unreadable) map to an empty [0, 4] array and are listed in
    `failed` as (image_id, path, reason); `empty` lists ids whose proposals were
    all filtered out.
    """

    def __init__(self, cache_dir: str = ""):
        super().__init__()
        self.failed: list[tuple[str, str, str]] = []
        self.empty: list[str] = []
        self.computed = 0
        self.cached = 0
        self.seconds = 0.0
        self.cache_dir = cache_dir

    def summary(self) -> str:
        return (f"{len(self)} images: {self.computed} computed, {self.cached} from cache, "
                f"{len(self.failed)} skipped (unreadable), {len(self.empty)} with no proposals; "
                f"{self.seconds:.1f} s; cache {self.cache_dir}")


def _items(records_or_image_paths: Iterable) -> list[tuple[str, str]]:
    items, seen = [], {}
    for it in records_or_image_paths:
        if isinstance(it, ImageRecord):
            iid, path = it.image_id, str(it.path)
        else:
            path = str(it)
            iid = Path(path).stem
        if iid in seen:
            raise DatasetError(f"image id {iid!r} occurs twice ({seen[iid]} and {path}); ids must be unique")
        seen[iid] = path
        items.append((iid, path))
    return items


def usable_cores() -> int:
    """The cores this process may run on (its CPU affinity), not the machine's count."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def compute_proposals(records_or_image_paths: Iterable, cache_dir: Union[str, os.PathLike], cfg,
                      workers: Optional[int] = None, progress: bool = True) -> ProposalSet:
    """Proposals for every record (or image path; its id is then the file stem), cached.

    `cfg` is a ProposalConfig.  Existing valid cache entries are read, not
    recomputed; corrupt ones are recomputed.  Missing work runs in `workers`
    spawned processes (default `cfg.workers`, where 0 means every usable core, divided
    among the processes torchrun started on this machine;
    1 OpenCV thread each; workers <= 1: in this process).  An unreadable
    image is logged with its file name, skipped (an empty array) and listed in
    `.failed`; the rest is still done.
    """
    from detector.progress import progress_bar

    t0 = time.perf_counter()
    workers = cfg.workers if workers is None else workers
    if workers <= 0:  # every usable core, shared with the other processes torchrun started on this machine
        workers = max(1, usable_cores() // int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    store = ProposalStore(cache_dir, cfg)
    items = _items(records_or_image_paths)
    out = ProposalSet(cache_dir=str(store.dir))
    results: list[Optional[np.ndarray]] = [None] * len(items)
    todo: list[tuple] = []
    for i, (iid, path) in enumerate(items):
        try:
            f = store.file(path)
        except OSError as e:
            _fail(out, results, i, iid, path, f"cannot read file ({e.strerror or e})")
            continue
        boxes = store.load(f)
        if boxes is None:
            todo.append((i, path, str(f), store.options))
        else:
            results[i] = boxes
            out.cached += 1

    def done(i: int, boxes, err) -> None:
        iid, path = items[i]
        if err is not None:
            _fail(out, results, i, iid, path, err)
        else:
            results[i] = boxes
            out.computed += 1

    bar = progress_bar(total=len(todo), desc="selective search", unit="img", disable=not progress or not todo)
    try:
        if workers <= 1 or len(todo) <= 1:
            _init_worker()
            for task in todo:
                i, boxes, err, _ = _worker(task)
                done(i, boxes, err)
                bar.update()
        else:
            _run_pool(todo, workers, done, bar, store.dir)
    finally:
        bar.close()

    for i, (iid, path) in enumerate(items):
        boxes = results[i]
        out[iid] = boxes
        if len(boxes) == 0 and not any(f[0] == iid for f in out.failed):
            out.empty.append(iid)
            log.warning("%s: no proposals left after filtering (min_size=%s); it gets none",
                        path, store.options["min_size"])
    order = {iid: i for i, (iid, _) in enumerate(items)}
    out.failed.sort(key=lambda f: order[f[0]])
    out.seconds = time.perf_counter() - t0
    if out.failed:
        log.warning("%d of %d images were skipped as unreadable: %s", len(out.failed), len(items),
                    "; ".join(f"{p} ({why})" for _, p, why in out.failed[:10])
                    + (" ..." if len(out.failed) > 10 else ""))
    return out



def sharded_proposals(records: Sequence[ImageRecord], cache_dir: Union[str, os.PathLike], cfg,
                      workers: Optional[int] = None, progress: bool = True) -> ProposalSet:
    """`compute_proposals` for every record, under torchrun too: each rank searches its share of
    the images (balanced by pixels, one log line per rank) into the shared cache, then every rank
    reads all of them back.  In one process it is compute_proposals."""
    from detector.distributed import barrier, log_shard, shard, world

    mine = shard([r.width * r.height for r in records])
    log_shard("proposals", len(mine))
    props = compute_proposals([records[i] for i in mine], cache_dir, cfg, workers=workers, progress=progress)
    if world().distributed:  # the other ranks' images, from the shared cache
        barrier()
        props = compute_proposals(records, cache_dir, cfg, workers=workers, progress=False)
    return props

def _run_pool(todo: list, workers: int, done, bar, cache_dir: Path, worker=None) -> None:
    """Run `todo` in spawned processes.  If a process dies (a crash inside OpenCV, the
    out-of-memory killer), the unfinished images are retried one process each, so only
    the image that kills its process is lost."""
    worker = worker or _worker
    ctx = get_context("spawn")  # fork after torch/OpenMP start-up is unsafe
    pending = {t[0]: t for t in todo}

    def run(tasks: list, n: int) -> None:
        ex = ProcessPoolExecutor(n, mp_context=ctx, initializer=_init_worker)
        try:
            for fut in as_completed([ex.submit(worker, t) for t in tasks]):
                i, boxes, err, _ = fut.result()
                del pending[i]
                done(i, boxes, err)
                bar.update()
        except BaseException:  # a dead worker or Ctrl-C: don't wait for the queued images
            ex.shutdown(wait=False, cancel_futures=True)
            raise
        ex.shutdown()

    try:
        run(todo, min(workers, len(todo)))
        return
    except BrokenProcessPool:
        log.warning("a proposal worker process died; retrying the %d unfinished images one process each",
                    len(pending))
    first = len(pending) == len(todo)
    for task in list(pending.values()):
        try:
            run([task], 1)
        except BrokenProcessPool as e:
            if first:  # nothing ever finished: the workers cannot run at all
                raise RuntimeError(
                    f"proposal worker processes die before finishing any image ({e}). A calling script "
                    f"without an `if __name__ == '__main__':` guard does this (spawned workers need it); "
                    f"finished images are cached in {cache_dir}") from e
            del pending[task[0]]
            done(task[0], None, "its worker process died (a crash or out of memory)")
            bar.update()
        first = False


def _fail(out: ProposalSet, results: list, i: int, iid: str, path: str, why: str) -> None:
    log.warning("%s: skipped, no proposals (%s)", path, why)
    out.failed.append((iid, path, why))
    results[i] = np.zeros((0, 4), np.float32)


def proposals_for(records: Sequence[ImageRecord], proposals: dict) -> list[np.ndarray]:
    """Proposal arrays in record order; a clear error names the first records without any entry."""
    missing = [r.image_id for r in records if r.image_id not in proposals]
    if missing:
        raise ProposalsError(f"no proposals for {len(missing)} of {len(records)} images, first: {missing[:5]}")
    return [np.asarray(proposals[r.image_id], np.float32).reshape(-1, 4) for r in records]
