"""Shared helpers of the benchmark scripts: paths, the machine description, medians, tables.

The scripts are run as files (`python bench/x.py`), so this module puts the repo root on
sys.path for them; `import common` then works because the script's folder is on it too.
"""
from __future__ import annotations

import datetime
import os
import platform
import sys
from pathlib import Path
from typing import Iterable, Sequence

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

# Defaults are resolved against the repo root, so the commands work from any working directory;
# paths given on the command line are taken as given (relative to the working directory).
DEFAULT_DATASET = str((ROOT / ".." / "shared" / "datasets" / "BCCD").resolve())
DEFAULT_MODEL = str(ROOT / "data" / "runs" / "bccd" / "model.safetensors")
DEFAULT_CACHE = str(ROOT / "data" / "cache")
DEFAULT_CONFIG = str(ROOT / "configs" / "bccd.yaml")
FIVE_SCALES = [480, 576, 688, 864, 1200]


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def machine_lines() -> list[str]:
    import cv2
    import numpy as np
    import torch
    import torchvision

    usable = f", usable by this process = {len(os.sched_getaffinity(0))}" if hasattr(os, "sched_getaffinity") else ""
    lines = [f"date:     {datetime.datetime.now().astimezone().isoformat(timespec='seconds')}",
             f"cpu:      {cpu_model()}",
             f"cores:    os.cpu_count() = {os.cpu_count()}{usable}",
             f"threads:  torch.get_num_threads() = {torch.get_num_threads()}, "
             f"cv2.getNumThreads() = {cv2.getNumThreads()}",
             f"versions: python {platform.python_version()}, torch {torch.__version__}, torchvision "
             f"{torchvision.__version__}, opencv {cv2.__version__}, numpy {np.__version__}",
             f"gpu:      {torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'none (CPU run)'}"]
    if hasattr(os, "getloadavg"):
        # A load above the core count means something else competes for the CPU: timings are then inflated.
        lines.append("load:     1/5/15-min load average = " + " / ".join(f"{v:.2f}" for v in os.getloadavg()))
    return lines


def print_header(title: str, argv: Sequence[str] | None = None) -> None:
    print(f"# {title}")
    print("# command: " + " ".join([Path(sys.executable).name] + list(sys.argv if argv is None else argv)))
    for line in machine_lines():
        print("# " + line)
    print()


def median(values: Iterable[float]) -> float:
    import numpy as np

    v = list(values)
    return float(np.median(v)) if v else float("nan")


def parse_int_list(text: str, what: str) -> list[int]:
    try:
        out = [int(v) for v in text.replace(" ", "").split(",") if v]
    except ValueError:
        raise SystemExit(f"{what} must be a comma-separated list of integers, got {text!r}") from None
    if not out:
        raise SystemExit(f"{what} is empty")
    return out


def table(header: Sequence[str], rows: Sequence[Sequence], align: str | None = None) -> str:
    """A plain-text table; numbers are expected to be formatted already. align: 'l'/'r' per column."""
    cells = [[str(c) for c in header]] + [[str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    align = align or ("l" + "r" * (len(header) - 1))

    def fmt(r):
        return "  ".join(c.ljust(w) if a == "l" else c.rjust(w) for c, w, a in zip(r, widths, align)).rstrip()

    return "\n".join([fmt(cells[0]), "  ".join("-" * w for w in widths)] + [fmt(r) for r in cells[1:]])


def check_target(ok: bool) -> str:
    return "meets target" if ok else "MISSES target"


def first_by_id(records: Sequence, n: int | None) -> list:
    """The first n records sorted by image id (all when n is None or 0): a fixed, documented subset."""
    out = sorted(records, key=lambda r: r.image_id)
    return out if not n else out[:n]
