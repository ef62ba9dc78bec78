"""Reading published proposals (R-CNN / Fast R-CNN .mat) and our own proposal file.

R-CNN / Fast R-CNN selective-search files (e.g. voc_2007_test.mat):
  `boxes`  cell array, one [n, 4] matrix per image, rows `y1 x1 y2 x2`,
           1-based inclusive pixel indices;
  `images` cell array of image ids (optional here; without it, entries are
           matched to the dataset by position).
A row becomes our `x1-1, y1-1, x2, y2` (0-based continuous: a 1-based inclusive
range a..b covers [a-1, b)).

Our own file (`.npz`, written by write_proposals_npz):
  `format`     "spp-proposals/1"
  `image_ids`  [N] str
  `offsets`    [N+1] int64, offsets[0] = 0; image i's boxes are boxes[offsets[i]:offsets[i+1]]
  `boxes`      [M, 4] float32, x1 y1 x2 y2, 0-based continuous pixel coordinates
               (pixel i covers [i, i+1)), each image's boxes best first.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Mapping, Optional, Sequence, Union

import numpy as np

from detector.cache import atomic_save_npz
from detector.errors import ProposalsError

NPZ_FORMAT = "spp-proposals/1"
PathLike = Union[str, os.PathLike]


def _preview(ids: Sequence[str], k: int = 5) -> str:
    ids = list(ids)
    return ", ".join(repr(i) for i in ids[:k]) + (", ..." if len(ids) > k else "")


def _select(path: PathLike, found: list[str], boxes: list[np.ndarray],
            image_ids: Optional[Sequence[str]]) -> dict[str, np.ndarray]:
    """Entries keyed by id; with `image_ids`, exactly those (in that order), or a clear error."""
    pos: dict[str, int] = {}
    for i, iid in enumerate(found):
        if iid in pos:
            raise ProposalsError(f"{path}: image id {iid!r} occurs twice in the file")
        pos[iid] = i
    if image_ids is None:
        return {iid: boxes[i] for iid, i in pos.items()}
    missing = [iid for iid in image_ids if iid not in pos]
    if missing:
        raise ProposalsError(f"{path}: {len(missing)} of the dataset's {len(image_ids)} image ids have no "
                             f"proposals in the file, first: {_preview(missing)}; the file has "
                             f"{len(found)} images, first: {_preview(found)}")
    return {iid: boxes[pos[iid]] for iid in image_ids}


def _mat_cells(arr, path: PathLike, var: str) -> list:
    if not isinstance(arr, np.ndarray):
        raise ProposalsError(f"{path}: variable '{var}' is not an array")
    if arr.dtype == object:
        return list(arr.ravel(order="F"))  # MATLAB cell arrays are column-major
    raise ProposalsError(f"{path}: variable '{var}' should be a cell array (one entry per image), "
                         f"got a {arr.dtype} array of shape {arr.shape}")


def _mat_string(x) -> str:
    a = np.asarray(x)
    if a.dtype.kind == "U":
        return "".join(a.ravel().tolist()).strip()
    if a.dtype == object and a.size == 1:
        return _mat_string(a.ravel()[0])
    if a.dtype.kind in "iuf" and a.size:  # ids stored as numbers
        v = a.ravel()[0]
        return str(int(v)) if float(v).is_integer() else str(v)
    raise ProposalsError(f"cannot read an image id from {a!r}")


def rcnn_to_xyxy(rows: np.ndarray) -> np.ndarray:
    """R-CNN rows `y1 x1 y2 x2` (1-based inclusive) -> our [x1, y1, x2, y2] float32."""
    r = np.asarray(rows, np.float64).reshape(-1, 4)
    return np.stack([r[:, 1] - 1, r[:, 0] - 1, r[:, 3], r[:, 2]], 1).astype(np.float32)


def load_rcnn_mat(path: PathLike, image_ids: Optional[Sequence[str]] = None) -> dict[str, np.ndarray]:
    """R-CNN / Fast R-CNN selective-search boxes, converted to our convention.

    With `image_ids` (the dataset split's ids) the result has exactly those
    keys, in that order: matched by the file's `images` list when it has one
    (any order, extra ids ignored), else by position (then the counts must be
    equal).  A mismatch raises ValueError naming the first differing ids.
    """
    import scipy.io

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: proposal file not found")
    try:
        mat = scipy.io.loadmat(str(path))
    except NotImplementedError as e:  # scipy's message for v7.3 (HDF5) files
        raise ProposalsError(f"{path}: MATLAB v7.3 (HDF5) files are not supported; re-save it in MATLAB "
                             f"with save(..., '-v7') ({e})") from e
    except (ValueError, OSError, TypeError) as e:
        raise ProposalsError(f"{path}: not a readable MATLAB .mat file ({e})") from e
    names = sorted(k for k in mat if not k.startswith("__"))
    if "boxes" not in mat:
        raise ProposalsError(f"{path}: no 'boxes' variable (found: {', '.join(names) or 'none'})")
    cells = _mat_cells(mat["boxes"], path, "boxes")
    boxes = []
    for i, c in enumerate(cells):
        a = np.asarray(c)
        if a.size == 0:
            boxes.append(np.zeros((0, 4), np.float32))
            continue
        if a.ndim != 2 or a.shape[1] != 4 or a.dtype.kind not in "iuf":
            raise ProposalsError(f"{path}: boxes entry {i + 1} should be a numeric n x 4 matrix "
                                 f"(y1 x1 y2 x2), got {a.dtype} of shape {a.shape}")
        boxes.append(rcnn_to_xyxy(a))

    if "images" in mat:
        try:
            imgs = mat["images"]
            if isinstance(imgs, np.ndarray) and imgs.dtype.kind == "U":  # a char matrix, one id per row
                found = [str(s).strip() for s in imgs.ravel()]
            else:
                found = [_mat_string(x) for x in _mat_cells(imgs, path, "images")]
        except ValueError as e:
            raise ProposalsError(f"{path}: cannot read the 'images' variable ({e})") from e
        if len(found) != len(boxes):
            raise ProposalsError(f"{path}: 'images' has {len(found)} entries but 'boxes' has {len(boxes)}")
        return _select(path, found, boxes, image_ids)
    if image_ids is None:
        raise ProposalsError(f"{path}: the file has no 'images' variable, so give the dataset's image ids "
                             f"to match its {len(boxes)} entries by position")
    if len(image_ids) != len(boxes):
        raise ProposalsError(f"{path}: the file has no 'images' variable, so its boxes can only be matched "
                             f"by position, but it has {len(boxes)} entries and the dataset has "
                             f"{len(image_ids)} images (first ids: {_preview(image_ids)})")
    return dict(zip(image_ids, boxes))


def write_proposals_npz(path: PathLike, proposals: Mapping[str, np.ndarray]) -> None:
    """Write {image_id: [n, 4] boxes} in our own format (see the module docstring), atomically."""
    ids = [str(k) for k in proposals]
    arrays = []
    for iid in ids:
        a = np.asarray(proposals[iid], np.float32)
        if a.size == 0:
            a = a.reshape(0, 4)
        if a.ndim != 2 or a.shape[1] != 4:
            raise ProposalsError(f"proposals of {iid!r}: expected an [n, 4] array, got shape {a.shape}")
        arrays.append(a)
    offsets = np.zeros(len(ids) + 1, np.int64)
    offsets[1:] = np.cumsum([len(a) for a in arrays])
    boxes = np.concatenate(arrays) if arrays else np.zeros((0, 4), np.float32)
    atomic_save_npz(path, format=np.array(NPZ_FORMAT), image_ids=np.array(ids, dtype=str),
                    offsets=offsets, boxes=boxes)


def read_proposals_npz(path: PathLike, image_ids: Optional[Sequence[str]] = None) -> dict[str, np.ndarray]:
    """Read our own format; with `image_ids`, exactly those (any order in the file) or a clear error."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: proposal file not found")
    try:
        with np.load(path, allow_pickle=False) as z:
            data = {k: z[k] for k in z.files}
    except (OSError, ValueError, EOFError) as e:
        raise ProposalsError(f"{path}: not a readable .npz file ({e})") from e
    need = {"image_ids", "offsets", "boxes"}
    if not need <= set(data):
        raise ProposalsError(f"{path}: not a proposal file: needs arrays {sorted(need)}, has {sorted(data)}")
    fmt = str(data["format"]) if "format" in data else NPZ_FORMAT
    if fmt != NPZ_FORMAT:
        raise ProposalsError(f"{path}: format {fmt!r} is not {NPZ_FORMAT!r}")
    ids, off, boxes = data["image_ids"].reshape(-1), data["offsets"].reshape(-1), data["boxes"]
    if (boxes.ndim != 2 or boxes.shape[1] != 4) and boxes.size:
        raise ProposalsError(f"{path}: 'boxes' should be [M, 4], got shape {boxes.shape}")
    boxes = boxes.reshape(-1, 4).astype(np.float32)
    if (len(off) != len(ids) + 1 or off.dtype.kind not in "iu" or (len(off) and off[0] != 0)
            or np.any(np.diff(off) < 0) or off[-1] != len(boxes)):
        raise ProposalsError(f"{path}: 'offsets' must be {len(ids) + 1} non-decreasing integers from 0 to "
                             f"{len(boxes)} (the number of boxes)")
    found = [str(i) for i in ids]
    per = [boxes[off[i]:off[i + 1]] for i in range(len(found))]
    return _select(path, found, per, image_ids)


def dataset_proposals(path: PathLike, records: Sequence) -> dict[str, np.ndarray]:
    """A proposals file's boxes for every record (an ImageRecord: image_id, width, height),
    each checked to lie inside its image; a missing id or a bad box names the file."""
    from detector.core.boxes import check_boxes

    props = load_proposals(path, [r.image_id for r in records])
    for r in records:
        props[r.image_id] = check_boxes(props[r.image_id], r.width, r.height,
                                        f"{path}: proposals of {r.image_id}").astype(np.float32)
    return props


def load_proposals(path: PathLike, image_ids: Optional[Sequence[str]] = None) -> dict[str, np.ndarray]:
    """Published (.mat) or our own (.npz) proposals, keyed by image id, in our convention."""
    suffix = Path(path).suffix.lower()
    if suffix == ".mat":
        return load_rcnn_mat(path, image_ids)
    if suffix == ".npz":
        return read_proposals_npz(path, image_ids)
    raise ProposalsError(f"{path}: unknown proposal file type {suffix!r}; expected .mat (R-CNN) or .npz (ours)")
