"""A tiny end-to-end run through the CLI: train without labels, then the trained encoder must beat
a random one on held-out classes (Protocol A test characters)."""
import json

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from protoedge import datasets
from protoedge.cli import main
from protoedge.fewshot import evaluate_episodes
from protoedge.trainer.checkpoint import load_checkpoint, load_encoder
from protoedge.trainer.evaluate import embed
from protoedge.trainer.maml import recalibrate_batchnorm
from protoedge.trainer.model import Encoder
from protoedge.trainer.train import unlabelled_pool


@pytest.mark.slow
def test_tiny_training_beats_a_random_encoder_on_held_out_classes(tmp_path, monkeypatch):
    from protoedge.trainer import train as train_mod

    monkeypatch.setattr(train_mod, "validation_set", lambda protocol: None)  # logging only; saves time
    settings = {"pool_limit": 2000, "ae_steps": 3, "ae_batch": 64, "aug_way": 64, "cluster_way": 8,
                "cluster_ks": [100], "cluster_start": 0.6, "recon_batch": 16, "log_every": 5}
    args = ["train", "--protocol", "omniglot-a", "--out", str(tmp_path / "run"), "--steps", "30",
            "--time-budget", "5m", "--threads", "1", "--save-to", str(tmp_path / "encoder.safetensors")]
    for key, value in settings.items():
        args += ["--set", f"{key}={json.dumps(value)}"]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output

    _, meta = load_checkpoint(tmp_path / "run" / "checkpoint.safetensors")
    assert meta["state"]["stage"] == "done" and meta["state"]["step"] == 30
    small, small_meta = load_encoder(tmp_path / "encoder.safetensors")
    assert "state" not in small_meta and small_meta["distance"] == "cosine"

    test = datasets.load_split("omniglot-a", "test")
    keep = test.labels < 100  # 100 held-out characters keep the test quick
    images, labels = test.images[keep], test.labels[keep]
    trained = evaluate_episodes(embed(small, images), labels, 5, 1, 15, episodes=400, distance="cosine")

    torch.manual_seed(0)
    random_encoder = Encoder()
    recalibrate_batchnorm(random_encoder, unlabelled_pool("omniglot-a", 2000)[0], np.random.default_rng(0),
                          batches=5, batch_size=200)
    baseline = evaluate_episodes(embed(random_encoder, images), labels, 5, 1, 15, episodes=400, distance="cosine")
    # same seed -> the very same 400 episodes for both encoders; the gap must be far outside the noise
    margin = max(5.0, 2 * (trained["ci95"] + baseline["ci95"]))
    assert trained["acc"] > baseline["acc"] + margin, (trained, baseline)

    # the eval command reads the same checkpoint and prints every requested setting
    r = CliRunner().invoke(main, ["eval", str(tmp_path / "encoder.safetensors"), "--ways", "5", "--shots", "1,5",
                                  "--episodes", "20", "--refine", "--no-clustering",
                                  "--json-out", str(tmp_path / "eval.json")])
    assert r.exit_code == 0, r.output
    assert "5w1s:" in r.output and "5w5s (+soft k-means):" in r.output
    report = json.loads((tmp_path / "eval.json").read_text())
    assert set(report["fewshot"]) == {"5w1s", "5w5s"} and report["fewshot"]["5w1s"]["episodes"] == 20
