"""Trainer parts: augmentations, pseudo-tasks, ProtoNet head, checkpoints, exact resume, MAML, CLI."""
import json

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from protoedge.cli import main
from protoedge.trainer import checkpoint as ckpt
from protoedge.trainer.augment import AugmentConfig, augment
from protoedge.trainer.config import TrainConfig, parse_duration, recipe_config
from protoedge.trainer.model import Encoder
from protoedge.trainer.protonet import ProtoHead
from protoedge.trainer.pseudotasks import ClusterTaskSampler, augmentation_episode, kmeans_partitions

torch.set_num_threads(1)


# ----------------------------------------------------------------------------- augmentations

def test_augment_keeps_shape_scale_and_blank_paper():
    gen = torch.Generator().manual_seed(0)
    x = torch.zeros(8, 1, 28, 28, dtype=torch.uint8)
    x[:, :, 10:18, 12:16] = 255
    views = augment(x, AugmentConfig(), gen)
    assert views.shape == (8, 1, 28, 28) and views.dtype == torch.float32
    assert views.min() >= 0 and views.max() <= 255
    assert not torch.equal(views[0], views[1])  # each image gets its own random transform
    blank = augment(torch.zeros(4, 1, 28, 28, dtype=torch.uint8), AugmentConfig(), gen)
    assert blank.abs().max() == 0  # padding is background, nothing invents ink


def test_augment_is_reproducible_from_the_generator():
    x = torch.randint(0, 256, (6, 1, 28, 28), dtype=torch.uint8)
    a = augment(x, AugmentConfig(), torch.Generator().manual_seed(5))
    b = augment(x, AugmentConfig(), torch.Generator().manual_seed(5))
    c = augment(x, AugmentConfig(), torch.Generator().manual_seed(6))
    assert torch.equal(a, b) and not torch.equal(a, c)


# ----------------------------------------------------------------------------- pseudo-tasks

def test_augmentation_episode_picks_distinct_images():
    rng = np.random.default_rng(0)
    idx = augmentation_episode(300, 256, rng)
    assert idx.shape == (256,) and len(set(idx.tolist())) == 256 and idx.max() < 300
    with pytest.raises(ValueError, match="need 400 images"):
        augmentation_episode(300, 400, rng)


def blobs(n_clusters=12, per=15, dim=8, seed=0):
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(n_clusters, dim)) * 5
    truth = np.repeat(np.arange(n_clusters), per)
    return centres[truth] + rng.normal(size=(len(truth), dim)) * 0.05, truth


def test_kmeans_partitions_recover_clear_clusters():
    x, truth = blobs()
    parts = kmeans_partitions(x, [12, 24], seed=0)
    assert [p.shape for p in parts] == [(len(x),)] * 2
    assert len(np.unique(parts[1])) <= 24
    from protoedge.metrics import adjusted_rand_index
    # one random-init k-means run may merge a few blobs, but most of the structure is found
    assert adjusted_rand_index(truth, parts[0]) > 0.5
    with pytest.raises(ValueError, match="k=1000"):
        kmeans_partitions(x, [1000], seed=0)


def test_cluster_episodes_are_disjoint_and_one_cluster_per_way():
    x, truth = blobs(n_clusters=10, per=8)
    part = truth.copy()
    part[:3] = 99  # a tiny cluster of 3 members: filtered out at min_size 4
    sampler = ClusterTaskSampler([part], min_size=4)
    assert sampler.usable_clusters() == [10]  # cluster 0 keeps 5 members, cluster 99 is dropped
    rng = np.random.default_rng(1)
    for _ in range(30):
        s, q = sampler.episode(5, 2, 2, rng)
        assert s.shape == (5, 2) and q.shape == (5, 2)
        assert not set(s.ravel()) & set(q.ravel())
        ways = part[s[:, 0]]
        assert len(set(ways)) == 5 and 99 not in ways
        assert np.all(part[s] == ways[:, None]) and np.all(part[q] == ways[:, None])
    with pytest.raises(ValueError, match="no partition has 11 clusters"):
        sampler.episode(11, 2, 2, rng)
    with pytest.raises(ValueError, match="filtered at 4"):
        sampler.episode(5, 3, 2, rng)


# ----------------------------------------------------------------------------- ProtoNet head

def test_protohead_sqeuclidean_logits_hand_computed():
    head = ProtoHead("sqeuclidean")
    support = torch.tensor([[[0.0, 0.0], [2.0, 0.0]], [[0.0, 4.0], [0.0, 4.0]]])  # prototypes (1,0), (0,4)
    logits = head.logits(support, torch.tensor([[1.0, 1.0]]))
    assert torch.allclose(logits, torch.tensor([[-1.0, -10.0]]))


def test_protohead_cosine_uses_normalised_embeddings_and_temperature():
    head = ProtoHead("cosine", temperature=3.0)
    support = torch.tensor([[[5.0, 0.0]], [[0.0, 0.2]]])
    logits = head.logits(support, torch.tensor([[0.0, 7.0]]))
    # unit vectors: distance to (1,0) is 2, to (0,1) is 0; logits = -3 * d
    assert torch.allclose(logits, torch.tensor([[-6.0, 0.0]]), atol=1e-5)
    assert head.temperature == pytest.approx(3.0)
    assert isinstance(head.log_temperature, torch.nn.Parameter)
    loss, acc = head.loss(support, torch.tensor([[[1.0, 0.1]], [[0.1, 1.0]]]))
    wrong, _ = head.loss(support, torch.tensor([[[0.1, 1.0]], [[1.0, 0.1]]]))
    assert acc == 1.0 and loss < wrong
    with pytest.raises(ValueError, match="distance"):
        ProtoHead("l1")


# ----------------------------------------------------------------------------- checkpoints

def test_checkpoint_round_trip_gives_the_same_function(tmp_path):
    torch.manual_seed(0)
    enc = Encoder()
    enc.train()(torch.randint(0, 256, (16, 1, 28, 28), dtype=torch.uint8))  # non-trivial BN statistics
    enc.eval()
    path = ckpt.save_checkpoint(tmp_path / "c.safetensors", enc, {"distance": "cosine", "temperature": 7.5},
                                {"decoder.w": torch.ones(3)})
    loaded, meta = ckpt.load_encoder(path)
    x = torch.randint(0, 256, (5, 1, 28, 28), dtype=torch.uint8)
    assert not loaded.training
    assert torch.equal(loaded(x), enc(x))
    assert meta["distance"] == "cosine" and meta["temperature"] == 7.5 and meta["format"] == 1
    small = ckpt.strip_checkpoint(path, tmp_path / "small.safetensors")
    tensors, _ = ckpt.load_checkpoint(small)
    assert all(k.startswith("encoder.") for k in tensors)
    assert torch.equal(ckpt.load_encoder(small)[0](x), enc(x))


def test_bad_checkpoints_are_refused_without_unpickling(tmp_path):
    with pytest.raises(ckpt.CheckpointError, match="no such checkpoint"):
        ckpt.load_checkpoint(tmp_path / "missing.safetensors")
    torch.save({"x": torch.ones(2)}, tmp_path / "pickled.pt")  # a pickle: must be refused, not executed
    with pytest.raises(ckpt.CheckpointError, match="not a readable safetensors"):
        ckpt.load_checkpoint(tmp_path / "pickled.pt")
    from safetensors.torch import save_file
    save_file({"a": torch.ones(2)}, str(tmp_path / "foreign.safetensors"))
    with pytest.raises(ckpt.CheckpointError, match="not a protoedge checkpoint"):
        ckpt.load_checkpoint(tmp_path / "foreign.safetensors")
    good = ckpt.save_checkpoint(tmp_path / "good.safetensors", Encoder())
    (tmp_path / "cut.safetensors").write_bytes(good.read_bytes()[:1000])
    with pytest.raises(ckpt.CheckpointError):
        ckpt.load_checkpoint(tmp_path / "cut.safetensors")


def test_config_round_trip_and_duration_parsing():
    cfg = recipe_config("cactus", "omniglot-b", seed=3)
    again = TrainConfig.from_dict(json.loads(json.dumps(cfg.to_dict())))
    assert again == cfg and cfg.aug_way == 0 and cfg.distance == "sqeuclidean"
    with pytest.raises(ValueError, match="unknown config fields"):
        TrainConfig.from_dict({"nonsense": 1})
    with pytest.raises(ValueError, match="unknown recipe"):
        recipe_config("magic")
    assert parse_duration("30m") == 1800 and parse_duration("1h30m") == 5400 and parse_duration("45") == 45
    with pytest.raises(ValueError):
        parse_duration("ten minutes")


def test_set_augment_names_some_fields_and_keeps_the_other_defaults():
    # `--set augment={"erase_p": 0.2}` once replaced the whole AugmentConfig by that dict
    cfg = recipe_config("default", augment={"erase_p": 0.2, "erase_max": 6})
    assert isinstance(cfg.augment, AugmentConfig)
    assert (cfg.augment.erase_p, cfg.augment.erase_max) == (0.2, 6)
    assert cfg.augment.rotate_deg == AugmentConfig().rotate_deg and cfg.augment.scale == AugmentConfig().scale
    assert TrainConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
    with pytest.raises(ValueError, match="unknown augment fields: erasep"):
        recipe_config("default", augment={"erasep": 0.2})



def test_precision_auto_takes_bf16_only_where_the_device_has_it(monkeypatch):
    from protoedge.trainer import train as train_mod
    from protoedge.trainer.config import ConfigError

    cpu = torch.device("cpu")
    assert recipe_config("default").precision == "auto"  # the CLI's default too
    for native, expected in ((False, "fp32"), (True, "bf16")):
        monkeypatch.setattr(train_mod, "native_bf16", lambda device, native=native: native)
        assert train_mod.resolve(recipe_config("default"), 1, cpu).precision == expected
        # an explicit choice is kept whatever the hardware
        assert train_mod.resolve(recipe_config("default", precision="bf16"), 1, cpu).precision == "bf16"
        assert train_mod.resolve(recipe_config("default", precision="fp32"), 1, cpu).precision == "fp32"
    with pytest.raises(ConfigError, match="precision must be auto, bf16 or fp32"):
        train_mod.resolve(recipe_config("default", precision="fp16"), 1, cpu)
    monkeypatch.undo()
    # this machine's own answer is a bool, from oneDNN's check
    assert isinstance(train_mod.native_bf16(cpu), bool)

def tiny_config(**kw) -> TrainConfig:
    base = dict(pool_limit=600, ae_steps=2, ae_batch=16, steps=4, aug_way=16, cluster_way=4, cluster_ks=[60], cluster_start=0.5,
                cluster_every=2.0, recon_batch=8, precision="fp32", threads=1, val_every=2.0, log_every=1)
    base.update(kw)
    return recipe_config("default", "omniglot-a", **base)


@pytest.mark.slow
def test_resume_continues_exactly(tmp_path, monkeypatch):
    from protoedge.trainer import train as train_mod

    monkeypatch.setattr(train_mod, "validation_set", lambda protocol: None)  # speed: no val logging here
    cfg = tiny_config()
    straight = train_mod.train(cfg, tmp_path / "a", progress=False)
    first = train_mod.train(cfg, tmp_path / "b", progress=False, stop_at_step=3)
    _, meta = ckpt.load_checkpoint(first)
    assert meta["state"]["stage"] == "meta" and meta["state"]["step"] == 3 and meta["state"]["n_partitions"] == 1
    resumed = train_mod.train(cfg, tmp_path / "c", resume=first, progress=False)
    ta, ma = ckpt.load_checkpoint(straight)
    tc, mc = ckpt.load_checkpoint(resumed)
    assert ta.keys() == tc.keys()
    for k in ta:  # weights, BN statistics, optimizer moments, RNG state, partitions: bit for bit
        assert torch.equal(ta[k], tc[k]), k
    assert mc["state"]["stage"] == "done" and mc["distance"] == "cosine" and mc["temperature"] > 0
    assert mc["config"]["steps"] == 4 and len(mc["data_fingerprint"]) == 64
    log = [json.loads(l) for l in (tmp_path / "a" / "metrics.jsonl").read_text().splitlines()]
    assert any(r.get("event") == "recluster" for r in log)
    assert {"loss_aug", "loss_cluster", "loss_recon"} <= set().union(*log)


# ----------------------------------------------------------------------------- MAML

@pytest.mark.parametrize("first_order", [False, True])
def test_maml_step_uses_vmap_and_leaves_running_stats_alone(first_order):
    from protoedge.trainer.maml import MamlTrainer
    from protoedge.trainer.train import Run

    cfg = recipe_config("maml", maml_tasks=2, maml_inner_steps=2, maml_first_order=first_order, threads=1)
    run = Run(cfg, torch.device("cpu"))
    pool = torch.randint(0, 256, (60, 1, 28, 28), dtype=torch.uint8)
    before = {k: v.clone() for k, v in run.encoder.named_buffers()}
    loss, logs = MamlTrainer(run, pool).step_loss()
    loss.backward()
    assert logs["vmap"] == 1.0 and np.isfinite(logs["loss_maml"])
    for k, v in run.encoder.named_buffers():
        assert torch.equal(v, before[k]), k  # batch statistics only: running stats untouched
    grads = [p.grad for p in run.encoder.parameters()]
    assert all(g is not None for g in grads) and sum(float(g.abs().sum()) for g in grads) > 0


def test_maml_second_order_differs_from_first_order():
    from protoedge.trainer.maml import MamlTrainer
    from protoedge.trainer.train import Run

    pool = torch.randint(0, 256, (60, 1, 28, 28), dtype=torch.uint8)
    grads = []
    for fo in (False, True):
        run = Run(recipe_config("maml", maml_tasks=2, maml_inner_steps=1, maml_first_order=fo, threads=1),
                  torch.device("cpu"))
        loss, _ = MamlTrainer(run, pool).step_loss()
        loss.backward()
        grads.append(run.encoder.features[0][0].weight.grad.clone())
    assert not torch.allclose(grads[0], grads[1])


# ----------------------------------------------------------------------------- CLI

def test_cli_help_describes_train_eval_and_bench():
    runner = CliRunner()
    for args, words in ((["train", "--help"], ["--time-budget", "--recipe", "--resume", "--seed"]),
                        (["eval", "--help"], ["--ways", "--shots", "--episodes", "--queries", "--refine"]),
                        (["bench", "fewshot", "--help"], ["--runs", "--quick"])):
        result = runner.invoke(main, args)
        assert result.exit_code == 0, result.output
        for w in words:
            assert w in result.output


def test_cli_user_errors_are_clear(tmp_path):
    runner = CliRunner()
    r = runner.invoke(main, ["train", "--out", str(tmp_path / "r"), "--time-budget", "soon"])
    assert r.exit_code != 0 and "cannot read duration" in r.output
    r = runner.invoke(main, ["train", "--out", str(tmp_path / "r"), "--resume", str(tmp_path / "nope.safetensors")])
    assert r.exit_code != 0 and "no such checkpoint" in r.output
    r = runner.invoke(main, ["train", "--out", str(tmp_path / "r"), "--set", "aug_way"])
    assert r.exit_code != 0 and "KEY=VALUE" in r.output
    r = runner.invoke(main, ["train", "--out", str(tmp_path / "r"), "--set", "bogus=1"])
    assert r.exit_code != 0 and "bad configuration" in r.output
    r = runner.invoke(main, ["eval", str(tmp_path / "nope.safetensors")])
    assert r.exit_code != 0 and "no such checkpoint" in r.output
    (tmp_path / "junk.safetensors").write_bytes(b"not a checkpoint at all")
    r = runner.invoke(main, ["eval", str(tmp_path / "junk.safetensors")])
    assert r.exit_code != 0 and "not a readable safetensors" in r.output
    good = ckpt.save_checkpoint(tmp_path / "g.safetensors", Encoder(), {"distance": "cosine"})
    r = runner.invoke(main, ["eval", str(good), "--ways", "5,x"])
    assert r.exit_code != 0 and "comma-separated integers" in r.output
    r = runner.invoke(main, ["eval", str(good), "--protocol", "mnist", "--ways", "20", "--no-clustering"])
    assert r.exit_code != 0 and "only 10 test classes" in r.output


@pytest.mark.slow
def test_cli_resume_keeps_the_saved_config(tmp_path, monkeypatch):
    from protoedge.trainer import train as train_mod

    monkeypatch.setattr(train_mod, "validation_set", lambda protocol: None)
    first = train_mod.train(tiny_config(aug_way=12), tmp_path / "a", progress=False, stop_at_step=2)
    r = CliRunner().invoke(main, ["train", "--out", str(tmp_path / "a"), "--resume", str(first), "--threads", "1"])
    assert r.exit_code == 0, r.output
    _, meta = ckpt.load_checkpoint(tmp_path / "a" / "checkpoint.safetensors")
    # not the CLI defaults (aug_way 256, time-budget steps): the run's own settings
    assert meta["config"]["aug_way"] == 12 and meta["config"]["steps"] == 4
    assert meta["state"]["stage"] == "done" and meta["state"]["step"] == 4
