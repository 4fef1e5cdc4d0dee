"""Does transferring W_Q, W_K and W_V pay? Gated DeltaNet against Mamba2 (attention init), pure and paper hybrid.

Teacher: SmolLM2-135M-Instruct (`benchmarks/real_model.py`). Text: CPython NEWS, as `distill_bench` (same blocks,
same held-out split). Four students, each converted from the teacher by `xatl convert`:

  gated_deltanet         pure Gated DeltaNet: W_Q, W_K, W_V fill its q, k, v rows (kv heads repeated), W_O out_proj
  gated_deltanet-paper   the same with layers 1 and N/2-1 kept as attention (the XATL paper's hybrid)
  mamba2                 pure Mamba2 with the attention-informed init (V → x, K → B, Q → C, O → out_proj)
  mamba2-paper           the same, paper hybrid
  gated_deltanet-no-qkv  pure Gated DeltaNet with `--set options.transfer_attention_qkv=false`: W_O only (the
                         ablation that says whether moving W_Q, W_K, W_V pays)
  gated_deltanet-identity-conv  pure, W_Q, W_K, W_V moved and `--set options.conv_identity_init=true`: the short
                         conv starts as a pass-through, so the moved projections are not mixed by a random filter
  gated_deltanet-paper-identity-conv  the same, paper hybrid
(the first three Gated DeltaNet students keep the conv's own random init: `conv_identity_init=false`)

Each is scored before training (the start loss: what the transfer alone gives) and trained with one recipe at one
token budget (`distill_bench`'s arm f: align, the second half on whole blocks, then kd with the transferred
weights unfrozen at 1e-4), then scored on the held-out text and on text no arm trains on (software licences).

    python -m benchmarks.mixer_compare [--steps 16] [--students gated_deltanet,mamba2,...]

Writes benchmarks/results/mixer_compare.json and prints the table; the teacher's own losses are the baseline.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

from benchmarks.distill_bench import RESULTS, arm_command, corpus, other_corpus, other_text_losses, read_curve
from benchmarks.real_model import WORK, build

STUDENTS = {
    "gated_deltanet": ("gated_deltanet", "none"),
    "gated_deltanet-paper": ("gated_deltanet", "paper"),
    "mamba2": ("mamba2", "none"),
    "mamba2-paper": ("mamba2", "paper"),
    "gated_deltanet-no-qkv": ("gated_deltanet", "none"),  # the ablation: W_O only, q, k, v rows initialised
    "gated_deltanet-identity-conv": ("gated_deltanet", "none"),  # W_Q, W_K, W_V moved, conv a pass-through
    "gated_deltanet-paper-identity-conv": ("gated_deltanet", "paper"),
}
# Each Gated DeltaNet student's options, spelt out so that a change of the mappings' defaults cannot relabel a row.
_RANDOM_CONV, _IDENTITY_CONV = {"options.conv_identity_init": False}, {"options.conv_identity_init": True}
OVERRIDES = {
    "gated_deltanet": _RANDOM_CONV,
    "gated_deltanet-paper": _RANDOM_CONV,
    "gated_deltanet-no-qkv": {"options.transfer_attention_qkv": False, **_RANDOM_CONV},
    "gated_deltanet-identity-conv": _IDENTITY_CONV,
    "gated_deltanet-paper-identity-conv": _IDENTITY_CONV,
}


def student(teacher: Path, name: str, root: Path) -> Path:
    """The teacher converted for this student (cached); Mamba2 with the attention-informed init."""
    from xatl_convert.conversion import convert

    folder = root / f"{name}-converted"
    if not folder.exists():
        mixer, attn_layers = STUDENTS[name]
        overrides = {"options.attention_init": True} if mixer == "mamba2" else OVERRIDES.get(name, {})
        convert(teacher, folder, to=mixer, attn_layers=attn_layers, overrides=overrides)
    return folder


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=16, help="training steps of 4 x 256 tokens per student")
    parser.add_argument("--eval-every", type=int, default=8)
    parser.add_argument("--students", default=",".join(STUDENTS), help="comma-separated, of: " + ", ".join(STUDENTS))
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    chosen = [name.strip() for name in args.students.split(",") if name.strip()]
    unknown = [name for name in chosen if name not in STUDENTS]
    if unknown:
        parser.error(f"unknown students {unknown}; known: {', '.join(STUDENTS)}")

    teacher, text, other = build(), corpus(), other_corpus()
    root = WORK / "mixer_compare"
    root.mkdir(parents=True, exist_ok=True)
    for name in chosen:
        out = root / f"{name}-{args.steps}-arm-f"
        if out.exists():
            print(f"{name}: reusing {out}")
            continue
        began = time.perf_counter()
        print(f"{name}: training ({args.steps} steps) ...", flush=True)
        subprocess.run(arm_command("f", student(teacher, name, root), teacher, text, out, args), check=True)
        print(f"{name}: {time.perf_counter() - began:.0f} s", flush=True)
    report(root, args.steps, teacher, other)
    return 0


def report(root: Path, steps: int, teacher: Path, other: Path) -> None:
    rows = []
    for name in STUDENTS:
        out = root / f"{name}-{steps}-arm-f"
        if not (out / "distill_curve.csv").exists():
            continue
        curve = read_curve(out)
        start, end = curve[0], curve[-1]
        teacher_loss = json.loads((out / "xatl_manifest.json").read_text())["distillation"]["teacher_loss"]
        other_losses = other_text_losses(out, teacher, other)
        row = {
            "student": name,
            "mixer": STUDENTS[name][0],
            "attention_layers": STUDENTS[name][1],
            "qkv_transferred": not name.endswith("-no-qkv"),
            "overrides": OVERRIDES.get(name, {}),
            "tokens": int(end["tokens"]),
            "start": start["held_out_loss"],
            "end": end["held_out_loss"],
            "teacher": teacher_loss,
            "other_text_loss": other_losses.get("model"),
            "other_text_teacher_loss": other_losses.get("teacher"),
            "curve": [{"tokens": int(point["tokens"]), "loss": point["held_out_loss"]} for point in curve],
        }
        row["of_teacher"] = row["end"] / teacher_loss
        row["start_of_teacher"] = row["start"] / teacher_loss
        rows.append(row)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "mixer_compare.json").write_text(json.dumps({"steps": steps, "rows": rows}, indent=2) + "\n")
    print(f"{'student':22s} {'start':>7s} {'end':>7s} {'×teacher':>8s} {'other':>7s} tokens")
    for row in rows:
        other_loss = f"{row['other_text_loss']:.2f}" if row["other_text_loss"] is not None else "-"
        losses = f"{row['start']:7.2f} {row['end']:7.2f} {row['of_teacher']:8.2f} {other_loss:>7s}"
        print(f"{row['student']:22s} {losses} {row['tokens']}")


if __name__ == "__main__":
    sys.exit(main())
