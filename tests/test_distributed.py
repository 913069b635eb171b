"""Distributed training for real: torchrun launches two `protoedge train` processes (gloo on
loopback, the documented command), and their model must equal a one-process run with the same seed
and episodes per step; each side resumes from a checkpoint the other one wrote."""
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from protoedge.trainer import checkpoint as ckpt
from protoedge.trainer.config import ConfigError, recipe_config
from protoedge.trainer.distributed import Dist

torch.set_num_threads(1)

# Tiny, fp32 (bf16 rounding would swamp the comparison), two episodes per step; MNIST has no
# validation split, so no labelled logging either. k-means runs at step 2 and again at step 5.
SETTINGS = dict(pool_limit=600, ae_steps=2, ae_batch=16, aug_way=16, cluster_way=4, cluster_shot=1, cluster_query=1,
                cluster_ks=[20], cluster_start=0.3, cluster_every=0.4, recon_batch=8, log_every=1, width=16,
                episodes_per_step=2)
STEPS, SPLIT = 6, 3
ATOL = 1e-4  # measured differences are ~2e-7 (summation order in the gradient all-reduce)


def config(**kw):
    return recipe_config("default", "mnist", seed=3, steps=STEPS, precision="fp32", threads=1,
                         time_budget_s=300.0, **{**SETTINGS, **kw})


def torchrun(*sessions: list[str], cwd) -> None:
    """Two processes on this machine (python -m torch.distributed.run, i.e. torchrun; gloo on
    loopback), each running the `protoedge train` command lines given, one after the other."""
    sets = [x for k, v in SETTINGS.items() for x in ("--set", f"{k}={json.dumps(v)}")]
    common = ["train", "--protocol", "mnist", "--seed", "3", "--steps", str(STEPS), "--precision", "fp32",
              "--threads", "1", "--time-budget", "300", "--no-report", *sets]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           str(Path(__file__).with_name("distributed_worker.py")), *(json.dumps(common + s) for s in sessions)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MPLBACKEND": "Agg"}
    r = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]


def assert_same_model(a, b, atol=ATOL):
    ta, ma = ckpt.load_checkpoint(a)
    tb, mb = ckpt.load_checkpoint(b)
    assert ta.keys() == tb.keys()
    for k in ta:  # weights, BatchNorm statistics, optimizer moments, generator state, partitions
        if k.startswith("partition.") or k.startswith("rng."):
            assert torch.equal(ta[k], tb[k]), k
        else:
            assert torch.allclose(ta[k].double(), tb[k].double(), rtol=0, atol=atol), \
                (k, float((ta[k].double() - tb[k].double()).abs().max()))
    for key in ("step", "stage", "n_partitions", "refreshes", "numpy_rng"):
        assert ma["state"][key] == mb["state"][key], key
    return ta, tb


def max_difference(a, b) -> float:
    ta, tb = ckpt.load_checkpoint(a)[0], ckpt.load_checkpoint(b)[0]
    return max(float((ta[k].double() - tb[k].double()).abs().max()) for k in ta if k.startswith("encoder."))


@pytest.mark.slow
def test_two_processes_train_the_one_process_model_and_resume_each_other(tmp_path, monkeypatch):
    from protoedge.trainer import train as train_mod

    # one process, uninterrupted, and one process stopped after SPLIT steps
    straight = train_mod.train(config(), tmp_path / "one", progress=False)
    one_half = train_mod.train(config(), tmp_path / "one-half", progress=False, stop_at_step=SPLIT)

    # two processes: up to SPLIT from scratch (autoencoder stage, k-means on rank 0 broadcast, meta
    # steps), then, as a new session, the rest of the run from the one-process checkpoint; last, a
    # run on a time budget, where only agreeing on rank 0's clock keeps the ranks from deadlocking
    torchrun(["--out", str(tmp_path / "two-half"), "--stop-after", str(SPLIT)],
             ["--out", str(tmp_path / "two-from-one"), "--resume", str(one_half)],
             ["--out", str(tmp_path / "two-budget"), "--steps", "0", "--time-budget", "13"], cwd=tmp_path)
    two_half = tmp_path / "two-half" / "checkpoint.safetensors"
    t2, _ = assert_same_model(two_half, one_half)
    meta = ckpt.load_checkpoint(two_half)[1]
    assert meta["world_size"] == 2 and meta["state"]["n_partitions"] == 1 and meta["state"]["step"] == SPLIT
    assert meta["config"]["episodes_per_step"] == 2
    assert (t2["partition.0"] >= 0).sum() == 600  # the whole (small) pool was clustered
    # ... rank 0 alone wrote the log: one line per step, not two
    lines = [json.loads(l) for l in (tmp_path / "two-half" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lines if r["stage"] == "meta" and "loss" in r] == [1, 2, 3]
    assert sum(r.get("event") == "recluster" for r in lines) == 1

    # one process continues the two-process checkpoint (and two processes continued the one-process one)
    from_two = train_mod.train(config(), tmp_path / "one-from-two", resume=two_half, progress=False)
    from_one = tmp_path / "two-from-one" / "checkpoint.safetensors"
    for path in (from_two, from_one):
        _, m = ckpt.load_checkpoint(path)
        assert m["state"]["stage"] == "done" and m["state"]["step"] == STEPS and m["state"]["refreshes"] == 2
        assert_same_model(path, straight)
    # the tolerance is meaningful: three more steps move the weights by far more than it
    assert max_difference(two_half, straight) > 100 * ATOL
    _, m = ckpt.load_checkpoint(tmp_path / "two-budget" / "checkpoint.safetensors")
    assert m["state"]["stage"] == "done" and m["config"]["steps"] == 0 and m["world_size"] == 2


def test_step_is_drawn_whole_and_split_by_rank():
    """Every rank draws the same step; the ranks' episodes together are the one-process episodes."""
    from protoedge.trainer.data import TensorPool
    from protoedge.trainer.train import Run, draw_step, my_episodes

    cfg = config(episodes_per_step=4, cluster_way=0)
    pool = TensorPool(torch.randint(0, 256, (200, 1, 28, 28), dtype=torch.uint8), "x")
    runs = [Run(cfg, torch.device("cpu")) for _ in range(3)]
    steps = [draw_step(run, pool, None) for run in runs]
    whole = my_episodes(runs[0], pool, steps[0], Dist(rank=0, world=1))
    halves = [e for r in (0, 1) for e in my_episodes(runs[r + 1], pool, steps[r + 1], Dist(rank=r, world=2))]
    assert len(whole) == len(halves) == 4
    for a, b in zip(whole, halves):
        assert torch.equal(a["views"], b["views"]) and torch.equal(a["clean"], b["clean"])
        assert torch.equal(a["keep"], b["keep"])
    assert not torch.equal(whole[0]["views"], whole[1]["views"])  # episodes differ from each other
    assert np.array_equal(runs[0].rng.integers(1 << 30, size=4), runs[2].rng.integers(1 << 30, size=4))


def test_episodes_per_step_must_split_over_the_processes():
    from protoedge.trainer.train import resolve

    assert resolve(config(episodes_per_step=0), world=4).episodes_per_step == 4  # 0: one per process
    assert resolve(config(episodes_per_step=0), world=1).episodes_per_step == 1
    with pytest.raises(ConfigError, match="does not split over 2 processes"):
        resolve(config(episodes_per_step=3), world=2)
    with pytest.raises(ConfigError, match="maml"):
        resolve(recipe_config("maml", episodes_per_step=2), world=2)


def test_cli_offers_the_scale_out_options():
    from click.testing import CliRunner

    from protoedge.cli import main

    r = CliRunner().invoke(main, ["train", "--help"])
    assert r.exit_code == 0 and "torchrun" in r.output
    for word in ("--data", "--stop-after", "--no-report", "gpu"):
        assert word in r.output
    r = CliRunner().invoke(main, ["bench", "scale", "--help"])
    assert r.exit_code == 0 and "--windows" in r.output
