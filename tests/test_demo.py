"""`protoedge demo`: the whole pipeline on real Omniglot data, small enough for the test suite."""
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from protoedge import datasets, rundir
from protoedge.cli import main
from protoedge.demo import DemoOptions, unseen_stream
from protoedge.metrics import clustering_scores
from protoedge.report import format_value

TRAINING_ALPHABETS = {n.split("/")[0] for n in datasets.load_split("omniglot-a", "train").class_names}


def _check_run_dir(out, output):
    run = json.loads((out / "run.json").read_text())
    stream = rundir.read_stream(out)
    s = run["summary"]
    # the printed summary is run.json's numbers, formatted once
    for key in ("acc", "ari", "nmi", "clusters_found", "clusters_true"):
        assert format_value(s[key]) in output, key
    assert f"p50 {format_value(run['latency_ms']['p50'])} ms" in output
    assert f"report: {out / 'report.html'}" in output
    # run.json agrees with the arrays it summarises
    scores = clustering_scores(stream["labels"], stream["cluster"])
    assert s["acc"] == pytest.approx(scores["acc"]) and s["ari"] == pytest.approx(scores["ari"])
    assert s["images"] == len(stream["images"]) == len(stream["latency_ms"]) == len(stream["embedding"])
    assert np.all(stream["latency_ms"] > 0)
    # only never-seen alphabets were streamed, unlabelled order shuffled
    streamed = {n.split("/")[0] for n in run["class_names"]}
    assert streamed == set(run["settings"]["alphabets"]) and not streamed & TRAINING_ALPHABETS
    assert not np.all(np.diff(stream["labels"]) >= 0)
    for name in ("montage", "projection", "contingency", "latency"):
        assert (out / "figures" / f"{name}.png").read_bytes()[:4] == b"\x89PNG"
    return run


@pytest.mark.slow
def test_demo_pretrained_end_to_end(tmp_path):
    out = tmp_path / "demo"
    result = CliRunner().invoke(main, ["demo", "--pretrained", "--seed", "3", "--out", str(out)])
    assert result.exit_code == 0, result.output
    run = _check_run_dir(out, result.output)
    assert run["settings"]["pretrained"] is True and run["training"]["source"] == "committed"
    # the default stream: 20 characters of many never-seen alphabets, the bundle's own threshold
    assert run["summary"]["clusters_true"] == 20 and run["summary"]["images"] == 400
    assert not run["settings"]["whole_alphabets"] and len(run["settings"]["alphabets"]) > 1
    assert run["settings"]["threshold_rule"].startswith("the bundle's default")


@pytest.mark.slow
def test_demo_of_a_given_bundle_in_batches(tmp_path):
    bundle = Path(__file__).resolve().parent.parent / "models" / "omniglot" / "bundle"
    out = tmp_path / "demo"
    result = CliRunner().invoke(main, ["demo", "--bundle", str(bundle), "--alphabets", "1", "--batch", "16",
                                       "--out", str(out)])
    assert result.exit_code == 0, result.output
    run = _check_run_dir(out, result.output)
    assert run["training"] == {"source": "bundle", "bundle": str(bundle)} and run["settings"]["batch"] == 16
    latency = rundir.read_stream(out)["latency_ms"]
    assert np.all(latency[:16] == latency[0])  # one call for the first 16 images: its time shared


def test_demo_of_a_bundle_runs_without_torch(tmp_path):
    """What a device install can do: the runtime and the report, no torch imported on the way."""
    bundle = Path(__file__).resolve().parent.parent / "models" / "omniglot" / "bundle"
    code = ("import sys\n"
            "from protoedge.cli import main\n"
            f"main(['demo', '--bundle', {str(bundle)!r}, '--alphabets', '1', '--batch', '64', "
            f"'--out', {str(tmp_path)!r}], standalone_mode=False)\n"
            "assert 'torch' not in sys.modules, 'torch was imported'\n")
    subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, timeout=300)
    assert (tmp_path / "report.html").is_file() and (tmp_path / "run.json").is_file()


@pytest.mark.slow
def test_demo_trains_exports_and_reports_curves(tmp_path):
    """The README's default path (training), with a tiny budget: the wiring, not the accuracy."""
    out = tmp_path / "demo"
    result = CliRunner().invoke(main, ["demo", "--time-budget", "12s", "--out", str(out)])
    assert result.exit_code == 0, result.output
    run = _check_run_dir(out, result.output)
    assert run["training"]["source"] == "trained"
    assert (out / "bundle" / "manifest.json").is_file()
    assert (out / "metrics.jsonl").stat().st_size > 0 and (out / "figures" / "curves.png").is_file()


def test_default_stream_is_characters_of_many_unseen_alphabets():
    a, names_a, alph_a = unseen_stream(DemoOptions(out=None, seed=5))
    b, names_b, _ = unseen_stream(DemoOptions(out=None, seed=5))
    c, names_c, _ = unseen_stream(DemoOptions(out=None, seed=6))
    assert names_a == names_b and np.array_equal(a.images, b.images) and names_c != names_a
    assert len(names_a) == DemoOptions.characters == 20 and len(a) == 20 * 20
    assert set(alph_a) == {n.split("/")[0] for n in names_a} and not set(alph_a) & TRAINING_ALPHABETS
    assert len(alph_a) > 1  # drawn from all the unseen alphabets, not one
    five, names5, _ = unseen_stream(DemoOptions(out=None, characters=5, seed=5))
    assert len(names5) == 5 and len(five) == 100


def test_stream_is_deterministic_per_seed_and_unseen():
    a, names_a, alph_a = unseen_stream(DemoOptions(out=None, alphabets=2, seed=5))
    b, _, alph_b = unseen_stream(DemoOptions(out=None, alphabets=2, seed=5))
    c, _, alph_c = unseen_stream(DemoOptions(out=None, alphabets=2, seed=6))
    assert alph_a == alph_b and np.array_equal(a.images, b.images) and np.array_equal(a.labels, b.labels)
    assert (alph_c != alph_a) or not np.array_equal(a.labels, c.labels)
    assert set(np.unique(a.labels)) == set(range(len(names_a)))
    assert len(a) == 20 * len(names_a)  # every drawing of every chosen character, once


@pytest.mark.parametrize("args, message", [
    (["--alphabets", "13"], "only 12 never-seen alphabets"),
    (["--characters", "420"], "only 419 characters in never-seen alphabets"),
    (["--characters", "0"], "--characters"),
    (["--time-budget", "soon"], "cannot read duration"),
    (["--batch", "0"], "--batch"),
    (["--threshold", "-1"], "--threshold"),
    (["--backend", "abacus"], "unknown backend 'abacus'"),
    (["--pretrained", "--bundle", "."], "give one"),
    (["--bundle", "no/such/bundle"], "does not exist"),
])
def test_bad_demo_options_are_clear_errors(tmp_path, args, message):
    result = CliRunner().invoke(main, ["demo", "--out", str(tmp_path / "d"), *args])
    assert result.exit_code != 0
    assert message in result.output


def test_demo_threshold_for_one_alphabet_streams():
    from types import SimpleNamespace

    from protoedge.demo import ALPHABET_THRESHOLD_FACTOR, ALPHABET_THRESHOLD_FACTOR_WHITENED, demo_threshold

    rule = SimpleNamespace(calibration={"new_cluster_threshold": 0.4, "cluster_threshold": {
        "value": 0.48, "chosen_by": "calibration rule"}}, output_spec={})
    assert demo_threshold(rule, None)[0] == pytest.approx(ALPHABET_THRESHOLD_FACTOR * 0.4) == pytest.approx(0.4)
    # characters of many alphabets (the default stream): the bundle's own default, as the runtime's
    assert demo_threshold(rule, None, whole_alphabets=False)[0] is None
    assert demo_threshold(rule, 0.7, whole_alphabets=False) == (0.7, "--threshold")
    assert demo_threshold(rule, 0.7) == (0.7, "--threshold")
    # a whitened bundle's distances are spread differently: its own multiple of the midpoint
    white = SimpleNamespace(calibration=rule.calibration, output_spec={"whitening": {"applied": True}})
    got, why = demo_threshold(white, None)
    assert got == pytest.approx(ALPHABET_THRESHOLD_FACTOR_WHITENED * 0.4) and "whitened" in why
    # a bundle whose export found its own class granularity keeps it
    found = SimpleNamespace(calibration={"new_cluster_threshold": 0.4, "cluster_threshold": {
        "value": 1.1, "chosen_by": "stream silhouette"}}, output_spec={})
    assert demo_threshold(found, None)[0] is None
