"""`protoedge demo` and `protoedge report`: the whole pipeline end to end, and its pictures."""
from pathlib import Path

import click


def report_or_explain(run_dir) -> Path | None:
    """Write RUN_DIR/report.html and say where it is; other commands call this at their end.
    Without matplotlib (the device install) it says how to get the report instead of failing the job."""
    from .rundir import RunDirError

    try:
        import matplotlib  # noqa: F401
    except ImportError:
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


def register(main: click.Group, bench: click.Group) -> None:
    from .demo import demo_command

    main.add_command(demo_command, name="demo")

    @main.command()
    @click.argument("run_dir", type=click.Path(file_okay=False, path_type=Path))
    def report(run_dir: Path):
        """Write RUN_DIR/report.html (self-contained, figures embedded) and RUN_DIR/figures/*.png.

        \b
        RUN_DIR holds run.json (the numbers), and optionally metrics.jsonl (training curves) and
        stream.npz (a clustered stream: images, cluster, labels, embedding, latency_ms).
        `protoedge demo` writes one; see the README's "Reports" section for the format.
        """
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            raise click.ClickException("the report needs matplotlib: pip install 'protoedge[train]'") from None
        if not run_dir.is_dir():
            raise click.ClickException(f"{run_dir}: no such run directory")
        report_or_explain(run_dir)
