"""Many processes under torchrun (gloo on localhost): the same caches, rows, detections and
mAP as one process, faults that name the rank and resume, and bad set-ups refused."""
import hashlib
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from detector.distributed import shard

ROOT = Path(__file__).resolve().parents[1]
SMOKE = str(ROOT / "configs" / "smoke.yaml")


def test_shards_are_balanced_by_cost_deterministic_and_cover_everything():
    costs = np.random.default_rng(0).uniform(1, 10, 101)
    parts = [shard(costs, 4, r) for r in range(4)]
    assert sorted(np.concatenate(parts).tolist()) == list(range(101))
    loads = [costs[p].sum() for p in parts]
    assert max(loads) - min(loads) <= costs.max()  # greedy LPT: within one item of each other
    assert all(np.array_equal(shard(costs, 4, r), parts[r]) for r in range(4))
    assert shard(costs, 1, 0).tolist() == list(range(101))
    # by cost, not count: one huge image is a shard of its own
    assert shard([100, 1, 1, 1, 1], 2, 0).tolist() == [0]


def _env(**extra):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", SPP_DIST_TIMEOUT="60")
    env.pop("SPP_FAULT_INJECT", None)
    env.update(extra)
    return env


def _torchrun(script, args, nproc=2, extra=(), env=None, timeout=300):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}", *extra,
           str(ROOT / "tools" / script), *args]
    return subprocess.run(cmd, capture_output=True, text=True, env=env or _env(), timeout=timeout, cwd=ROOT)


def _single(script, args, env=None, timeout=300):
    return subprocess.run([sys.executable, str(ROOT / "tools" / script), *args], capture_output=True, text=True,
                          env=env or _env(), timeout=timeout, cwd=ROOT)


def _files(folder: Path) -> dict:
    return {p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file() and not p.name.startswith(".")}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """One process and two processes, same data, separate caches (1 thread per process both ways:
    oneDNN's convolutions round differently with other thread counts)."""
    from detector.datasets.synthetic import make_synthetic

    tmp = tmp_path_factory.mktemp("dist")
    data = make_synthetic(tmp / "data", num_train=12, num_test=4, image_size=(160, 120), seed=7)
    out = {"tmp": tmp, "data": data}
    for name, run in (("one", _single), ("two", _torchrun)):
        train = run("train.py", ["--dataset", str(data), "--out", str(tmp / name), "--cache", str(tmp / f"c_{name}"),
                                 "--config", SMOKE, "--quiet"])
        assert train.returncode == 0, train.stdout[-3000:] + train.stderr[-3000:]
        test = run("test_voc.py", ["--model", str(tmp / name / "model.safetensors"), "--dataset", str(data),
                                   "--split", "test", "--cache", str(tmp / f"c_{name}"), "--quiet"])
        assert test.returncode == 0, test.stdout[-3000:] + test.stderr[-3000:]
        out[name] = (train, test)
    return out


def test_two_processes_write_the_same_caches_byte_for_byte(runs):
    tmp = runs["tmp"]
    for kind in ("proposals", "features"):
        one, two = _files(tmp / "c_one" / kind), _files(tmp / "c_two" / kind)
        assert len(one) > 12 and one == two, kind


def test_each_rank_logs_its_share_of_every_sharded_stage(runs):
    train, test = runs["two"]
    text = train.stdout + train.stderr
    for stage in ("proposals", "features", "svm rows"):
        counts = [int(n) for n in re.findall(rf"rank [01]/2: {stage} (\d+) images", text)]
        assert len(counts) == 2 and sum(counts) == 12 and min(counts) > 0, (stage, counts)
    counts = [int(n) for n in re.findall(r"rank [01]/2: detect (\d+) images", test.stdout + test.stderr)]
    assert sorted(counts) == [2, 2]


def test_ddp_fine_tuning_matches_one_process_and_so_do_detections(runs):
    tmp = runs["tmp"]
    a, b = np.load(tmp / "one" / "finetune.npz"), np.load(tmp / "two" / "finetune.npz")
    assert a["pool5_scale"] == b["pool5_scale"]
    for k in a.files:
        np.testing.assert_allclose(a[k], b[k], rtol=1e-4, atol=1e-5, err_msg=k)
    maps = [float(re.search(r"mAP = (\d\.\d+)", t.stdout).group(1)) for _, t in (runs["one"], runs["two"])]
    assert abs(maps[0] - maps[1]) <= 0.01, maps
    for f in sorted((tmp / "one" / "test_test").glob("comp4_det_test_*.txt")):
        one = [line.split()[0] for line in f.read_text().splitlines()[:20]]
        two = [line.split()[0] for line in (tmp / "two" / "test_test" / f.name).read_text().splitlines()[:20]]
        assert one == two, f.name  # the same images at the top of every class's ranking


def test_svm_rows_and_models_from_the_same_head_are_identical(runs):
    """Two processes redo the SVM and regression stages from the one-process run's fine-tuned
    head: svm.npz and bbox.npz come out bit for bit equal."""
    import shutil

    tmp = runs["tmp"]
    shutil.copytree(tmp / "one", tmp / "rows")
    for f in ("svm.npz", "bbox.npz", "model.safetensors"):
        (tmp / "rows" / f).unlink()
    p = _torchrun("train.py", ["--dataset", str(runs["data"]), "--out", str(tmp / "rows"), "--cache",
                               str(tmp / "c_one"), "--config", SMOKE, "--quiet"])
    assert p.returncode == 0, p.stderr[-3000:]
    assert "reused: finetune" in p.stdout
    for f in ("svm.npz", "bbox.npz"):
        x, y = np.load(tmp / "one" / f), np.load(tmp / "rows" / f)
        assert sorted(x.files) == sorted(y.files) and all(np.array_equal(x[k], y[k]) for k in x.files), f


def test_a_killed_rank_is_named_and_the_rerun_resumes_to_the_same_model(runs):
    tmp = runs["tmp"]
    args = ["--dataset", str(runs["data"]), "--out", str(tmp / "killed"), "--cache", str(tmp / "c_two"),
            "--config", SMOKE, "--quiet"]
    p = _torchrun("train.py", args, env=_env(SPP_FAULT_INJECT="1:finetune"))
    assert p.returncode != 0 and re.search(r"rank\s*: 1 \(local_rank: 1\)", p.stderr), p.stderr[-2000:]
    assert not (tmp / "killed" / "model.safetensors").exists()
    p = _torchrun("train.py", args)
    assert p.returncode == 0, p.stderr[-3000:]
    same = (tmp / "two" / "model.safetensors").read_bytes() == (tmp / "killed" / "model.safetensors").read_bytes()
    assert same, "the resumed run's model differs from the uninterrupted one"


def test_torchrun_restarts_after_a_kill_and_finishes_the_same_model(runs):
    tmp = runs["tmp"]
    p = _torchrun("train.py", ["--dataset", str(runs["data"]), "--out", str(tmp / "restarted"), "--cache",
                               str(tmp / "c_two"), "--config", SMOKE, "--quiet"],
                  extra=("--max-restarts=1",), env=_env(SPP_FAULT_INJECT="1:svm"))
    assert p.returncode == 0, p.stderr[-3000:]
    assert (tmp / "two" / "model.safetensors").read_bytes() == (tmp / "restarted" / "model.safetensors").read_bytes()


def _wrapper(tmp: Path, body: str) -> Path:
    """A script torchrun can start that runs tools/train.py with per-rank arguments."""
    p = tmp / "per_rank_train.py"
    p.write_text(f"import os, sys\nsys.path.insert(0, {str(ROOT)!r})\nfrom detector.cli import run_tool\n"
                 f"from tools.train import main\nrank = int(os.environ['RANK'])\n{body}\n"
                 "sys.exit(run_tool(main, argv))\n")
    return p


@pytest.mark.parametrize("body,message", [
    ("argv = ARGS + ['--set', f'svm.C={{0.001 * (rank + 1)}}']", "different configs"),
    ("argv = ARGS[:-2] + ['--cache', CACHE + str(rank)]", "is not shared"),
])
def test_ranks_that_disagree_are_refused(runs, body, message):
    tmp = runs["tmp"]
    cache = str(tmp / "c_bad")
    args = ["--dataset", str(runs["data"]), "--out", str(tmp / "bad"), "--config", SMOKE, "--quiet", "--cache", cache]
    script = _wrapper(tmp, f"ARGS = {args!r}\nCACHE = {cache!r}\n" + body.replace("{{", "{").replace("}}", "}"))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", str(script)]
    p = subprocess.run(cmd, capture_output=True, text=True, env=_env(), timeout=300, cwd=ROOT)
    errors = [line for line in p.stderr.splitlines() if line.startswith("error: rank")]
    assert p.returncode != 0 and errors and message in errors[0], p.stderr[-2000:]


def test_an_unreachable_rendezvous_is_one_error_line_naming_it(tmp_path):
    import socket

    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = _env(WORLD_SIZE="2", RANK="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port),
               SPP_DIST_TIMEOUT="3")
    p = _single("train.py", ["--dataset", "x", "--out", str(tmp_path)], env=env, timeout=60)
    errors = [line for line in p.stderr.splitlines() if line.startswith("error:")]
    assert p.returncode == 2 and len(errors) == 1 and f"127.0.0.1:{port}" in errors[0], p.stderr[-2000:]


def test_classification_tools_under_torchrun_match_one_process(tmp_path):
    """The classifier's conv maps split over two ranks: the same cache bytes, the same model
    file and the same test figures as one process; each rank logs its share."""
    from test_classifier import make_folder

    data = make_folder(tmp_path / "data", n_train=4, n_test=2)
    cfg = str(ROOT / "configs" / "classifier_smoke.yaml")
    out = {}
    for name, run in (("one", _single), ("two", _torchrun)):
        train = run("train_classifier.py", ["--dataset", str(data), "--out", str(tmp_path / name), "--cache",
                                            str(tmp_path / f"c_{name}"), "--config", cfg, "--quiet"])
        assert train.returncode == 0, train.stdout[-3000:] + train.stderr[-3000:]
        test = run("test_classifier.py", ["--model", str(tmp_path / name / "model.safetensors"), "--dataset",
                                          str(data), "--views", "10", "--quiet"])
        assert test.returncode == 0, test.stdout[-3000:] + test.stderr[-3000:]
        out[name] = (train.stdout, test.stdout)
    one, two = _files(tmp_path / "c_one"), _files(tmp_path / "c_two")
    assert len(one) >= 12 and one == two
    model_one, model_two = _files(tmp_path / "one"), _files(tmp_path / "two")
    for f in (model_one, model_two):
        f.pop("train_summary.json")  # holds the wall time
    assert "model.safetensors" in model_one and model_one == model_two
    assert out["one"][1].splitlines()[-2:] == out["two"][1].splitlines()[-2:]
    for r in (0, 1):
        assert re.search(rf"rank {r}/2: conv maps \d+ images", out["two"][0])
        assert re.search(rf"rank {r}/2: classify \d+ images", out["two"][1])
    assert out["two"][0].count("model: ") == 1
