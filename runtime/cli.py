"""`protoedge cluster`, `protoedge bench runtime` and (from serve_cli.py) `protoedge serve`.
Only click is imported here; the commands import the runtime when they run."""
import importlib.util
from pathlib import Path

import click

BACKEND_CHOICES = ["auto", "cpu", "cuda", "tensorrt", "ort-tensorrt"]


def register(main: click.Group, bench: click.Group) -> None:
    register_cluster(main)
    register_bench_runtime(bench)
    register_serve(main, bench)
    from . import fleet_cli  # `protoedge state export|import|merge|show` (fleets)
    fleet_cli.register(main, bench)


def register_serve(main: click.Group, bench: click.Group) -> None:
    """The daemon's commands live in serve_cli.py (owned with the daemon); a placeholder until then."""
    if importlib.util.find_spec(f"{__package__}.serve_cli") is not None:
        from . import serve_cli

        serve_cli.register(main, bench)
        return

    @main.command()
    def serve():
        """Run the local clustering daemon."""
        raise click.ClickException("serve: not implemented yet (issue 5)")


def _user_errors():
    from protoedge.datasets import DataError

    from .bundle import BundleError
    from .errors import BackendUnavailable, InputError, StateError

    return (BundleError, InputError, StateError, BackendUnavailable, DataError)


def register_cluster(main: click.Group) -> None:
    from .bundle import PRECISIONS  # stdlib only: the CLI still starts without numpy or onnxruntime

    @main.command()
    @click.argument("bundle", type=click.Path(path_type=Path))
    @click.argument("inputs", nargs=-1, metavar="[INPUT]...")
    @click.option("--backend", type=click.Choice(BACKEND_CHOICES), default="auto", show_default=True)
    @click.option("--precision", type=click.Choice(("auto",) + PRECISIONS), default="fp32", show_default=True,
                  help="Bundle variant: int8-cpu is the fast INT8 for ONNX Runtime on CPUs, int8 the one for "
                       "TensorRT; auto picks as `serve` does (int8-cpu on the CPU backend when the bundle has it).")
    @click.option("--threads", type=click.IntRange(1), default=None, help="ONNX Runtime intra-op threads "
                  "(default: all cores).")
    @click.option("--threshold", type=click.FloatRange(min=0, min_open=True), default=None,
                  help="New-cluster distance (default: from the bundle's calibration).")
    @click.option("--tune-threshold", "tune_on", type=click.Path(exists=True, path_type=Path), default=None,
                  help="Pick the threshold without labels on these unlabelled images (folder, .npz, .npy) from "
                       "the same domain: best silhouette over multiples of the calibration threshold.")
    @click.option("--max-clusters", type=click.IntRange(1), default=None, help="Cluster cap [default: 1000].")
    @click.option("--decay", type=click.FloatRange(0, 1, min_open=True), default=None,
                  help="Per-sample decay of cluster counts [default: 0.999].")
    @click.option("--refine-every", type=click.IntRange(0), default=None,
                  help="Repair (split mixed clusters, reassign, merge fragments) every N samples over the last 256, 0 = off [default: 50].")
    @click.option("--recluster/--no-recluster", default=None,
                  help="At each repair, also redraw the remembered samples' clusters where Ward's hierarchy cut "
                       "by silhouette fits better (streams of few, look-alike classes: +1.2 points ACC on "
                       "benchmark (a); costs ~1.3 ms a repair while active) [default: off].")
    @click.option("--state", "state_dir", type=click.Path(file_okay=False, path_type=Path), default=None,
                  help="Resume from and save to this state folder.")
    @click.option("--keep", type=click.IntRange(1), default=3, show_default=True,
                  help="State generations to keep.")
    @click.option("--labels", "use_labels", is_flag=True,
                  help="Score against the labels stored with the input (npz 'labels'/'y', class sub-folders).")
    @click.option("--labels-file", type=click.Path(dir_okay=False, exists=True, path_type=Path), default=None,
                  help="Score against these labels (.npy or whitespace-separated integers), in input order.")
    @click.option("--output", "-o", type=click.Path(dir_okay=False, allow_dash=True), default="-",
                  show_default=True, help="JSONL assignments (one line per image).")
    @click.option("--batch-size", type=click.IntRange(1), default=64, show_default=True)
    @click.option("--cache-dir", type=click.Path(file_okay=False, path_type=Path), default=None,
                  help="Engine/timing caches for the GPU backends (default: ~/.cache/protoedge).")
    def cluster(bundle, inputs, backend, precision, threads, threshold, tune_on, max_clusters, decay, refine_every,
                recluster, state_dir, keep, use_labels, labels_file, output, batch_size, cache_dir):
        """Cluster images with BUNDLE and write one JSON line per image.

        INPUT is an image folder, an .npz/.npy file or an image; '-' (or nothing) reads .npy arrays
        from stdin, e.g. `python make_batches.py | protoedge cluster models/omniglot/bundle -`.
        With --labels/--labels-file, ACC / ARI / NMI and the number of clusters are printed.
        """
        run_cluster_command(bundle, inputs, backend=backend, precision=precision, threads=threads,
                            threshold=threshold, tune_on=tune_on, max_clusters=max_clusters, decay=decay,
                            refine_every=refine_every, recluster=recluster, state_dir=state_dir, keep=keep, use_labels=use_labels,
                            labels_file=labels_file, output=output, batch_size=batch_size, cache_dir=cache_dir)


def run_cluster_command(bundle, inputs, *, backend, precision, threads, threshold, max_clusters, decay,
                        refine_every, state_dir, keep, use_labels, labels_file, output, batch_size, cache_dir,
                        tune_on=None, recluster=None):
    import sys

    import numpy as np
    from tqdm import tqdm

    from . import cluster_command as cc
    from .pipeline import Runtime

    errors = _user_errors()
    if use_labels and labels_file:
        raise click.UsageError("give either --labels or --labels-file, not both")
    files = [p for p in inputs if p != "-"]
    from_stdin = not inputs or "-" in inputs
    if from_stdin and files:
        raise click.UsageError("read either files or stdin ('-'), not both")
    if from_stdin and use_labels:
        raise click.UsageError("--labels needs labelled files; for stdin use --labels-file")
    if tune_on and threshold:
        raise click.UsageError("give either --threshold or --tune-threshold, not both")
    try:
        rt = Runtime(bundle, backend=backend, precision=precision, threads=threads, state_dir=state_dir,
                     cache_dir=cache_dir, keep=keep, threshold=threshold, max_clusters=max_clusters,
                     decay=decay, refine_every=refine_every, recluster=recluster)
        spec = rt.bundle.input_spec
        size, channels = (spec["height"], spec["width"]), spec["channels"]
        if tune_on:
            chosen = cc.tune_threshold(rt, tune_on, size, channels)
            # the base is the bundle's default: its stored threshold if export chose one, else the rule
            click.echo(f"threshold {chosen['threshold']:.4g} (x{chosen['factor']:g} the bundle's default "
                       f"{chosen['base']:.4g}), picked without labels on {tune_on}", err=True)
        true = cc.read_labels_file(labels_file) if labels_file else None
        if from_stdin:
            batches, total = cc.stdin_batches(cc.stdin_binary(), size, channels), None
        else:
            batches = cc.load_inputs(files, size, channels, with_labels=use_labels)
            for b in batches:
                rt.validate(b.images)  # every file checked before the first sample is learned
            total = sum(len(b.images) for b in batches)
            if use_labels:
                true = np.concatenate([b.labels for b in batches])
        to_stdout = output == "-"
        out = sys.stdout if to_stdout else open(output, "w")
        try:
            with tqdm(total=total, unit="img", desc="cluster", disable=None, file=sys.stderr) as bar:
                result = cc.run_cluster(rt, batches, out, batch_size, progress=bar)
        finally:
            if not to_stdout:
                out.close()
        scores = cc.report_scores(rt, result["ids"], true) if true is not None else None
        saved = rt.save() if state_dir else None
    except errors as e:
        raise click.ClickException(str(e)) from None
    n = len(result["ids"])
    summary = (f"{n} images, {rt.clusterer.n_clusters} clusters, backend {rt.backend} "
               f"({', '.join(rt.providers)}), {n / max(result['seconds'], 1e-9):.0f} images/s")
    click.echo(summary, err=to_stdout)
    if scores:
        click.echo(cc.format_scores(scores), err=to_stdout)
    if saved:
        click.echo(f"state saved: {saved}", err=to_stdout)


def register_bench_runtime(bench: click.Group) -> None:
    @bench.command(name="runtime")
    @click.option("--bundle", type=click.Path(path_type=Path), default=Path("models/omniglot/bundle"),
                  show_default=True)
    @click.option("--mnist-bundle", type=click.Path(path_type=Path), default=Path("models/mnist/bundle"),
                  show_default=True)
    @click.option("--results", type=click.Path(file_okay=False, path_type=Path),
                  default=Path("benchmarks/results"), show_default=True)
    @click.option("--streams", default=50, show_default=True, help="Random Omniglot streams for (a).")
    @click.option("--repeats", default=50, show_default=True, help="Timed calls per batch size and method: 4 x this, in rounds of 4 (50 -> 50 rounds).")
    @click.option("--quick", is_flag=True, help="Fewer repeats and streams (a smoke run, not for the record).")
    def bench_runtime(bundle, mnist_bundle, results, streams, repeats, quick):
        """Runtime speed (vs bare onnxruntime and eager torch) and stream clustering quality."""
        from protoedge.bench_scripts import load_bench_script

        module = load_bench_script("runtime")
        try:
            md = module.run(bundle=bundle, mnist_bundle=mnist_bundle, results=results, streams=streams,
                            repeats=repeats, quick=quick)
        except _user_errors() as e:
            raise click.ClickException(str(e)) from None
        click.echo(Path(md).read_text())
