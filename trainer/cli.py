"""`protoedge train`, `protoedge eval`, `protoedge bench fewshot` (torch imported lazily)."""
import json
import os
from pathlib import Path

import click

from protoedge._deps import require_torch

PROTOCOLS = ("omniglot-a", "omniglot-b", "mnist")


def _int_list(text: str, name: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise click.BadParameter(f"{text!r}: want comma-separated integers, e.g. 5,20", param_hint=name) from None
    if not values or min(values) < 1:
        raise click.BadParameter(f"{text!r}: want positive integers", param_hint=name)
    return values


def register(main: click.Group, bench: click.Group) -> None:
    @main.command()
    @click.option("--protocol", type=click.Choice(PROTOCOLS), default="omniglot-a", show_default=True,
                  help="Which shipped training images to learn from (their labels are dropped).")
    @click.option("--out", type=click.Path(file_okay=False), required=True,
                  help="Run folder: checkpoint.safetensors, metrics.jsonl, config.json.")
    @click.option("--data", type=click.Path(exists=True, file_okay=False), default=None,
                  help="Train on an unlabelled image folder instead (recursive png/jpg, any size; read from "
                       "disk by worker processes; images resized to image_size, default 84, 3 channels).")
    @click.option("--recipe", type=click.Choice(["default", "autoencoder", "cactus", "maml", "supervised", "gpu"]),
                  default="default", show_default=True,
                  help="default: AE + ProtoNet on augmentation + k-means tasks. 'supervised' READS LABELS "
                       "(the ceiling baseline). gpu: the default recipe with ResNet-12 at 84x84, bf16, "
                       "channels-last, torch.compile.")
    @click.option("--time-budget", default="30m", show_default=True,
                  help="Wall-clock budget for the whole run, e.g. 30m, 90s, 1h.")
    @click.option("--steps", type=click.IntRange(min=0), default=0,
                  help="Fixed number of meta steps instead of filling the budget (exactly reproducible).")
    @click.option("--seed", type=int, default=0, show_default=True)
    @click.option("--resume", type=click.Path(dir_okay=False), default=None,
                  help="Continue from a checkpoint written by `train` (weights, optimizer, RNG, step) with "
                       "its saved config; --time-budget/--steps/--threads/--device/--set given here override it.")
    @click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto", show_default=True)
    @click.option("--precision", type=click.Choice(["auto", "bf16", "fp32"]), default="auto", show_default=True,
                  help="bf16 autocast or plain fp32; auto: bf16 where the device has bf16 units (CUDA, CPUs "
                       "with AVX512-BF16 / AMX), fp32 elsewhere (emulated bf16 is several times slower).")
    @click.option("--threads", type=click.IntRange(min=1), default=2, show_default=True)
    @click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE",
                  help="Override a config field (JSON value), e.g. --set aug_way=128.")
    @click.option("--save-to", type=click.Path(dir_okay=False), default=None,
                  help="Also write the small encoder-only checkpoint here (what gets committed/exported).")
    @click.option("--stop-after", type=click.IntRange(min=0), default=None, metavar="STEP",
                  help="End this session after meta step STEP with a resumable checkpoint (continue with --resume).")
    @click.option("--no-report", is_flag=True, help="Do not write the HTML report at the end.")
    def train(protocol, data, out, recipe, time_budget, steps, seed, resume, device, precision, threads,
              overrides, save_to, stop_after, no_report):
        """Meta-learn the encoder without labels (autoencoder, then ProtoNet on pseudo-tasks).

        \b
        Several processes (DistributedDataParallel; gloo on CPU, nccl on GPUs):
          torchrun --standalone --nproc-per-node N --no-python protoedge train ...
        Each process computes episodes_per_step / N episodes of a step (default: one each). Rank 0
        logs and writes the checkpoint; a run resumes with any number of processes."""
        require_torch()
        from .config import parse_duration, recipe_config

        try:
            budget = parse_duration(time_budget)
        except ValueError as e:
            raise click.BadParameter(str(e), param_hint="--time-budget") from None
        if budget <= 0:
            raise click.BadParameter("must be positive", param_hint="--time-budget")
        extra = {}
        for item in overrides:
            key, sep, value = item.partition("=")
            if not sep:
                raise click.BadParameter(f"{item!r}: want KEY=VALUE", param_hint="--set")
            try:
                extra[key] = json.loads(value)
            except json.JSONDecodeError:
                extra[key] = value
        if device == "cuda":
            import torch
            if not torch.cuda.is_available():
                raise click.ClickException("--device cuda: no CUDA device is available (use --device auto)")
        if resume and not Path(resume).is_file():
            raise click.ClickException(f"--resume {resume}: no such checkpoint file")
        from .checkpoint import CheckpointError, load_checkpoint, strip_checkpoint
        from .config import TrainConfig
        from .train import train as run_training

        try:
            if resume:
                # The run continues with its own config; only what is given on this command line changes.
                ctx = click.get_current_context()
                given = lambda name: ctx.get_parameter_source(name) == click.core.ParameterSource.COMMANDLINE
                try:
                    saved = load_checkpoint(resume)[1]["config"]
                except (CheckpointError, KeyError) as e:
                    raise click.ClickException(f"--resume {resume}: {e or 'no training config in it'}") from None
                changes = {**({"time_budget_s": budget} if given("time_budget") else {}),
                           **({"steps": steps} if given("steps") else {}),
                           **({"device": device} if given("device") else {}),
                           **({"threads": threads} if given("threads") else {}), **extra}
                cfg = TrainConfig.from_dict({**saved, **changes})
            else:
                cfg = recipe_config(recipe, protocol, seed=seed, time_budget_s=budget, steps=steps, device=device,
                                    precision=precision, threads=threads, **({"data": data} if data else {}),
                                    **extra)
        except (TypeError, ValueError) as e:
            raise click.ClickException(f"bad configuration: {e}") from None

        from protoedge.datasets import DataError

        from .config import ConfigError
        from .distributed import launched_by_torchrun
        try:
            path = run_training(cfg, out, resume=resume, stop_at_step=stop_after)
        except (CheckpointError, ConfigError, DataError) as e:
            raise click.ClickException(str(e)) from None
        if launched_by_torchrun() and int(os.environ.get("RANK", "0")) != 0:
            return  # rank 0 reports
        click.echo(f"checkpoint: {path}")
        if save_to:
            click.echo(f"encoder-only checkpoint: {strip_checkpoint(path, save_to)}")
        if no_report or (stop_after is not None and load_checkpoint(path)[1]["state"]["stage"] != "done"):
            return  # (a session of an unfinished run: the report comes at its end)
        from protoedge.app_cli import report_after_training  # issue 6: curves + numbers as HTML

        report_after_training(out)

    @main.command(name="eval")
    @click.argument("checkpoint", type=click.Path(dir_okay=False))
    @click.option("--protocol", type=click.Choice(PROTOCOLS), default="omniglot-a", show_default=True,
                  help="Scores on this protocol's held-out (test) images.")
    @click.option("--ways", default="5,20", show_default=True)
    @click.option("--shots", default="1,5", show_default=True)
    @click.option("--episodes", type=click.IntRange(min=1), default=1000, show_default=True)
    @click.option("--queries", type=click.IntRange(min=1), default=15, show_default=True,
                  help="Queries per class (CACTUs used 5).")
    @click.option("--refine", is_flag=True, help="Also report test-time soft k-means refinement (separately).")
    @click.option("--no-clustering", is_flag=True, help="Skip k-means clustering of the test classes.")
    @click.option("--seed", type=int, default=0, show_default=True)
    @click.option("--json-out", type=click.Path(dir_okay=False), default=None, help="Write the result as JSON.")
    def eval_(checkpoint, protocol, ways, shots, episodes, queries, refine, no_clustering, seed, json_out):
        """Few-shot accuracy and clustering of novel classes for a checkpoint."""
        ways, shots = _int_list(ways, "--ways"), _int_list(shots, "--shots")
        require_torch()
        from .checkpoint import CheckpointError, load_encoder
        from .evaluate import embed, fewshot_table, kmeans_clustering
        from protoedge import datasets

        try:
            encoder, meta = load_encoder(checkpoint)
        except CheckpointError as e:
            raise click.ClickException(str(e)) from None
        distance = meta.get("distance", "sqeuclidean")
        data = datasets.load_split(protocol, "test")
        n_classes = len(set(data.labels.tolist()))
        if max(ways) > n_classes:
            raise click.ClickException(f"--ways {max(ways)}: {protocol} has only {n_classes} test classes")
        settings = [(n, k) for n in ways for k in shots]
        if data.images.shape[1] != encoder.config.in_channels:
            raise click.ClickException(f"{protocol} images have {data.images.shape[1]} channel(s), the encoder "
                                       f"takes {encoder.config.in_channels}")
        from .data import resize_pixels  # the trainer's resize, for encoders trained at another size (84)

        z = embed(encoder, resize_pixels(data.images, encoder.config.input_size).numpy())
        try:
            result = {"checkpoint": str(checkpoint), "protocol": protocol, "distance": distance,
                      "fewshot": fewshot_table(z, data.labels, distance, settings, episodes, queries, seed=seed)}
            if refine:
                result["fewshot_refined"] = fewshot_table(z, data.labels, distance, settings, episodes, queries,
                                                          refine_steps=1, seed=seed)
        except ValueError as e:
            raise click.ClickException(str(e)) from None
        if not no_clustering:
            result["clustering"] = kmeans_clustering(z, data.labels, distance, seed=seed)
        for key in ("fewshot", "fewshot_refined"):
            for name, r in result.get(key, {}).items():
                tag = " (+soft k-means)" if key == "fewshot_refined" else ""
                click.echo(f"{name}{tag}: {r['acc']:.2f} +- {r['ci95']:.2f} %")
        if "clustering" in result:
            c = result["clustering"]
            click.echo(f"k-means (k={c['k']}): ACC {100 * c['acc']:.2f} %, NMI {100 * c['nmi']:.2f}, "
                       f"ARI {100 * c['ari']:.2f}")
        if json_out:
            Path(json_out).write_text(json.dumps(result, indent=2))

    @bench.command(name="fewshot")
    @click.option("--runs", type=click.Path(file_okay=False), default="runs", show_default=True,
                  help="Where the benchmark's training runs go.")
    @click.option("--quick", is_flag=True, help="Tiny budgets and 100 episodes: checks the pipeline, not the numbers.")
    @click.option("--only", multiple=True, help="Only these rows (names as in the table); others are kept from the last JSON.")
    def bench_fewshot(runs, quick, only):
        """Few-shot table: baselines, recipes, supervised ceiling, published anchors."""
        require_torch()
        from protoedge.bench_scripts import load_bench_script

        module = load_bench_script("fewshot")
        module.run(runs_dir=runs, quick=quick, only=list(only))

    @bench.command(name="scale")
    @click.option("--warmup", type=click.IntRange(min=1), default=3, show_default=True, help="Untimed steps first.")
    @click.option("--windows", type=click.IntRange(min=1), default=5, show_default=True, help="Timed windows.")
    @click.option("--window", type=click.IntRange(min=1), default=4, show_default=True, help="Steps per window.")
    @click.option("--quick", is_flag=True, help="A few steps: checks the pipeline, not the numbers (scale.quick.*).")
    def bench_scale(warmup, windows, window, quick):
        """Episodes/s with 1 and 2 CPU processes (torchrun, gloo), and the documented GPU commands."""
        require_torch()
        from protoedge.bench_scripts import load_bench_script

        report = load_bench_script("scale").run(warmup=warmup, windows=windows, window=window, quick=quick)
        for row in report["rows"]:
            click.echo(f"{row['name']}: {row['episodes_per_s']:.2f} episodes/s")
