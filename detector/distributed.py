"""Runs over several processes and machines, launched by `torchrun` (torch.distributed).

Every long tool calls `init_from_env()` first.  Without torchrun's environment (WORLD_SIZE
unset or 1) it does nothing and every helper below degenerates to the single-process case,
so the same code runs both ways.  Under torchrun it joins the process group: gloo on CPUs,
NCCL when the process has a GPU (`SPP_DIST_BACKEND` or `--dist-backend` overrides).

What is split, and how (docs/design.md, "Many processes"):
- per-image stages (proposals, conv maps, the SVM/regression rows, test-time detection)
  take a shard of the images each: `shard()` balances the shards by cost (pixels x scales),
  deterministically, so every rank computes the same split without talking;
- caches live in a folder every rank can read and write (a shared file system across
  machines): each file is written atomically by the rank that computes it, and a barrier
  separates the stages; `check_shared_folder()` refuses a folder that is not shared;
- fine-tuning runs under DistributedDataParallel with the same global batch;
- SVM training, box regression and scoring run on rank 0.
"""
from __future__ import annotations

import hashlib
import os
import socket
import time
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np

from detector.errors import InputError


class DistributedError(InputError, RuntimeError):
    """The process group cannot be formed or its members disagree (config, cache folder)."""


@dataclass(frozen=True)
class World:
    rank: int = 0
    size: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.size > 1

    def __str__(self) -> str:
        return f"rank {self.rank}/{self.size}"


SINGLE = World()
_world = SINGLE


def world() -> World:
    return _world


def _backend(requested: Optional[str]) -> str:
    import torch

    b = requested or os.environ.get("SPP_DIST_BACKEND") or ("nccl" if torch.cuda.is_available() else "gloo")
    if b not in ("gloo", "nccl"):
        raise DistributedError(f"distributed backend must be gloo or nccl, got {b!r}")
    return b


def _check_reachable(addr: str, port: str, timeout: float) -> None:
    """Fail with the endpoint's name, rather than hang, when the rendezvous cannot be reached."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            with socket.create_connection((addr, int(port)), timeout=min(5.0, timeout)):
                return
        except OSError as e:
            if time.monotonic() >= deadline:
                raise DistributedError(f"cannot reach the rendezvous at {addr}:{port} within {timeout:.0f} s ({e}); "
                                       "check --rdzv-endpoint / MASTER_ADDR and that the first node is up") from None
            time.sleep(0.5)


def init_from_env(backend: Optional[str] = None, timeout_s: Optional[float] = None) -> World:
    """Join the torchrun process group if there is one; returns this process's World.
    timeout_s (default: SPP_DIST_TIMEOUT or 1800 s): how long to wait for the rendezvous and
    for any collective (a stage's barrier waits for the slowest rank)."""
    global _world
    timeout_s = float(os.environ.get("SPP_DIST_TIMEOUT", "1800")) if timeout_s is None else timeout_s
    size = int(os.environ.get("WORLD_SIZE", "1"))
    if size <= 1:
        _world = SINGLE
        return _world
    import torch
    import torch.distributed as dist

    rank, local = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if not dist.is_initialized():
        addr, port = os.environ.get("MASTER_ADDR", "127.0.0.1"), os.environ.get("MASTER_PORT", "29500")
        if rank != 0:
            _check_reachable(addr, port, timeout_s)
        b = _backend(backend)
        if b == "nccl":
            torch.cuda.set_device(local)
        try:
            dist.init_process_group(b, timeout=timedelta(seconds=timeout_s), **_attempt_store(rank, size, timeout_s))
        except Exception as e:  # the rendezvous's errors come in several types
            raise DistributedError(f"rank {rank}: cannot join the process group at {addr}:{port} ({e})") from None
    _world = World(rank, size, local)
    import atexit

    atexit.register(_leave)
    return _world


def _leave() -> None:
    import torch.distributed as dist

    if dist.is_initialized():
        dist.destroy_process_group()


def fault_point(stage: str) -> None:
    """A test aid: SPP_FAULT_INJECT=RANK:STAGE kills that rank with SIGKILL as the stage starts,
    on the first attempt only (not after a torchrun restart), to test the fault handling."""
    spec = os.environ.get("SPP_FAULT_INJECT")
    if spec == f"{_world.rank}:{stage}" and os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") == "0":
        import signal

        os.kill(os.getpid(), signal.SIGKILL)


def _attempt_store(rank: int, size: int, timeout_s: float) -> dict:
    """Under torchrun's agent store, a store prefix of our own per restart attempt.

    After `--max-restarts` brings the workers back, the agent's store still holds the dead
    attempt's gloo addresses under the default group's keys, and a fast rank could read its
    peer's old address before the peer overwrote it (seen as "Connection refused" now and
    then on a loaded machine).  A prefix per attempt keeps the attempts apart."""
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True":
        return {}
    import torch.distributed as dist

    attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
    store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), size, is_master=False,
                          timeout=timedelta(seconds=timeout_s))
    return {"store": dist.PrefixStore(f"sppnet/attempt_{attempt}", store), "rank": rank, "world_size": size}


@contextmanager
def all_local_cores():
    """Let this process use every core of its machine for a while (BLAS and torch threads).

    torchrun starts each process with one thread; while rank 0 trains the box regressors
    the other ranks wait at a barrier, so their cores are free for it."""
    if not _world.distributed:
        yield
        return
    import torch
    from threadpoolctl import threadpool_limits

    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    before = torch.get_num_threads()
    torch.set_num_threads(cores)
    try:
        with threadpool_limits(limits=cores):
            yield
    finally:
        torch.set_num_threads(before)


def barrier() -> None:
    if _world.distributed:
        import torch.distributed as dist

        dist.barrier()


def all_gather(obj: Any) -> list:
    """Every rank's `obj`, in rank order (on every rank)."""
    if not _world.distributed:
        return [obj]
    import torch.distributed as dist

    out: list = [None] * _world.size
    dist.all_gather_object(out, obj)
    return out


def broadcast(obj: Any) -> Any:
    """Rank 0's `obj` on every rank."""
    if not _world.distributed:
        return obj
    import torch.distributed as dist

    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def shard(costs: Sequence[float], size: Optional[int] = None, rank: Optional[int] = None) -> np.ndarray:
    """Indices of the items this rank takes: the costliest item first goes to the least loaded
    rank (ties to the lower rank), so the shards are balanced by cost, not by count; the same
    on every rank.  Returned in increasing order."""
    size = _world.size if size is None else size
    rank = _world.rank if rank is None else rank
    if size <= 1:
        return np.arange(len(costs))
    c = np.asarray(costs, np.float64)
    order = np.lexsort((np.arange(len(c)), -c))
    load = np.zeros(size)
    owner = np.empty(len(c), np.int64)
    for i in order:
        r = int(np.argmin(load))
        owner[i] = r
        load[r] += c[i]
    return np.flatnonzero(owner == rank)


def log_shard(stage: str, n: int, unit: str = "images") -> None:
    """One line per rank, always (also with --quiet), so a run shows how it was split."""
    if _world.distributed:
        import sys

        sys.stdout.write(f"{_world}: {stage} {n} {unit}\n")  # one write: ranks' lines do not interleave
        sys.stdout.flush()


def check_same_config(digest: str) -> None:
    """Refuse to run when the ranks were started with different settings."""
    digests = all_gather(digest)
    if len(set(digests)) > 1:
        raise DistributedError("the ranks were started with different configs (config digests by rank: "
                               + ", ".join(f"{r}: {d}" for r, d in enumerate(digests))
                               + "); give every node the same command, files and --set values")


def check_shared_folder(folder: Path) -> None:
    """Rank 0 writes a marker into `folder`; every rank must see it, else the caches would not
    be shared and each rank would miss the others' work."""
    if not _world.distributed:
        return
    from detector.cache import make_dir, writing_to

    folder = make_dir(folder)
    token = broadcast(hashlib.sha1(os.urandom(16)).hexdigest() if _world.main else None)
    marker = folder / f".shared_{token}"
    if _world.main:
        with writing_to(folder):
            marker.write_text(socket.gethostname())
    barrier()
    seen = marker.is_file()
    everyone = all_gather(seen)
    barrier()
    if _world.main:
        marker.unlink(missing_ok=True)
    if not all(everyone):
        missing = [r for r, s in enumerate(everyone) if not s]
        raise DistributedError(f"{folder} is not shared: rank(s) {missing} cannot see a file rank 0 wrote there. "
                               "Put --cache and --out on a file system every node mounts (NFS, Lustre, ...)")
