"""Run by tests/test_distributed.py under torchrun: several `protoedge train` sessions in one pair of
processes (a process group cannot be re-initialised after it is destroyed, and one launch of
torchrun is cheaper than one per session). Each argument is one command line, as a JSON list."""
import json
import sys

import torch.distributed as td

from protoedge.cli import main

if __name__ == "__main__":
    td.init_process_group("gloo")  # train() uses this group and leaves it open
    for argv in sys.argv[1:]:
        main(json.loads(argv), standalone_mode=False)
    td.destroy_process_group()
