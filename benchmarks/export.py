"""Export benchmark: `python benchmarks/export.py [CHECKPOINT]` (same as `protoedge bench export`).
Writes benchmarks/results/export.md and export.json."""
import sys

from protoedge.cli import main

if __name__ == "__main__":
    main(["bench", "export", *sys.argv[1:]])
