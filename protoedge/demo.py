"""`protoedge demo`: the whole pipeline on the shipped Omniglot data in a few minutes.

meta-train briefly without labels (or take the committed encoder) -> export an FP32 bundle ->
verify it -> start the runtime -> stream never-seen characters unlabelled, in random order, through
Runtime.cluster -> score against the truth -> run directory + HTML report -> summary.

Only click is imported at module level (the CLI's rule); torch is needed only to train/export.
"""
from __future__ import annotations

import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import click

REPO = Path(__file__).resolve().parent.parent
PRETRAINED_CHECKPOINT = REPO / "models" / "omniglot" / "encoder.safetensors"
PRETRAINED_BUNDLE = REPO / "models" / "omniglot" / "bundle"
PRETRAINED_METRICS = REPO / "models" / "omniglot" / "metrics.jsonl"
PROTOCOL = "omniglot-a"
# With --alphabets the demo streams whole alphabets, whose characters look more alike than the 20
# random characters (of many alphabets) the runtime's default rule was fitted on. On single-alphabet
# streams of Protocol-A *train* characters (12 alphabets) the most accurate threshold was 0.8-1.0 x
# the calibration midpoint for each of four cosine encoders (the rule's 1.2 x lost 3-11 points and
# found up to 21% too few clusters; a squared-Euclidean encoder did best at 1.0-1.2 x); 1.0 x, the
# exporter's own new_cluster_threshold, keeps the cluster count closest to the truth. In a whitened
# bundle's space (export/whitening.py), on the same kind of streams (38 train alphabets, the
# 3,000-step encoder): 1.0 / 1.1 / 1.2 / 1.3 x scored ACC 65.0 / 65.9 / 64.6 / 62.6% and found 1.49 /
# 1.31 / 1.11 / 0.99 x the true number of characters; 1.2 is within 1.3 points of the best and
# does not cut a character into many clusters.
ALPHABET_THRESHOLD_FACTOR = 1.0
ALPHABET_THRESHOLD_FACTOR_WHITENED = 1.2


@dataclass
class DemoOptions:
    out: Path
    pretrained: bool = False
    bundle: Path | None = None  # an exported bundle to demo instead of training + exporting
    time_budget_s: float = 120.0
    # By default 20 characters drawn from all the never-seen alphabets, the runtime benchmark's
    # stream (a) and the mix the bundle's threshold was fitted for: a screenful of groups a person
    # can check. Seeds 0-7, whole stream scored: committed bundle ACC 0.84, a 2-minute encoder 0.70.
    characters: int = 20
    # Or whole alphabets (characters then ignored), as Omniglot clustering is usually scored (Hsu
    # et al. 2018): harder, the characters of one alphabet look alike. With the committed encoder
    # seeds 0-4 give mean ACC 0.46 for one alphabet, 0.32 for two, 0.24 for three (characters of
    # different alphabets pool into a few large mixed clusters); a 2-minute encoder 0.36-0.39 for one.
    alphabets: int | None = None
    seed: int = 0
    batch: int = 1
    backend: str = "auto"
    threshold: float | None = None
    export_episodes: int = 200
    progress: bool = True


class Stopwatch:
    """Seconds per named step, for run.json's "timings_s"."""

    def __init__(self):
        self.start, self.timings = time.perf_counter(), {}

    def step(self, name: str, since: float) -> None:
        self.timings[name] = round(time.perf_counter() - since, 2)

    def total(self) -> float:
        return round(time.perf_counter() - self.start, 2)


# ----------------------------------------------------------------------------- steps

def obtain_checkpoint(opts: DemoOptions) -> tuple[Path, dict]:
    """(checkpoint path, training facts for run.json); trains into OUT/train unless --pretrained."""
    if opts.pretrained:
        if not PRETRAINED_CHECKPOINT.is_file():
            raise click.ClickException(f"{PRETRAINED_CHECKPOINT} is missing: run `protoedge demo` "
                                       "without --pretrained to train one")
        return PRETRAINED_CHECKPOINT, {"source": "committed", "checkpoint": str(PRETRAINED_CHECKPOINT)}
    from ._deps import require_torch

    require_torch()
    from .trainer.config import recipe_config
    from .trainer.train import train

    # No k-means pseudo-tasks: one re-clustering of the 24,000-image pool takes minutes on 2 cores,
    # more than the whole demo budget. Augmentation tasks + reconstruction learn from the first step.
    # Fewer, shorter held-out checks (each costs seconds) still draw the accuracy curve.
    cfg = recipe_config("default", PROTOCOL, time_budget_s=opts.time_budget_s, seed=opts.seed, cluster_way=0,
                        val_every=0.25, val_episodes=100, log_every=5)
    train_dir = opts.out / "train"
    shutil.rmtree(train_dir, ignore_errors=True)  # metrics.jsonl is appended to; start clean
    click.echo(f"[1/4] meta-training without labels on {PROTOCOL} for {opts.time_budget_s:.0f} s")
    path = train(cfg, train_dir, progress=opts.progress)
    return path, {"source": "trained", "checkpoint": str(path), "recipe": cfg.recipe,
                  "time_budget_s": opts.time_budget_s}


def committed_bundle_is_current() -> bool:
    """The committed bundle was exported from the committed checkpoint (its provenance says so);
    a stale bundle next to a newer checkpoint would demo the wrong model."""
    import json

    from .runtime.bundle import sha256_file

    manifest = PRETRAINED_BUNDLE / "manifest.json"
    if not manifest.is_file():
        return False
    if not PRETRAINED_CHECKPOINT.is_file():
        return True  # a device checkout may ship the bundle alone
    try:
        recorded = json.loads(manifest.read_text()).get("provenance", {}).get("checkpoint_sha256")
    except (json.JSONDecodeError, UnicodeDecodeError):
        return False  # load_bundle would refuse it anyway; export a fresh one
    if recorded != sha256_file(PRETRAINED_CHECKPOINT):
        click.echo(f"note: {PRETRAINED_BUNDLE} was exported from another checkpoint than "
                   f"{PRETRAINED_CHECKPOINT.name}; exporting the committed checkpoint instead", err=True)
        return False
    return True


def obtain_bundle(opts: DemoOptions, checkpoint: Path | None, use_committed: bool):
    """Export FP32 (reduced precisions are left to `protoedge export`: they cost minutes), or reuse
    the committed bundle; either way load_bundle verifies schema and hashes."""
    from .runtime.bundle import BundleError, load_bundle

    if use_committed:
        click.echo(f"[2/4] using the committed bundle {PRETRAINED_BUNDLE}")
        return PRETRAINED_BUNDLE
    from .export.pipeline import ExportOptions, export_bundle

    click.echo("[2/4] exporting the encoder to ONNX (FP32) and calibrating distances")
    out = opts.out / "bundle"
    export_bundle(checkpoint, out, ExportOptions(precisions=("fp32",), episodes=opts.export_episodes,
                                                 seed=opts.seed, progress=opts.progress))
    try:
        load_bundle(out)
    except BundleError as e:
        raise click.ClickException(f"the exported bundle does not verify: {e}") from None
    return out


def unseen_stream(opts: DemoOptions):
    """Test images of never-seen alphabets (no character in the training split), shuffled: every
    drawing of `characters` characters drawn from all of them, or of `alphabets` whole alphabets.
    Returns (ImageSet with labels 0..K-1, class names, names of the alphabets streamed)."""
    import numpy as np
    from tqdm import tqdm

    from .datasets import load_split

    with tqdm(total=2, desc="data", unit="split", disable=not opts.progress, leave=False) as bar:
        train = load_split(PROTOCOL, "train")  # the first load also checks the file's sha256
        bar.update(1)
        test = load_split(PROTOCOL, "test")
        bar.update(1)
    alphabet_of = np.array([n.split("/")[0] for n in test.class_names])
    unseen = sorted(set(alphabet_of) - {n.split("/")[0] for n in train.class_names})
    candidates = np.flatnonzero(np.isin(alphabet_of, unseen))  # class indices
    rng = np.random.default_rng(opts.seed)
    if opts.alphabets is not None:
        if opts.alphabets > len(unseen):
            raise click.ClickException(f"--alphabets {opts.alphabets}: {PROTOCOL} has only {len(unseen)} "
                                       f"never-seen alphabets ({', '.join(unseen)})")
        chosen = rng.choice(unseen, opts.alphabets, replace=False)
        classes = candidates[np.isin(alphabet_of[candidates], chosen)]
    else:
        if opts.characters > len(candidates):
            raise click.ClickException(f"--characters {opts.characters}: {PROTOCOL} has only "
                                       f"{len(candidates)} characters in never-seen alphabets")
        classes = rng.choice(candidates, opts.characters, replace=False)
    keep = np.flatnonzero(np.isin(test.labels, classes))
    stream = test.subset(rng.permutation(keep))
    classes, labels = np.unique(stream.labels, return_inverse=True)
    stream.labels = labels.astype(np.int64)
    return stream, [test.class_names[c] for c in classes], sorted(set(alphabet_of[classes].tolist()))


def cluster_stream(rt, images, batch: int, progress: bool):
    """Feed the stream through Runtime.cluster `batch` images at a time, as a camera would.
    Returns (cluster id per image as assigned, per-image latency in ms)."""
    import numpy as np
    from tqdm import tqdm

    assigned = np.empty(len(images), np.int64)
    latency = np.empty(len(images), np.float64)
    with tqdm(total=len(images), desc="stream", unit="img", disable=not progress, leave=False) as bar:
        for i in range(0, len(images), batch):
            x = images[i:i + batch]
            t0 = time.perf_counter()
            out = rt.cluster(x)
            latency[i:i + len(x)] = (time.perf_counter() - t0) * 1000.0 / len(x)
            assigned[i:i + len(x)] = [a.cluster_id for a in out]
            bar.update(len(x))
    return assigned, latency


def embed_all(rt, images, progress: bool, chunk: int = 256):
    import numpy as np
    from tqdm import tqdm

    parts = [rt.embed(images[i:i + chunk]) for i in tqdm(range(0, len(images), chunk), desc="embed for report",
                                                           unit="batch", disable=not progress, leave=False)]
    return np.concatenate(parts)


def final_clusters(clusterer, assigned):
    """Where each image's cluster ended up: merges redirect ids; dissolved or evicted clusters keep
    the id they had (they are still a group the device formed)."""
    import numpy as np

    cache = {cid: clusterer.resolve(cid) for cid in np.unique(assigned).tolist()}
    return np.array([cache[c] for c in assigned.tolist()], np.int64)


# ----------------------------------------------------------------------------- the demo

def clear_run_files(out: Path) -> None:
    """Remove what an earlier run left (a stale metrics.jsonl would draw another run's curves);
    only the run directory's own files, never the folder itself: --out may be a user's folder."""
    from . import rundir

    out.mkdir(parents=True, exist_ok=True)
    for name in (rundir.RUN_JSON, rundir.METRICS, rundir.STREAM, rundir.REPORT):
        (out / name).unlink(missing_ok=True)
    shutil.rmtree(out / rundir.FIGURES, ignore_errors=True)


def run_demo(opts: DemoOptions) -> Path:
    """Every step of the demo; returns the run directory (with run.json, stream.npz, metrics)."""
    import numpy as np

    from . import rundir
    from .runtime import Runtime
    from .runtime.bundle import BundleError, load_bundle
    from .streamstats import stream_sections

    watch = Stopwatch()
    stream, class_names, alphabets = unseen_stream(opts)  # first: a bad --characters fails before training
    clear_run_files(opts.out)
    t = time.perf_counter()
    use_committed = opts.pretrained and committed_bundle_is_current()
    if opts.bundle is not None:
        checkpoint, training = None, {"source": "bundle", "bundle": str(opts.bundle)}
        click.echo("[1/4] --bundle: skipping training and export")
    elif use_committed:  # the committed bundle needs no checkpoint
        checkpoint, training = None, {"source": "committed", "bundle": str(PRETRAINED_BUNDLE)}
        click.echo("[1/4] --pretrained: skipping training")
    else:
        checkpoint, training = obtain_checkpoint(opts)
    watch.step("train", t)

    t = time.perf_counter()
    bundle_dir = opts.bundle or obtain_bundle(opts, checkpoint, use_committed)
    watch.step("export", t)

    click.echo("[3/4] verifying the bundle and starting the runtime")
    t = time.perf_counter()
    try:
        bundle = load_bundle(bundle_dir)
    except BundleError as e:
        raise click.ClickException(str(e)) from None
    threshold, threshold_rule = demo_threshold(bundle, opts.threshold, opts.alphabets is not None)
    rt = Runtime(bundle, backend=opts.backend, threshold=threshold)
    watch.step("verify_and_start", t)

    click.echo(f"[4/4] streaming {len(stream)} unlabelled images of {len(class_names)} never-seen "
               f"characters ({len(alphabets)} alphabet{'s' if len(alphabets) > 1 else ''}: {', '.join(alphabets)}) "
               "in random order")
    t = time.perf_counter()
    assigned, latency = cluster_stream(rt, stream.images, opts.batch, opts.progress)
    watch.step("stream", t)
    t = time.perf_counter()
    embedding = embed_all(rt, stream.images, opts.progress)  # for the projection; not in the latencies
    watch.step("embed_for_report", t)
    final = final_clusters(rt.clusterer, assigned)

    sections = stream_sections(final, stream.labels, class_names, latency)
    online = stream_sections(assigned, stream.labels)["summary"]
    sections["summary"].update(acc_as_assigned=online["acc"], ari_as_assigned=online["ari"],
                               clusters_established=rt.clusterer.n_found,
                               singletons_held=rt.clusterer.n_candidates)
    clusterer_params = rt.clusterer.get_params()
    run = rundir.new_run(
        "demo", f"demo-seed{opts.seed}",
        **sections,
        timings_s={**watch.timings, "total": watch.total()},
        training={**training, **checkpoint_facts(checkpoint or (None if opts.bundle else PRETRAINED_CHECKPOINT))},
        bundle=bundle_facts(bundle),
        settings={"protocol": PROTOCOL, "alphabets": alphabets, "whole_alphabets": opts.alphabets is not None,
                  "seed": opts.seed, "batch": opts.batch,
                  "pretrained": opts.pretrained, "backend": rt.backend, "precision": "fp32",
                  "distance": clusterer_params["distance"], "bundle": str(bundle_dir),
                  "threshold_rule": threshold_rule,
                  "clusterer": clusterer_params},
        class_names=class_names,
    )
    rundir.write_run_json(opts.out, run)
    rundir.write_stream(opts.out, stream.images, final, labels=stream.labels,
                        embedding=embedding.astype(np.float32), latency_ms=latency.astype(np.float32))
    metrics = PRETRAINED_METRICS if opts.pretrained else opts.out / "train" / rundir.METRICS
    if opts.bundle is None and metrics.is_file():
        shutil.copyfile(metrics, opts.out / rundir.METRICS)
    return opts.out


def demo_threshold(bundle, given: float | None, whole_alphabets: bool = True) -> tuple[float | None, str]:
    """(threshold for the Runtime, None = the bundle's default; how it was chosen)."""
    from .runtime.clustering import rule_threshold

    if given is not None:
        return given, "--threshold"
    if not whole_alphabets:  # characters of many alphabets: what the bundle's own default is for
        return None, "the bundle's default (characters of many alphabets)"
    stored = bundle.calibration.get("cluster_threshold") or {}
    if stored.get("chosen_by") == "stream silhouette":  # the bundle found its own class granularity
        return None, "the bundle's stored threshold (stream silhouette)"
    whitened = (bundle.output_spec.get("whitening") or {}).get("applied", False)
    factor = ALPHABET_THRESHOLD_FACTOR_WHITENED if whitened else ALPHABET_THRESHOLD_FACTOR
    return (rule_threshold(bundle.calibration, factor),
            f"{factor:g} x the calibration midpoint (one-alphabet streams{', whitened bundle' if whitened else ''})")


def checkpoint_facts(path: Path | None) -> dict:
    """The trainer's own end-of-training numbers, from the checkpoint's header (no tensors read)."""
    from .rundir import RunDirError
    from .run_summaries import checkpoint_meta

    if path is None or not Path(path).is_file():
        return {}
    try:
        meta = checkpoint_meta(Path(path))
    except RunDirError:
        return {}
    metrics = meta.get("metrics", {})
    return {"held_out": metrics.get("training", {}), "seconds": metrics.get("seconds"),
            "distance": meta.get("distance")}


def bundle_facts(bundle) -> dict:
    """What export measured and calibrated, as recorded in the verified manifest."""
    m = bundle.manifest
    fp32 = m["variants"]["fp32"]
    stored = m["calibration"].get("cluster_threshold") or {}
    return {"model": m["model"]["version"], "fp32_acc_5w1s": fp32.get("acc_5w1s"),
            "fp32_max_abs_diff": fp32.get("max_abs_diff"),
            "new_cluster_threshold": m["calibration"].get("new_cluster_threshold"),
            "clustering_threshold": stored.get("value"),
            "clustering_threshold_chosen_by": stored.get("chosen_by", "calibration rule (not stored)")}


def summary_lines(run: dict) -> list[str]:
    """The terminal summary, with the report's number formatting (the same values as run.json)."""
    from .report import format_value as f

    s, lat, tim = run["summary"], run.get("latency_ms", {}), run["timings_s"]
    return [
        f"clusters found {f(s['clusters_found'])} for {f(s['clusters_true'])} true characters "
        f"({f(s['images'])} images; {f(s.get('clusters_established'))} with 2+ images, "
        f"{f(s.get('singletons_held'))} single far images held)",
        f"Hungarian ACC {f(s['acc'])}   ARI {f(s['ari'])}   NMI {f(s['nmi'])}   "
        f"(as assigned online: ACC {f(s['acc_as_assigned'])}, ARI {f(s['ari_as_assigned'])})",
        f"latency per image: p50 {f(lat.get('p50'))} ms, p99 {f(lat.get('p99'))} ms "
        f"({f(lat.get('images_per_s'))} images/s, batch {f(run['settings']['batch'])})",
        f"time: {f(tim['total'])} s in all (training {f(tim['train'])} s, export {f(tim['export'])} s, "
        f"stream {f(tim['stream'])} s)",
    ]


@click.command()
@click.option("--pretrained", is_flag=True,
              help="Start from the committed encoder and bundle (models/omniglot/) instead of training.")
@click.option("--bundle", "bundle_path", type=click.Path(exists=True, path_type=Path), default=None,
              help="Demo this exported bundle (directory or .tar.gz) instead of training and exporting.")
@click.option("--time-budget", default="2m", show_default=True,
              help="Meta-training time (e.g. 90s, 2m); ignored with --pretrained.")
@click.option("--characters", default=DemoOptions.characters, show_default=True, type=click.IntRange(1, None),
              help="How many characters to stream, drawn from all never-seen alphabets (chosen with --seed).")
@click.option("--alphabets", default=None, type=click.IntRange(1, None),
              help="Stream this many whole never-seen alphabets instead (harder: look-alike characters).")
@click.option("--seed", default=0, show_default=True, type=int, help="Seeds training, the characters chosen and their order.")
@click.option("--batch", default=1, show_default=True, type=click.IntRange(1, None),
              help="Images per runtime call (1 = a frame at a time).")
@click.option("--backend", default="auto", show_default=True, help="Runtime backend (auto, cpu, cuda, tensorrt).")
@click.option("--threshold", type=click.FloatRange(min=0, min_open=True), default=None,
              help="New-cluster distance; default from the bundle's calibration.")
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), default=Path("runs/demo"),
              show_default=True, help="Run directory to write (replaced).")
@click.option("--no-report", is_flag=True, help="Skip the HTML report.")
def demo_command(pretrained, bundle_path, time_budget, characters, alphabets, seed, batch, backend, threshold, out,
                 no_report):
    """Train briefly without labels, export, verify, and cluster never-seen characters; writes a report.

    The README's first command (`make demo`). About 2.5-3 minutes on a 2-core CPU; with --pretrained
    about 10 seconds.
    """
    from . import rundir
    from .app_cli import report_or_explain

    seconds = DemoOptions.time_budget_s
    if not (pretrained or bundle_path):  # only training needs torch; a device can demo a bundle
        from ._deps import require_torch

        require_torch()
        from .trainer.config import parse_duration

        try:
            seconds = parse_duration(time_budget)
        except ValueError as e:
            raise click.BadParameter(str(e), param_hint="--time-budget") from None
    from .runtime.backends import BACKENDS

    if backend not in BACKENDS:  # before minutes of training, not after
        raise click.BadParameter(f"unknown backend {backend!r}; choose one of {', '.join(BACKENDS)}",
                                 param_hint="--backend")
    if pretrained and bundle_path:
        raise click.UsageError("--pretrained and --bundle both choose the model; give one")
    opts = DemoOptions(out=out, pretrained=pretrained, bundle=bundle_path, time_budget_s=seconds,
                       characters=characters, alphabets=alphabets, seed=seed, batch=batch, backend=backend,
                       threshold=threshold)
    from .datasets import DataError
    from .runtime.bundle import BundleError
    from .runtime.errors import BackendUnavailable, InputError, StateError

    try:
        run_dir = run_demo(opts)
    except (InputError, StateError, BackendUnavailable, BundleError, DataError) as e:
        raise click.ClickException(str(e)) from None
    run = rundir.read_run_json(run_dir)
    click.echo("")
    for line in summary_lines(run):
        click.echo(line)
    if not no_report:
        report_or_explain(run_dir)
