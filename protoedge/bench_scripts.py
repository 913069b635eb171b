"""Load a benchmark script from the source checkout's benchmarks/ folder.

The benchmarks are scripts, not part of the installed package (they may import torch, river or
scikit-learn); the `protoedge bench ...` commands run them from a source checkout.
"""
from __future__ import annotations

import importlib.util
from pathlib import Path
from types import ModuleType

import click

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"


def load_bench_script(name: str) -> ModuleType:
    script = BENCHMARKS / f"{name}.py"
    if not script.is_file():
        raise click.ClickException(f"{script} not found: the benchmarks run from a source checkout")
    spec = importlib.util.spec_from_file_location(f"protoedge_bench_{name}", script)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
