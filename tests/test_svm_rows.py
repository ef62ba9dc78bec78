"""Per-image row files: regression trained from rows read on demand equals regression on the
same rows held in memory."""
import numpy as np

from detector.detection.bbox_regression import train_box_regressors
from detector.detection.train.rows import RowStore, regression_examples


def test_regression_from_stored_rows_equals_in_memory_arrays(tmp_path):
    rng = np.random.default_rng(0)
    store = RowStore(tmp_path / "rows")
    arrays = []
    for i in range(7):
        n = int(rng.integers(0, 40))
        boxes = rng.uniform(0, 50, (n, 2))
        boxes = np.concatenate([boxes, boxes + rng.uniform(5, 40, (n, 2))], 1).astype(np.float32)
        gt = (boxes + rng.normal(0, 2, boxes.shape)).astype(np.float32)
        gt[:, 2:] = np.maximum(gt[:, 2:], gt[:, :2] + 1)
        z = {"x": rng.normal(size=(n, 30)).astype(np.float16), "boxes": boxes, "gt": gt,
             "labels": rng.integers(0, 3, n).astype(np.int64)}
        store.write(i, **z)
        arrays.append(z)
    stored = regression_examples(store, 7)
    memory = {k: np.concatenate([z[k] for z in arrays]) for k in ("x", "boxes", "gt", "labels")}
    assert stored["x"].shape == memory["x"].shape
    rows = np.array([0, 3, 5, 40, 41, len(memory["x"]) - 1])
    np.testing.assert_array_equal(stored["x"][rows], memory["x"][rows])
    np.testing.assert_array_equal(stored["x"][2:9], memory["x"][2:9])
    a = train_box_regressors(stored["x"], stored["boxes"], stored["gt"], stored["labels"], 3, lam=10.0)
    b = train_box_regressors(memory["x"], memory["boxes"], memory["gt"], memory["labels"], 3, lam=10.0)
    for k, v in a.to_arrays().items():
        np.testing.assert_array_equal(v, b.to_arrays()[k])
