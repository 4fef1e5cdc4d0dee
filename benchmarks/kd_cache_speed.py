"""Stage kd's speed with the teacher run at every step and with a teacher cache, on a real teacher.

Teacher: SmolLM2-135M-Instruct (`benchmarks/real_model.py` builds it); student: its Mamba2 conversion with the
attention-informed init, in benchmarks/.work/smol/kd_cache. Text: the CPython NEWS file (as distill_bench). Each arm
is one `xatl distill STUDENT --stage kd --kd-steps 8 --batch-size 4 --block-size 256` run; the cached one adds
`--teacher-cache` (built from scratch first, its build time reported apart: the run's training clock excludes it, as
it excludes the held-out evaluations). tok/s is kd's tokens over the run's training seconds from its manifest.
A third run reuses the cache, to show that it is not built again.

    python -m benchmarks.kd_cache_speed [--kd-steps 8] [--top-k 64]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

from benchmarks.real_model import WORK, build

ROOT = WORK / "kd_cache"
TEXT = WORK / "distill-text" / "news.txt"  # written by benchmarks.distill_bench.corpus()
RESULTS = Path(__file__).resolve().parent / "results" / "kd_cache_speed.json"


def student(teacher: Path) -> Path:
    """The teacher converted to pure Mamba2 with the attention-informed init (built once)."""
    folder = ROOT / "mamba2-converted"
    if not folder.exists():
        from xatl_convert.conversion import convert

        convert(teacher, folder, to="mamba2", overrides={"options.attention_init": True})
    return folder


def run_kd(name: str, student_folder: Path, teacher: Path, args: argparse.Namespace, *extra: str) -> dict:
    """One `xatl distill --stage kd` run; its kd tokens, training seconds, tok/s and teacher-cache record."""
    out = ROOT / f"out-{name}"
    command = [sys.executable, "-m", "xatl_convert.cli", "distill", str(student_folder), "--teacher", str(teacher),
               "--data", str(TEXT), "--out", str(out), "--stage", "kd", "--kd-steps", str(args.kd_steps),
               "--batch-size", "4", "--block-size", "256", "--force", *extra]  # fmt: skip
    began = time.perf_counter()
    subprocess.run(command, check=True, stdout=subprocess.DEVNULL)
    wall = time.perf_counter() - began
    record = json.loads((out / "xatl_manifest.json").read_text())["distillation"]
    kd = record["stages"][0]
    return {"arm": name, "tokens": kd["tokens"], "seconds": record["seconds"], "wall_seconds": round(wall, 1),
            "tok_per_s": kd["tokens"] / record["seconds"], "final_kl": kd["final_loss"],
            "teacher_cache": kd.get("teacher_cache")}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kd-steps", type=int, default=8)
    parser.add_argument("--top-k", type=int, default=64)
    args = parser.parse_args()
    if not TEXT.exists():
        sys.exit(f"{TEXT}: missing; python -m benchmarks.distill_bench writes it (or see its corpus())")
    teacher = build()
    student_folder = student(teacher)
    cache = ROOT / "teacher-cache"
    shutil.rmtree(cache, ignore_errors=True)  # the cached arm measures its build too
    load_before = os.getloadavg()
    cached_options = ("--teacher-cache", str(cache), "--teacher-top-k", str(args.top_k))
    arms = [run_kd("live", student_folder, teacher, args),
            run_kd("cached", student_folder, teacher, args, *cached_options),
            run_kd("cached-reused", student_folder, teacher, args, *cached_options)]  # fmt: skip
    load_after = os.getloadavg()
    live, cached = arms[0], arms[1]
    print(f"load average (1, 5, 15 min): before {load_before}, after {load_after} on {os.cpu_count()} CPUs")
    print(f"{'arm':<14} {'kd tok/s':>9} {'train s':>8} {'wall s':>7} {'final KL':>9}  cache")
    for arm in arms:
        built = arm["teacher_cache"]
        note = "" if built is None else f"top-{built['top_k']}, built {built['built']} in {built['build_seconds']} s"
        print(f"{arm['arm']:<14} {arm['tok_per_s']:>9.1f} {arm['seconds']:>8.1f} {arm['wall_seconds']:>7.1f} "
              f"{arm['final_kl']:>9.4f}  {note}")  # fmt: skip
    ratio = cached["tok_per_s"] / live["tok_per_s"]
    build_seconds = cached["teacher_cache"]["build_seconds"]
    print(f"cached / live kd tok/s: {ratio:.2f}×; cache build {build_seconds} s for {cached['tokens']} tokens")
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps({"arms": arms, "ratio": ratio, "load_before": load_before, "load_after": load_after,
                                   "cpus": os.cpu_count()}, indent=2) + "\n")  # fmt: skip


if __name__ == "__main__":
    main()
