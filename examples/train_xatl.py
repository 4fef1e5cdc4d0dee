"""Train a converted xatl folder with HF Trainer: transferred weights frozen until LIT unfreezes them.

    xatl convert examples/pythia-tiny --to mamba --out pythia-tiny-mamba
    python examples/train_xatl.py pythia-tiny-mamba --text corpus.txt --steps 200

The tokenizer comes from the folder; the text file is tokenized as one stream and cut into blocks of --block-size
tokens. The model is saved to --out (default: FOLDER-trained) at the end.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

import torch

from xatl_convert.manifest import read_manifest
from xatl_convert.training import (
    LIT_PRESETS,
    TRANSFER_GROUPS,
    LITCallback,
    LITController,
    LossImprovementThreshold,
    freeze_transferred,
    transferred_parameters,
)


class Blocks(torch.utils.data.Dataset):
    """Consecutive blocks of `size` tokens of one token stream (causal LM: labels are the inputs)."""

    def __init__(self, ids: torch.Tensor, size: int) -> None:
        n = ids.numel() // size
        if n == 0:
            raise SystemExit(f"error: the text has {ids.numel()} tokens, fewer than one block of {size}")
        self.blocks = ids[: n * size].view(n, size)

    def __len__(self) -> int:
        return len(self.blocks)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.blocks[i], "labels": self.blocks[i]}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("folder", type=Path, help="a folder written by `xatl convert`")
    ap.add_argument("--text", type=Path, required=True, help="UTF-8 training text")
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--block-size", type=int, default=128)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--lr", type=float, default=2e-3, help="peak LR of the trainable (new) parameters")
    ap.add_argument("--warmup", type=int, default=20)
    ap.add_argument("--unfreeze-lr", type=float, default=1e-3, help="peak LR of the transferred ones once unfrozen")
    ap.add_argument("--unfreeze-warmup", type=int, default=50)
    ap.add_argument("--lit-preset", default="paper-1pct", choices=list(LIT_PRESETS))
    ap.add_argument("--lit-window", type=int, default=25, help="steps per loss window")
    ap.add_argument("--freeze", nargs="*", default=list(TRANSFER_GROUPS), choices=TRANSFER_GROUPS)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)

    from transformers import AutoModelForCausalLM, AutoTokenizer, Trainer, TrainingArguments

    import xatl_convert.models  # noqa: F401  (registers the xatl Auto classes)

    logging.basicConfig(level=logging.INFO, format="%(message)s")
    tokenizer = AutoTokenizer.from_pretrained(args.folder)
    ids = tokenizer.backend_tokenizer.encode(args.text.read_text(encoding="utf-8"), add_special_tokens=False).ids
    data = Blocks(torch.tensor(ids, dtype=torch.long), args.block_size)

    model = AutoModelForCausalLM.from_pretrained(args.folder)
    manifest = read_manifest(args.folder)
    frozen = transferred_parameters(model, manifest, args.freeze)
    names = freeze_transferred(model, manifest, args.freeze)
    print(f"frozen until LIT: {len(names)} tensors, {sum(p.numel() for p in frozen.values()):,} parameters")
    trigger = LossImprovementThreshold.preset(args.lit_preset, window=args.lit_window)
    lit = LITCallback(LITController(frozen, args.unfreeze_lr, args.unfreeze_warmup, trigger, weight_decay=0.0))

    out = args.out or args.folder.with_name(args.folder.name + "-trained")
    training_args = TrainingArguments(
        output_dir=str(out),
        max_steps=args.steps,
        per_device_train_batch_size=args.batch_size,
        learning_rate=args.lr,
        warmup_steps=args.warmup,
        lr_scheduler_type="cosine",
        weight_decay=0.1,
        adam_beta2=0.95,
        max_grad_norm=1.0,
        logging_steps=10,
        save_strategy="no",
        report_to=[],
        seed=args.seed,
    )
    Trainer(model=model, args=training_args, train_dataset=data, callbacks=[lit]).train()
    print(f"LIT unfroze the transferred weights after step {lit.unfrozen_at}" if lit.unfrozen_at else "LIT never fired")
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    print(f"saved to {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
