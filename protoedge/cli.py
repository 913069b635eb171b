"""The `protoedge` command. Each layer contributes its own sub-commands (see its cli.py);
nothing here imports torch, so the device install runs every runtime command."""
from __future__ import annotations

import logging

import click

from . import __version__


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="protoedge")
@click.option("-v", "--verbose", count=True, help="More log output (-vv for debug).")
def main(verbose: int):
    """Meta-learn an encoder without labels, export it, and adapt/cluster on the edge.

    \b
    Pipeline:  train -> export -> (cluster | serve)   on a workstation, then a device
    Quick look: protoedge demo
    """
    level = logging.WARNING - 10 * verbose
    logging.basicConfig(level=max(level, logging.DEBUG), format="%(levelname)s %(name)s: %(message)s")


@main.group()
def bench():
    """Benchmarks; each writes benchmarks/results/<name>.md and .json."""


def _register_layers() -> None:
    from .trainer import cli as trainer_cli
    from .export import cli as export_cli
    from .runtime import cli as runtime_cli
    from . import app_cli

    for module in (trainer_cli, export_cli, runtime_cli, app_cli):
        module.register(main, bench)


_register_layers()

if __name__ == "__main__":
    main()
