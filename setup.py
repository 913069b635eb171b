"""The one compiled piece: the stream clusterer's per-sample loop (runtime/_rowloop.c).

Optional: without a C compiler the package installs without it and the clusterer runs the same
algorithm in numpy (runtime/clustering.py), a few times slower per sample. Everything else about
the package is in pyproject.toml."""
import sys

from setuptools import Extension, setup

flags = [] if sys.platform == "win32" else ["-O3", "-std=c11"]
setup(ext_modules=[Extension("protoedge.runtime._rowloop", ["runtime/_rowloop.c"], extra_compile_args=flags,
                             optional=True)])
