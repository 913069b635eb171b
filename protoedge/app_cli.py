"""`protoedge demo` and `protoedge report`: the whole pipeline end to end, and its pictures.
Also the reports at the end of `train` (report_after_training) and of every `bench` command."""
import time
from pathlib import Path

import click

_CLI_START = time.time()  # a bench result written after this is the one this process made
BENCH_RESULTS = Path(__file__).resolve().parent.parent / "benchmarks" / "results"


def has_matplotlib() -> bool:
    """The report's figures need it; the device install (no [train] extra) does not have it."""
    import importlib.util

    return importlib.util.find_spec("matplotlib") is not None


def report_or_explain(run_dir) -> Path | None:
    """Write RUN_DIR/report.html and say where it is; other commands call this at their end.
    Without matplotlib (the device install) it says how to get the report instead of failing the job."""
    from .rundir import RunDirError

    if not has_matplotlib():
        click.echo(f"report: skipped (needs matplotlib: pip install 'protoedge[train]'), "
                   f"then run: protoedge report {run_dir}", err=True)
        return None
    from .report import write_report

    try:
        path = write_report(run_dir)
    except RunDirError as e:
        raise click.ClickException(str(e)) from None
    click.echo(f"report: {path}")
    return path


def report_after_training(out_dir) -> Path | None:
    """`protoedge train` calls this at its end: run.json from the checkpoint, then the report."""
    from .rundir import RunDirError
    from .run_summaries import training_run

    try:
        training_run(out_dir)
    except RunDirError as e:
        click.echo(f"report: skipped ({e})", err=True)
        return None
    return report_or_explain(out_dir)


def report_after_bench(results_dir: Path | None = None, since: float | None = None) -> list[Path]:
    """A report per result JSON the bench just wrote: results_dir/reports/NAME/report.html.
    A report that cannot be made is a warning: the benchmark itself succeeded."""
    from .rundir import RunDirError
    from .run_summaries import bench_run

    results_dir = BENCH_RESULTS if results_dir is None else results_dir
    since = _CLI_START if since is None else since
    pages = []
    for result in sorted(results_dir.glob("*.json")):
        if result.stat().st_mtime < since:
            continue
        run_dir = results_dir / "reports" / result.stem
        try:
            bench_run(result, run_dir)
            page = report_or_explain(run_dir)
        except (RunDirError, click.ClickException) as e:
            click.echo(f"report for {result.name}: skipped ({e})", err=True)
            continue
        if page:
            pages.append(page)
    return pages


def register(main: click.Group, bench: click.Group) -> None:
    from .demo import demo_command

    main.add_command(demo_command, name="demo")

    @bench.result_callback()
    def _report_bench(*_args, **_kwargs):
        # click calls this after any `protoedge bench NAME` succeeded: one hook for every benchmark.
        report_after_bench()

    @main.command()
    @click.argument("run_dir", type=click.Path(file_okay=False, path_type=Path))
    def report(run_dir: Path):
        """Write RUN_DIR/report.html (self-contained, figures embedded) and RUN_DIR/figures/*.png.

        \b
        RUN_DIR holds run.json (the numbers), and optionally metrics.jsonl (training curves) and
        stream.npz (a clustered stream: images, cluster, labels, embedding, latency_ms).
        `protoedge demo` writes one; see the README's "Reports" section for the format.
        """
        if not has_matplotlib():
            raise click.ClickException("the report needs matplotlib: pip install 'protoedge[train]'")
        if not run_dir.is_dir():
            raise click.ClickException(f"{run_dir}: no such run directory")
        report_or_explain(run_dir)
