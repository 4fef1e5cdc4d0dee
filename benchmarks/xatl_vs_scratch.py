"""XATL vs from-scratch on CPU: does the converted Mamba reach a scratch Mamba's loss with less training?

Trains, on the same data order, optimizer, schedule and token budget:
  xatl-lit       examples/pythia-tiny converted to Mamba, transferred weights frozen until LIT unfreezes them
  xatl-unfrozen  the same converted model, nothing frozen
  scratch        the same target config, randomly initialised (fixed seed)
  xatl-hybrid    (with --hybrid) the paper's hybrid (attention kept in layers 1 and N/2-1), frozen → LIT

The data are the example checkpoint's own corpus (Debian's python3.11-doc reST sources) and split; validation
loss is measured on a fixed slice of the held-out validation files, which the source model never saw. Writes
benchmarks/results/xatl_vs_scratch.csv (validation curves), xatl_vs_scratch_summary.csv and xatl_vs_scratch.png.

    python benchmarks/xatl_vs_scratch.py            # ~15 min on 2 CPU cores
"""

from __future__ import annotations

import argparse
import csv
import math
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks.plotting import save_figure  # noqa: E402
from examples.make_example_checkpoint import (  # noqa: E402
    APT_HINT,
    DEFAULT_CORPUS_DIR,
    CorpusMissingError,
    encode_stream,
    lr_at,
    read_documents,
    split_corpus,
)
from xatl_convert.conversion import convert  # noqa: E402
from xatl_convert.manifest import read_manifest  # noqa: E402
from xatl_convert.training import LITController, LossImprovementThreshold, freeze_transferred  # noqa: E402

SOURCE = REPO / "examples" / "pythia-tiny"
RESULTS = REPO / "benchmarks" / "results"


def load_data(corpus_dir: Path, tokenizer) -> tuple[torch.Tensor, torch.Tensor]:
    """Token streams of the train and validation files (the split the source model was trained with)."""
    train_files, val_files = split_corpus(corpus_dir)
    eos = tokenizer.eos_token_id
    return encode_stream(tokenizer, read_documents(train_files), eos), encode_stream(
        tokenizer, read_documents(val_files), eos
    )


def batch_starts(n_tokens: int, seq_len: int, batch: int, steps: int, seed: int) -> torch.Tensor:
    """The data order, fixed once and shared by every model: (steps, batch) random block starts."""
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, n_tokens - seq_len, (steps, batch), generator=gen)


@torch.no_grad()
def evaluate(model: torch.nn.Module, blocks: torch.Tensor, batch: int = 32) -> float:
    """Mean next-token loss over the fixed validation blocks."""
    model.eval()
    total = 0.0
    for i in range(0, len(blocks), batch):
        x = blocks[i : i + batch]
        total += model(input_ids=x, labels=x).loss.item() * len(x)
    model.train()
    return total / len(blocks)


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """AdamW groups over the trainable parameters only: decay for matrices (not embeddings), none for the rest."""
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    decay = [p for n, p in named if p.ndim >= 2 and "embed" not in n]
    rest = [p for n, p in named if not (p.ndim >= 2 and "embed" not in n)]
    return [{"params": decay, "weight_decay": weight_decay}, {"params": rest, "weight_decay": 0.0}]


def train(
    name: str,
    model: torch.nn.Module,
    args: argparse.Namespace,
    stream: torch.Tensor,
    starts: torch.Tensor,
    val_blocks: torch.Tensor,
    lit: LITController | None = None,
) -> list[tuple[int, float]]:
    """One run of the shared recipe; returns the validation curve [(step, loss)]."""
    torch.manual_seed(args.seed)
    opt = torch.optim.AdamW(param_groups(model, args.weight_decay), lr=args.lr, betas=(0.9, 0.95))
    factor: Callable[[int], float] = lambda s: lr_at(s, args.steps, args.lr, args.warmup) / args.lr  # noqa: E731
    sched = torch.optim.lr_scheduler.LambdaLR(opt, factor)
    offsets = torch.arange(args.seq_len)
    curve = [(0, evaluate(model, val_blocks))]
    print(f"[{name}] step 0 val {curve[0][1]:.4f}", flush=True)
    t0 = time.time()
    for step in range(1, args.steps + 1):
        x = stream[starts[step - 1][:, None] + offsets]
        loss = model(input_ids=x, labels=x).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        if lit is not None and lit.step(loss, opt, sched):
            print(f"[{name}] LIT unfroze the transferred weights after step {step}", flush=True)
        if step % args.eval_every == 0 or step == args.steps:
            curve.append((step, evaluate(model, val_blocks)))
            rate = (time.time() - t0) / step
            print(
                f"[{name}] step {step} loss {loss.item():.3f} val {curve[-1][1]:.4f} "
                f"({rate:.2f}s/step, eta {rate * (args.steps - step):.0f}s)",
                flush=True,
            )
    return curve


def steps_to_reach(curve: list[tuple[int, float]], target: float) -> int | None:
    """First evaluated step whose validation loss is at or below `target` (None if never)."""
    return next((step for step, loss in curve if loss <= target), None)


def plot(curves: dict[str, list[tuple[int, float]]], source_val: float, out: Path, title: str) -> None:
    def draw(ax) -> None:
        for name, curve in curves.items():
            ax.plot([s for s, _ in curve], [v for _, v in curve], marker=".", label=name)
        ax.axhline(source_val, color="grey", ls=":", label="source GPT-NeoX (reference)")
        ax.axhline(curves["scratch"][-1][1], color="black", ls="--", lw=0.8, label="scratch final")
        ax.set_xlabel("training step")
        ax.set_ylabel("validation loss (held-out files)")
        ax.set_ylim(top=min(8.5, max(v for c in curves.values() for _, v in c[1:]) + 0.3))
        ax.set_title(title, fontsize=9)
        ax.legend()
        ax.grid(alpha=0.3)

    save_figure(out, draw)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--corpus-dir", type=Path, default=DEFAULT_CORPUS_DIR)
    ap.add_argument("--steps", type=int, default=400)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--lr", type=float, default=2e-3, help="peak LR of the main param groups (all models)")
    ap.add_argument("--warmup", type=int, default=30)
    ap.add_argument("--weight-decay", type=float, default=0.1)
    ap.add_argument("--unfreeze-lr", type=float, default=1e-3, help="peak LR of the unfrozen transferred weights")
    ap.add_argument("--unfreeze-warmup", type=int, default=50)
    ap.add_argument("--lit-window", type=int, default=25)
    ap.add_argument("--lit-preset", default="paper-1pct", choices=["paper-1pct", "paper-0.5pct"])
    ap.add_argument("--eval-every", type=int, default=25)
    ap.add_argument("--val-blocks", type=int, default=128, help="validation blocks of seq-len tokens")
    ap.add_argument("--hybrid", action="store_true", help="also train the paper's hybrid (frozen → LIT)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out-dir", type=Path, default=RESULTS)
    args = ap.parse_args(argv)

    try:
        split_corpus(args.corpus_dir)
    except CorpusMissingError:
        print(f"error: corpus {args.corpus_dir} missing; install it with: {APT_HINT}", file=sys.stderr)
        return 2
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    import xatl_convert.models  # noqa: F401  (registers the xatl Auto classes)

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
    torch.set_num_threads(args.threads)
    t_start = time.time()
    tokenizer = AutoTokenizer.from_pretrained(SOURCE)
    stream, val = load_data(args.corpus_dir, tokenizer)
    n_val = min(args.val_blocks, val.numel() // args.seq_len)
    val_blocks = val[: n_val * args.seq_len].view(n_val, args.seq_len)
    starts = batch_starts(stream.numel(), args.seq_len, args.batch_size, args.steps, args.seed)
    print(f"train tokens {stream.numel():,}; validation {n_val} blocks x {args.seq_len} tokens", flush=True)
    source_val = evaluate(AutoModelForCausalLM.from_pretrained(SOURCE), val_blocks)
    print(f"source GPT-NeoX validation loss {source_val:.4f}", flush=True)

    def lit_for(model: torch.nn.Module, folder: Path) -> LITController:
        frozen = freeze_transferred(model, read_manifest(folder))
        named = dict(model.named_parameters())
        trigger = LossImprovementThreshold.preset(args.lit_preset, window=args.lit_window)
        lit = LITController([named[n] for n in frozen], args.unfreeze_lr, args.unfreeze_warmup, trigger, 0.0)
        print(f"froze {len(frozen)} transferred tensors ({sum(named[n].numel() for n in frozen):,} params)")
        return lit

    curves: dict[str, list[tuple[int, float]]] = {}
    times: dict[str, float] = {}
    lits: dict[str, LITController] = {}
    with tempfile.TemporaryDirectory() as tmp:
        mamba = Path(tmp) / "mamba"
        convert(SOURCE, mamba, to="mamba", seed=args.seed)
        runs = ["xatl-lit", "xatl-unfrozen", "scratch"] + (["xatl-hybrid"] if args.hybrid else [])
        for name in runs:
            t0 = time.time()
            folder = mamba
            if name == "xatl-hybrid":
                folder = Path(tmp) / "hybrid"
                convert(SOURCE, folder, to="mamba", attn_layers="paper", seed=args.seed)
            if name == "scratch":
                from xatl_convert.models import XatlForCausalLM

                config = AutoModelForCausalLM.from_pretrained(mamba).config
                torch.manual_seed(args.seed)
                model = XatlForCausalLM(config)
            else:
                model = AutoModelForCausalLM.from_pretrained(folder)
            lit = lit_for(model, folder) if name in ("xatl-lit", "xatl-hybrid") else None
            curves[name] = train(name, model, args, stream, starts, val_blocks, lit)
            times[name] = time.time() - t0
            if lit is not None:
                lits[name] = lit

    scratch_final = curves["scratch"][-1][1]
    args.out_dir.mkdir(parents=True, exist_ok=True)
    with open(args.out_dir / "xatl_vs_scratch.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["model", "step", "val_loss"])
        for name, curve in curves.items():
            w.writerows([name, s, f"{v:.4f}"] for s, v in curve)
    rows = []
    for name, curve in curves.items():
        reach = steps_to_reach(curve, scratch_final)
        lit = lits.get(name)
        rows.append(
            {
                "model": name,
                "final_val_loss": f"{curve[-1][1]:.4f}",
                "steps_to_scratch_final": reach if reach is not None else "",
                "ratio": f"{reach / args.steps:.3f}" if reach is not None else "",
                "unfrozen_at": (lit.unfrozen_at or "never") if lit else "",
                "wall_s": f"{times[name]:.0f}",
            }
        )
    with open(args.out_dir / "xatl_vs_scratch_summary.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    title = (
        f"{args.steps} steps x {args.batch_size} x {args.seq_len} tokens, AdamW lr {args.lr}, "
        f"LIT {args.lit_preset} window {args.lit_window}"
    )
    plot(curves, source_val, args.out_dir / "xatl_vs_scratch.png", title)

    print(f"\nsource GPT-NeoX val loss {source_val:.4f}; ln V = {math.log(len(tokenizer)):.3f}")
    print("| model | final val loss | steps to scratch's final | ratio | unfrozen after step | wall s |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(" | ".join(["", *map(str, r.values()), ""]).strip())
    print(f"total wall time {time.time() - t_start:.0f}s; results in {args.out_dir}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
