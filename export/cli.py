"""`protoedge export`, `protoedge info`, `protoedge bench export`."""
from pathlib import Path

import click


def _precisions(ctx, param, value: str) -> tuple[str, ...]:
    items = tuple(dict.fromkeys(v.strip().lower() for v in value.split(",") if v.strip()))
    from protoedge.runtime.bundle import PRECISIONS

    bad = [v for v in items if v not in PRECISIONS]
    if bad:
        raise click.BadParameter(f"unknown precision {', '.join(bad)} (choose from {', '.join(PRECISIONS)})")
    if "fp32" not in items:
        items = ("fp32", *items)  # the reference variant is always shipped
    return items


def register(main: click.Group, bench: click.Group) -> None:
    @main.command()
    @click.argument("checkpoint", type=click.Path(dir_okay=False, path_type=Path))
    @click.option("--out", "-o", required=True, type=click.Path(file_okay=False, path_type=Path),
                  help="Bundle directory to write (an existing bundle there is replaced).")
    @click.option("--precision", default="fp32,fp16,int8,int8-cpu", show_default=True, callback=_precisions,
                  help="Comma-separated variants; fp32 is always included. int8: symmetric Q/DQ for "
                       "TensorRT; int8-cpu: uint8 activations for ONNX Runtime on CPUs.")
    @click.option("--calib", metavar="DATA", default=None,
                  help="Unlabelled images for INT8 and distance calibration: a protocol part such as "
                       "'omniglot-a:train', a folder, or an .npz/.npy file. Default: the training protocol's train part.")
    @click.option("--eval", "eval_", metavar="DATA", default=None,
                  help="Labelled novel-class images for the accuracy checks. Default: the protocol's test part.")
    @click.option("--episodes", default=1000, show_default=True, help="5-way 1-shot episodes per variant.")
    @click.option("--eval-classes", type=click.IntRange(min=5), default=None,
                  help="Score on the first K classes of the eval set only (quicker, noisier).")
    @click.option("--calib-items", type=click.IntRange(min=2), default=2000, show_default=True,
                  help="Unlabelled images for the distance calibration statistics.")
    @click.option("--whiten", type=click.Choice(["auto", "on", "off"]), default="auto", show_default=True,
                  help="Fold a whitening of the embedding, fitted on the --calib images (no labels), into the "
                       "graph: many fine novel classes separate better. auto: unless the calib images show "
                       "broad structure, which whitening flattens (export/whitening.py has the measurements).")
    @click.option("--whiten-shrinkage", type=click.FloatRange(min=0, min_open=True), default=None,
                  help="Eigenvalue shrinkage of the whitening, as a multiple of the mean eigenvalue "
                       "[default: 1.0].")
    @click.option("--archive", type=click.Path(dir_okay=False, path_type=Path), default=None,
                  help="Also pack the bundle into this .tar.gz for shipping.")
    @click.option("--tensorrt", is_flag=True, help="Also build TensorRT engines for this machine's GPU.")
    @click.option("--engine-dir", type=click.Path(file_okay=False, path_type=Path), default=None,
                  help="Engine cache for --tensorrt (default: BUNDLE/engines).")
    @click.option("--seed", default=0, show_default=True)
    def export(checkpoint, out, precision, calib, eval_, episodes, eval_classes, calib_items, whiten, whiten_shrinkage,
               archive, tensorrt, engine_dir, seed):
        """Compile CHECKPOINT to ONNX (FP32/FP16/INT8) in a verifiable bundle."""
        from protoedge._deps import require_torch

        require_torch()
        from protoedge.datasets import DataError
        from protoedge.runtime.bundle import BundleError
        from protoedge.trainer.checkpoint import CheckpointError

        from .onnx_export import ExportError
        from .pipeline import ExportOptions, export_bundle

        extra = {} if whiten_shrinkage is None else {"whiten_shrinkage": whiten_shrinkage}
        if archive is not None and not archive.name.endswith((".tar.gz", ".tgz")):
            raise click.BadParameter("the archive name must end in .tar.gz or .tgz", param_hint="--archive")
        opts = ExportOptions(precisions=precision, calib=calib, eval=eval_, episodes=episodes,
                             eval_classes=eval_classes, calib_items=calib_items, whiten=whiten, archive=archive,
                             tensorrt=tensorrt, engine_dir=engine_dir, seed=seed, **extra)
        try:
            result = export_bundle(checkpoint, out, opts)
        except (CheckpointError, DataError, ExportError, BundleError, FileExistsError, ValueError) as e:
            raise click.ClickException(str(e)) from None
        click.echo(result.bundle.summary())
        for p, reason in result.rejected.items():
            click.secho(f"refused {p}: {reason}", fg="yellow", err=True)
        if result.archive:
            click.echo(f"archive    {result.archive}")
        for p, plan in result.engines.items():
            click.echo(f"engine     {p} {plan}")
        if tensorrt and result.tensorrt_error:
            raise click.ClickException(f"bundle written and verified at {out}, but no TensorRT engine was built: "
                                       f"{result.tensorrt_error}. Devices build their own engine at first start.")

    @main.command()
    @click.argument("bundle", type=click.Path(path_type=Path))
    @click.option("--json", "as_json", is_flag=True, help="Print the whole manifest as JSON.")
    def info(bundle, as_json):
        """Verify BUNDLE (directory or .tar.gz) and print its manifest; non-zero exit if it fails."""
        import json

        from protoedge.runtime.bundle import BundleError, load_bundle

        try:
            loaded = load_bundle(bundle)
        except BundleError as e:
            raise click.ClickException(f"verification FAILED: {e}") from None
        if as_json:
            click.echo(json.dumps(loaded.manifest, indent=2))
        else:
            click.echo(loaded.summary())
        click.echo(f"verified   schema v{loaded.manifest['schema_version']}, {len(loaded.manifest['files'])} files "
                   "match their sha256, graphs match the manifest", err=as_json)

    @bench.command(name="export")
    @click.argument("checkpoint", type=click.Path(dir_okay=False, path_type=Path),
                    default=Path("models/omniglot/encoder.safetensors"))
    @click.option("--results", type=click.Path(file_okay=False, path_type=Path),
                  default=Path("benchmarks/results"), show_default=True)
    @click.option("--episodes", default=1000, show_default=True)
    @click.option("--repeats", default=200, show_default=True, help="Timed runs per batch size.")
    @click.option("--threads", default=1, show_default=True, help="ONNX Runtime intra-op threads.")
    def bench_export(checkpoint, results, episodes, repeats, threads):
        """FP32/FP16/INT8: parity, file size, 5-way 1-shot accuracy, CPU speed at batch 1 and 64."""
        from protoedge._deps import require_torch

        require_torch()
        from .benchmark import run_export_benchmark

        md, _ = run_export_benchmark(checkpoint, results, episodes=episodes, repeats=repeats, threads=threads)
        click.echo(md.read_text())
