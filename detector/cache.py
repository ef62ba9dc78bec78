"""Atomic, content-keyed cache files.

Every cache file is written to a temporary name in the same directory and then
`os.replace`d into place, so an interrupted run never leaves a half-written file
that a later run would trust.  Keys hash everything that produced the file
(image bytes, backbone, weights, parameters), so a changed setting can never
read a stale entry.
"""
from __future__ import annotations

import hashlib
import io
import json
import os
import tempfile
import threading
import zipfile
from pathlib import Path
from typing import Any, Mapping

import numpy as np

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


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write to a temporary file beside `path`, then rename it into place.  The file gets the
    mode a plain open() would give (0666 minus the umask), not mkstemp's private 0600, so
    models and caches can be shared with other users and services."""
    path = Path(path)
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


def atomic_write_json(path: str | os.PathLike, obj: Any) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n").encode())
