"""Atomic, content-keyed cache files.

Every cache file is written to a temporary name in the same directory and then
`os.replace`d into place, so an interrupted run never leaves a half-written file
that a later run would trust.  Keys hash everything that produced the file
(image bytes, backbone, weights, parameters), so a changed setting can never
read a stale entry.
"""
from __future__ import annotations

import errno
import hashlib
import io
import json
import os
import shutil
import tempfile
import threading
import zipfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Mapping, Optional

import numpy as np

from detector.errors import DiskError

_CHUNK = 1 << 20
_UMASK_LOCK = threading.Lock()


def file_digest(path: str | os.PathLike, length: int = 16) -> str:
    """Hex digest of a file's bytes (sha1, truncated); used to key caches by content."""
    h = hashlib.sha1()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(_CHUNK), b""):
            h.update(chunk)
    return h.hexdigest()[:length]


def params_digest(params: Mapping[str, Any], length: int = 12) -> str:
    """Stable digest of a JSON-serialisable mapping of parameters."""
    blob = json.dumps(params, sort_keys=True, default=str).encode()
    return hashlib.sha1(blob).hexdigest()[:length]


def arrays_digest(arrays: Mapping[str, np.ndarray], length: int = 16) -> str:
    """Digest of named arrays' names, dtypes, shapes and bytes (trained weights as a cache key)."""
    h = hashlib.sha256()
    for k in sorted(arrays):
        a = np.ascontiguousarray(arrays[k])
        h.update(f"{k}:{a.dtype.str}:{a.shape};".encode())
        h.update(a.tobytes())
    return h.hexdigest()[:length]


def current_umask() -> int:
    """The process umask, read without changing it where the OS allows (Linux), else set and restored."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except OSError:
        pass
    with _UMASK_LOCK:
        mask = os.umask(0o022)
        os.umask(mask)
    return mask


DISK_ERRNOS = {errno.ENOSPC: "no space left on device", errno.EDQUOT: "disk quota exceeded",
               errno.EROFS: "read-only file system"}


def _mb(n: float) -> str:
    return f"{n / 1e6:.1f} MB" if n >= 1e5 else f"{n / 1e3:.1f} kB"


def disk_error(e: OSError, folder: str | os.PathLike, what: str = "", needed: Optional[int] = None) -> DiskError:
    """The one-line DiskError for an OSError whose errno is in DISK_ERRNOS: which folder, what was
    being written, how much it needed and how much is free, and what to do."""
    folder = Path(folder)
    free = ""
    try:
        free = f"; {_mb(shutil.disk_usage(folder if folder.exists() else folder.parent).free)} free"
    except OSError:
        pass
    writing = f" writing {what}" if what else ""
    need = f" ({_mb(needed)} needed{free})" if needed is not None else (f" ({free[2:]})" if free else "")
    return DiskError(f"{folder}: {DISK_ERRNOS[e.errno]}{writing}{need}. Free some space (or point --cache / --out "
                     f"at another disk) and run the same command again: finished work is kept")


@contextmanager
def writing_to(folder: str | os.PathLike, what: str = "", needed: Optional[int] = None):
    """Turn a full disk, an exceeded quota or a read-only file system met while writing into
    `folder` into one DiskError naming it; any other OSError passes through unchanged."""
    try:
        yield
    except OSError as e:
        if e.errno in DISK_ERRNOS:
            raise disk_error(e, folder, what, needed) from None
        raise


def make_dir(folder: str | os.PathLike) -> Path:
    """mkdir -p, with a full or read-only disk reported as a DiskError naming the folder."""
    folder = Path(folder)
    with writing_to(folder):
        folder.mkdir(parents=True, exist_ok=True)
    return folder


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write to a temporary file beside `path`, then rename it into place.  The file gets the
    mode a plain open() would give (0666 minus the umask), not mkstemp's private 0600, so
    models and caches can be shared with other users and services.  A full or read-only disk
    is a DiskError naming the folder and the size, and leaves no partial file behind."""
    path = Path(path)
    with writing_to(path.parent, path.name, len(data)):
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        try:
            os.fchmod(fd, 0o666 & ~current_umask())
            with os.fdopen(fd, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:
            try:
                os.unlink(tmp)
            except FileNotFoundError:
                pass
            raise


def atomic_save_npz(path: str | os.PathLike, **arrays: np.ndarray) -> None:
    """np.savez into memory, then an atomic write (no pickles: allow_pickle stays off on load)."""
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    atomic_write_bytes(path, buf.getvalue())


def load_npz(path: str | os.PathLike) -> dict[str, np.ndarray] | None:
    """Load a cache file; a missing or unreadable (truncated, corrupt) file reads as a miss."""
    try:
        with np.load(path, allow_pickle=False) as z:
            return {k: z[k] for k in z.files}
    except FileNotFoundError:
        return None
    except (OSError, ValueError, EOFError, KeyError, zipfile.BadZipFile) as e:  # corrupt entry: recompute it
        import warnings

        warnings.warn(f"cache file {path} is unreadable ({e}); recomputing it")
        return None


def save_checkpoint(path: str | os.PathLike, state: Mapping[str, Any]) -> None:
    """torch.save into memory, then an atomic write: an interrupted run never leaves half a
    checkpoint.  The one checkpoint writer (fine-tuning, the classifier's training)."""
    import torch

    buf = io.BytesIO()
    torch.save(dict(state), buf)
    atomic_write_bytes(path, buf.getvalue())


def load_checkpoint(path: str | os.PathLike) -> dict | None:
    """A checkpoint `save_checkpoint` wrote, or None when there is none.  Tensors and plain
    types only (weights_only): loading runs no pickled code."""
    import torch

    if not Path(path).is_file():
        return None
    return torch.load(path, map_location="cpu", weights_only=True)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    atomic_write_bytes(path, text.encode())


def atomic_write_json(path: str | os.PathLike, obj: Any) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n").encode())
