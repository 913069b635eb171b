"""Reports at the end of `train` (a training folder) and of every `bench` command (its result JSON)."""
import json
import os
import time

import pytest
from click.testing import CliRunner

from protoedge import app_cli, rundir
from protoedge.cli import bench, main
from protoedge.report import format_value
from protoedge.run_summaries import checkpoint_meta


@pytest.fixture
def training_folder(tmp_path):
    """What `protoedge train --out DIR` leaves: a real checkpoint file and the trainer's metrics log."""
    from protoedge.trainer.checkpoint import save_checkpoint
    from protoedge.trainer.model import Encoder

    meta = {"distance": "cosine", "temperature": 7.5, "config": {"protocol": "omniglot-a", "seed": 3,
                                                                   "cluster_ks": [800, 1200]},
            "metrics": {"training": {"val_5w1s": 91.25}, "seconds": 118.4}, "code_version": "abc1234"}
    save_checkpoint(tmp_path / "checkpoint.safetensors", Encoder(), meta)
    records = [{"stage": "autoencoder", "step": 25, "elapsed": 3.1, "loss_recon": 0.31},
               {"stage": "autoencoder", "step": 25, "elapsed": 6.0, "event": "stage_end", "val_5w1s": 52.5},
               {"stage": "meta", "step": 25, "elapsed": 40.2, "loss": 1.9, "loss_aug": 1.7, "acc_aug": 0.41},
               {"stage": "meta", "step": 50, "elapsed": 80.7, "loss": 1.2, "loss_aug": 1.1, "acc_aug": 0.62},
               {"stage": "meta", "step": 50, "elapsed": 81.0, "event": "validation", "val_5w1s": 80.1}]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    return tmp_path


def test_checkpoint_metadata_is_read_without_loading_tensors(training_folder):
    meta = checkpoint_meta(training_folder / "checkpoint.safetensors")
    assert meta["temperature"] == 7.5 and meta["encoder_config"]["width"] == 64


def test_training_report_has_curves_and_the_checkpoint_numbers(training_folder):
    page = app_cli.report_after_training(training_folder)
    assert page == training_folder / "report.html"
    run = rundir.read_run_json(training_folder)
    assert run["kind"] == "train" and run["training"]["final"]["training"]["val_5w1s"] == 91.25
    assert (training_folder / "figures" / "curves.png").read_bytes()[:4] == b"\x89PNG"
    text = page.read_text()
    assert f">{format_value(91.25)}<" in text and f">{format_value(118.4)}<" in text


def test_unreadable_checkpoint_skips_the_report_not_the_training(tmp_path):
    (tmp_path / "checkpoint.safetensors").write_bytes(b"\x05")
    assert app_cli.report_after_training(tmp_path) is None
    assert not (tmp_path / "report.html").exists()


def test_every_bench_command_leaves_a_report(tmp_path, monkeypatch):
    """The hook sits on the bench group, so it covers benchmarks added later too."""
    monkeypatch.setattr(app_cli, "BENCH_RESULTS", tmp_path)
    monkeypatch.setattr(app_cli, "_CLI_START", time.time() - 1)
    old = tmp_path / "old.json"
    old.write_text('{"x": 1}')
    os.utime(old, (time.time() - 3600, time.time() - 3600))  # an earlier run's result: left alone

    @bench.command(name="probe-for-test")
    def probe():
        result = {"latency_1_client": {"p50_ms": 1.234, "p99_ms": 4.5},
                  "throughput": {"16": {"images_per_s": 2500.0}},
                  "rows": [{"name": "fp32", "acc": 97.5}, {"name": "int8", "acc": float("nan")}],
                  "targets": {"p50_ms_le_3": True}}
        (tmp_path / "probe.json").write_text(json.dumps(result))

    try:
        result = CliRunner().invoke(main, ["bench", "probe-for-test"])
    finally:
        bench.commands.pop("probe-for-test")
    assert result.exit_code == 0, result.output
    page = tmp_path / "reports" / "probe" / "report.html"
    assert f"report: {page}" in result.output
    assert not (tmp_path / "reports" / "old").exists()
    text = page.read_text()
    for shown in ("1.234", "4.5", "2500", "97.5", "yes", "n/a"):  # NaN is stored as null
        assert f">{shown}<" in text


def test_without_matplotlib_jobs_still_finish_and_report_says_what_to_install(tmp_path, monkeypatch):
    """The device install has no matplotlib: a job's report is skipped with the fix, never a crash."""
    monkeypatch.setattr(app_cli, "has_matplotlib", lambda: False)
    rundir.write_run_json(tmp_path, rundir.new_run("x", "y", summary={"acc": 0.5}))
    assert app_cli.report_or_explain(tmp_path) is None
    result = CliRunner().invoke(main, ["report", str(tmp_path)])
    assert result.exit_code != 0 and "pip install 'protoedge[train]'" in result.output
    assert not (tmp_path / "report.html").exists()
