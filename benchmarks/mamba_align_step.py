"""Seconds per align step on a real model: SmolLM2-135M → Mamba (v1) against → Mamba2, both on the CPU reference path.

Teacher: SmolLM2-135M-Instruct (30 layers; `benchmarks/real_model.py` builds it). Students: the teacher converted
`--to mamba` and `--to mamba2 --init attention` (as `xatl distill` would get them), written once into
benchmarks/.work/smol/align_step. One step is `Aligner.step` (training/align.py) on 4 × 256 tokens: one teacher
forward, then every mixer's forward and backward on its layer's pair, then AdamW. Token ids are drawn at random
with a fixed seed: the time of a step does not depend on what the tokens say. Reported: the median of `--steps`
timed steps after one warm-up step, per student, and the ratio Mamba / Mamba2 (the goal: at most 2), in wall
seconds and in this process's CPU seconds (the steadier of the two on a machine shared with other jobs).

`--sequential` also times the Mamba student with the sequential `selective_scan_reference` in place of
`selective_scan_chunked` (one timed step after the warm-up), for comparison.

    python -m benchmarks.mamba_align_step [--steps 3] [--threads N] [--sequential]
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from contextlib import nullcontext
from pathlib import Path

import torch

from benchmarks.real_model import WORK, build

ROOT = WORK / "align_step"
BATCH, BLOCK = 4, 256
OVERRIDES = {"mamba": None, "mamba2": {"options.attention_init": True}}


def student_folder(teacher: Path, kind: str) -> Path:
    """The teacher converted to `kind`, converted on the first run only."""
    from xatl_convert.conversion import convert

    folder = ROOT / kind
    if not folder.exists():
        convert(teacher, folder, to=kind, overrides=OVERRIDES[kind])
    return folder


def step_seconds(
    teacher: torch.nn.Module, folder: Path, steps: int, input_ids: torch.Tensor
) -> list[tuple[float, float]]:
    """(wall, CPU) seconds of each of `steps` align steps, after one warm-up step."""
    from transformers import AutoModelForCausalLM

    from xatl_convert.manifest import read_manifest
    from xatl_convert.training.align import Aligner

    student = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    aligner = Aligner(student, teacher, read_manifest(folder))
    optimizer = torch.optim.AdamW(aligner.trainable(), lr=1e-4)
    aligner.step(input_ids, optimizer)
    seconds = []
    for _ in range(steps):
        wall, cpu = time.perf_counter(), time.process_time()
        aligner.step(input_ids, optimizer)
        seconds.append((time.perf_counter() - wall, time.process_time() - cpu))
    return seconds


def sequential_scan():
    """While active, the Mamba mixers' reference path runs the sequential `selective_scan_reference`."""
    from unittest import mock

    import xatl_convert.models.modeling_xatl as modeling_xatl

    return mock.patch.object(modeling_xatl, "selective_scan_chunked", modeling_xatl.selective_scan_reference)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=3, help="timed steps per student, after one warm-up step")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's own choice)")
    parser.add_argument("--sequential", action="store_true", help="also time Mamba with the sequential scan")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as transformers_logging

    transformers_logging.disable_progress_bar()
    transformers_logging.set_verbosity_error()
    teacher_path = build()
    folders = {kind: student_folder(teacher_path, kind) for kind in OVERRIDES}
    teacher = AutoModelForCausalLM.from_pretrained(teacher_path, dtype=torch.float32)
    input_ids = torch.randint(0, teacher.config.vocab_size, (BATCH, BLOCK), generator=torch.Generator().manual_seed(0))
    print(f"{BATCH} x {BLOCK} tokens, {torch.get_num_threads()} torch threads, load {os.getloadavg()}", flush=True)

    arms = [("mamba", "chunked", args.steps), ("mamba2", "ssd chunked", args.steps)]
    if args.sequential:
        arms.append(("mamba", "sequential", 1))
    wall, cpu = {}, {}
    for kind, scan, steps in arms:
        with sequential_scan() if scan == "sequential" else nullcontext():
            seconds = step_seconds(teacher, folders[kind], steps, input_ids)
        wall[kind, scan] = statistics.median(pair[0] for pair in seconds)
        cpu[kind, scan] = statistics.median(pair[1] for pair in seconds)
        shown = ", ".join(f"{pair[0]:.2f}" for pair in seconds)
        print(
            f"{kind:7s} {scan:11s} {wall[kind, scan]:7.2f} s/step wall, {cpu[kind, scan]:7.2f} s CPU (wall: {shown})",
            flush=True,
        )
    for label, medians in (("wall", wall), ("CPU", cpu)):
        print(f"ratio mamba / mamba2 ({label}): {medians['mamba', 'chunked'] / medians['mamba2', 'ssd chunked']:.2f}")
        if args.sequential:
            ratio = medians["mamba", "sequential"] / medians["mamba", "chunked"]
            print(f"ratio sequential / chunked, mamba ({label}): {ratio:.1f}")
    print(f"load after: {os.getloadavg()}")


if __name__ == "__main__":
    main()
