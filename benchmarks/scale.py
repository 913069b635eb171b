"""Scale-out benchmark: meta-training episodes per second with 1 and 2 CPU processes (torchrun,
DistributedDataParallel over gloo), same total work per step, and the documented GPU commands.

Every configuration runs the same `protoedge train` command (the default recipe on Protocol A,
bf16, two episodes per step) for warm-up + timed steps; the time of each step comes from rank 0's
metrics.jsonl (`elapsed` at every step), episodes/s is the median over several timed windows.
k-means runs before the first step (a small one) and validation only after the last, so neither
falls inside a window. On a 2-core machine the fair comparisons are 2 processes x 1 thread against
1 process x 2 threads (the same cores) and against 1 process x 1 thread (the per-core scaling).

    python benchmarks/scale.py [--warmup 3] [--windows 5] [--window 4] [--quick]
    protoedge bench scale      (the same)
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
EPISODES_PER_STEP = 2

# The default recipe's episode (256-way augmentation task, 64-way k-means task, 64 reconstructions,
# Conv4-64); only what keeps k-means and validation out of the timed steps is changed.
SETTINGS = {"episodes_per_step": EPISODES_PER_STEP, "ae_steps": 1, "cluster_start": 0.0, "cluster_every": 2.0,
            "cluster_ks": [200], "cluster_pool": 4000, "val_every": 2.0, "log_every": 1}
CONFIGS = [  # (name, processes, threads per process)
    ("1 process x 1 thread", 1, 1),
    ("1 process x 2 threads", 1, 2),
    ("2 processes x 1 thread (torchrun, gloo)", 2, 1),
]

GPU_COMMANDS = [
    ("one workstation, 8 GPUs (NCCL), ResNet-12 at 84x84 on an image folder",
     "torchrun --standalone --nproc-per-node 8 --no-python protoedge train --recipe gpu --data /data/images "
     "--out runs/gpu8 --time-budget 2h --set episodes_per_step=8 --set data_workers=6"),
    ("the same on the shipped Omniglot images (resized to 84x84 on the fly)",
     "torchrun --standalone --nproc-per-node 8 --no-python protoedge train --recipe gpu --protocol omniglot-a "
     "--out runs/gpu8-omniglot --time-budget 1h --set episodes_per_step=8"),
    ("continue that run on 4 GPUs (a checkpoint resumes with any number of processes; episodes_per_step "
     "stays 8, so each GPU now computes 2 episodes per step)",
     "torchrun --standalone --nproc-per-node 4 --no-python protoedge train --out runs/gpu8 "
     "--resume runs/gpu8/checkpoint.safetensors --time-budget 3h"),
    ("without torch.compile (first steps compile for a few minutes; off for short runs)",
     "torchrun --standalone --nproc-per-node 8 --no-python protoedge train --recipe gpu --data /data/images "
     "--out runs/gpu8 --set episodes_per_step=8 --set compile=false"),
    ("export the trained ResNet-12 (84x84) for the devices",
     "protoedge export runs/gpu8/checkpoint.safetensors --out bundles/resnet12 --calib /data/images "
     "--eval /data/labelled-novel-classes"),
]


def load_average() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def machine() -> dict:
    import torch

    cpu = platform.processor()
    try:
        cpu = next(l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name"))
    except (OSError, StopIteration):
        pass
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=ROOT).stdout.strip()
    return {"cpu": cpu, "cores": os.cpu_count(), "torch": torch.__version__, "python": platform.python_version(),
            "commit": commit}


def command(out: Path, processes: int, threads: int, steps: int) -> list[str]:
    train = ["train", "--protocol", "omniglot-a", "--out", str(out), "--steps", str(steps), "--threads", str(threads),
             "--time-budget", "2h", "--no-report"]
    for key, value in SETTINGS.items():
        train += ["--set", f"{key}={json.dumps(value)}"]
    if processes == 1:
        return [sys.executable, "-m", "protoedge.cli", *train]
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(processes),
            "-m", "protoedge.cli", *train]


def step_times(metrics: Path) -> list[float]:
    """rank 0's elapsed seconds at the end of every meta step."""
    rows = [json.loads(l) for l in metrics.read_text().splitlines()]
    return [r["elapsed"] for r in rows if r["stage"] == "meta" and "loss" in r]


def measure(name: str, processes: int, threads: int, warmup: int, windows: int, window: int) -> dict:
    steps = warmup + windows * window
    with tempfile.TemporaryDirectory(prefix="protoedge-scale-") as tmp:
        out = Path(tmp) / "run"
        env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
        before = load_average()
        t0 = time.time()
        r = subprocess.run(command(out, processes, threads, steps), env=env, capture_output=True, text=True)
        wall = time.time() - t0
        after = load_average()
        if r.returncode != 0:
            raise RuntimeError(f"{name}: exit {r.returncode}\n{r.stdout[-2000:]}\n{r.stderr[-2000:]}")
        ends = step_times(out / "metrics.jsonl")
        meta = json.loads((out / "config.json").read_text())
    if len(ends) != steps:
        raise RuntimeError(f"{name}: {len(ends)} steps logged, expected {steps}")
    rates = [window * EPISODES_PER_STEP / (ends[warmup + (i + 1) * window - 1] - ends[warmup + i * window - 1])
             for i in range(windows)]
    return {"name": name, "processes": processes, "threads_per_process": threads,
            "episodes_per_s": round(statistics.median(rates), 3), "windows_episodes_per_s": [round(x, 3) for x in rates],
            "steps": steps, "warmup_steps": warmup, "window_steps": window, "command_wall_s": round(wall, 1),
            "load_average_before": before, "load_average_after": after,
            "episodes_per_step": meta["episodes_per_step"], "precision": meta["precision"]}


def write_markdown(report: dict, path: Path) -> None:
    rows = {r["name"]: r for r in report["rows"]}
    base1, base2 = rows[CONFIGS[0][0]]["episodes_per_s"], rows[CONFIGS[1][0]]["episodes_per_s"]
    m = report["machine"]
    lines = ["# Scale-out benchmark (`protoedge bench scale`)", "",
             f"Generated {report['generated']} on {m['cpu']}, {m['cores']} cores shared with other jobs; torch "
             f"{m['torch']}, commit {m['commit']}. Default recipe on Protocol A (Conv4-64, 256-way augmentation "
             f"task + 64-way k-means task + 64 reconstructions per episode, bf16 autocast), "
             f"{EPISODES_PER_STEP} episodes per step in every row, so every row does the same work per step. "
             f"Episodes/s: median over {report['windows']} windows of {report['window']} steps after "
             f"{report['warmup']} warm-up steps (rank 0's clock).", "",
             "| configuration | episodes/s (median) | windows | x 1 proc 1 thread | x 1 proc 2 threads | "
             "load avg before -> after |",
             "|---|---:|---|---:|---:|---|"]
    for r in report["rows"]:
        lines.append(f"| {r['name']} | {r['episodes_per_s']:.2f} | "
                     f"{min(r['windows_episodes_per_s']):.2f}-{max(r['windows_episodes_per_s']):.2f} | "
                     f"{r['episodes_per_s'] / base1:.2f} | {r['episodes_per_s'] / base2:.2f} | "
                     f"{r['load_average_before'][0]} -> {r['load_average_after'][0]} |")
    lines += ["", "How to read it: the machine has 2 cores, so 2 processes x 1 thread and 1 process x 2 threads "
              "use the same cores; the first is data parallelism (each process computes one of the step's two "
              "episodes, DDP all-reduces the gradients over gloo), the second is intra-op parallelism inside "
              "one process. Against 1 process x 1 thread, the 2-process row is the per-core scaling. Every "
              "process also draws the whole step's random choices (cheap; see trainer/distributed.py), and "
              "the machine was shared, so small differences are noise (see the load averages and the window "
              "ranges).", "",
              "Correctness is tested, not timed: `tests/test_distributed.py` runs two torchrun processes (gloo) "
              "and checks that they train the same model as one process with the same seed and episodes per "
              "step (every weight, BatchNorm statistic and optimizer moment within 1e-4; measured ~2e-7), and "
              "that each resumes the other's checkpoint.", "",
              "## GPU commands (written to the documented APIs; not run here: this machine has no GPU)", ""]
    for what, cmd in GPU_COMMANDS:
        lines += [f"{what}:", "", "```bash", cmd, "```", ""]
    lines += ["`--recipe gpu` = the default recipe with ResNet-12 (64-160-320-640, D = 640) at 84x84, bf16 "
              "autocast, channels-last, `torch.compile` of the encoder, 128-way augmentation tasks; NCCL is "
              "chosen automatically when CUDA is available (gloo otherwise); `--data DIR` streams a folder of "
              "any size (png/jpg, recursive) through DataLoader workers (`data_workers`), and k-means runs on a "
              "random subset of at most `cluster_pool` images. Batch sizes and the learning rate were not tuned "
              "on GPUs.", ""]
    path.write_text("\n".join(lines))


def run(warmup: int = 3, windows: int = 5, window: int = 4, quick: bool = False,
        results: Path = RESULTS) -> dict:
    if quick:
        warmup, windows, window = 1, 2, 1
    results.mkdir(parents=True, exist_ok=True)
    stem = "scale.quick" if quick else "scale"
    report = {"generated": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "machine": machine(),
              "settings": SETTINGS, "warmup": warmup, "windows": windows, "window": window, "rows": [],
              "gpu_commands": [{"what": w, "command": c} for w, c in GPU_COMMANDS]}
    for name, processes, threads in CONFIGS:
        print(f"[bench scale] {name}", flush=True)
        report["rows"].append(measure(name, processes, threads, warmup, windows, window))
        print(f"[bench scale]   {report['rows'][-1]['episodes_per_s']:.2f} episodes/s", flush=True)
    rows = {r["name"]: r["episodes_per_s"] for r in report["rows"]}
    two = rows[CONFIGS[2][0]]
    report["ratios"] = {"two_processes_vs_one_process_one_thread": round(two / rows[CONFIGS[0][0]], 3),
                        "two_processes_vs_one_process_two_threads": round(two / rows[CONFIGS[1][0]], 3)}
    (results / f"{stem}.json").write_text(json.dumps(report, indent=2))
    write_markdown(report, results / f"{stem}.md")
    return report


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--windows", type=int, default=5)
    parser.add_argument("--window", type=int, default=4)
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    run(args.warmup, args.windows, args.window, args.quick)
