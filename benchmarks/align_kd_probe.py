"""A short probe of the distillation stages on a real pretrained model, until `xatl distill` and its benchmark exist.

SmolLM2-135M (benchmarks/real_model.py builds it) converted to pure Mamba2 with `--init attention`; text: the
CPython NEWS file that Debian ships (plain English about code, not used by the example), packed into 256-token blocks
with a held-out split. Runs `align` (only new mixers, AdamW 1e-3) and then `kd` with LIT (HF Trainer, AdamW 1e-4),
printing the held-out next-token loss of the student against the teacher's after each stage, and the share of the
gap from the converted start to the teacher that was recovered.

    python benchmarks/align_kd_probe.py [--align-steps 40] [--kd-steps 10]
"""

from __future__ import annotations

import argparse
import gzip
import time
from pathlib import Path

import torch

from benchmarks.real_model import WORK, build

NEWS = Path("/usr/share/doc/python3.11/NEWS.gz")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--align-steps", type=int, default=40)
    parser.add_argument("--kd-steps", type=int, default=10)
    parser.add_argument("--batch-size", type=int, default=4)
    args = parser.parse_args()

    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainingArguments

    from xatl_convert.conversion import convert
    from xatl_convert.manifest import read_manifest
    from xatl_convert.training import (
        Aligner,
        DataSpec,
        DistillationTrainer,
        LITCallback,
        LITController,
        LossImprovementThreshold,
        PackedBlocks,
        freeze_transferred,
        transferred_parameters,
    )

    torch.manual_seed(0)
    source, student_folder, text = build(), WORK / "probe-mamba2", WORK / "probe-text" / "news.txt"
    if not student_folder.exists():
        convert(source, student_folder, to="mamba2", dtype=torch.float32, overrides={"options.attention_init": True})
    if not text.exists():
        text.parent.mkdir(parents=True, exist_ok=True)
        text.write_bytes(gzip.decompress(NEWS.read_bytes()))
    tokenizer = AutoTokenizer.from_pretrained(student_folder)
    spec = DataSpec(str(text), block_size=256, held_out=0.05, max_documents=4000)
    train, held_out = PackedBlocks.build(spec, tokenizer, "train"), PackedBlocks.build(spec, tokenizer, "held_out")
    held_ids = held_out.blocks[:8]
    student = AutoModelForCausalLM.from_pretrained(student_folder, dtype=torch.float32)
    teacher = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32)

    def loss(model: torch.nn.Module) -> float:
        with torch.no_grad():
            return model(held_ids, labels=held_ids).loss.item()

    teacher_loss, start = loss(teacher), loss(student)
    print(f"held-out: teacher {teacher_loss:.3f}, converted student {start:.3f} ({len(train)} training blocks)")

    def report(stage: str, began: float) -> None:
        now = loss(student)
        recovered = (start - now) / (start - teacher_loss)
        print(f"after {stage}: student {now:.3f}, gap recovered {recovered:.0%}, {time.perf_counter() - began:.0f} s")

    began, batch = time.perf_counter(), args.batch_size
    aligner = Aligner(student, teacher, read_manifest(student_folder))
    optimizer = torch.optim.AdamW(aligner.trainable(), lr=1e-3)
    for step in range(args.align_steps):
        aligner.step(train.blocks[step * batch : (step + 1) * batch], optimizer)
    report(f"align ({args.align_steps} steps, {args.align_steps * batch * 256:,} tokens)", began)

    began = time.perf_counter()
    for parameter in student.parameters():
        parameter.requires_grad_(True)
    manifest = read_manifest(student_folder)
    frozen = transferred_parameters(student, manifest)
    freeze_transferred(student, manifest)
    lit = LITCallback(LITController(frozen, lr=1e-4, warmup_steps=2, trigger=LossImprovementThreshold(window=4)))
    arguments = TrainingArguments(
        str(WORK / "probe-kd"), max_steps=args.kd_steps, per_device_train_batch_size=batch, learning_rate=1e-4,
        save_strategy="no", report_to=[], use_cpu=True, seed=0,
    )  # fmt: skip
    offset = torch.utils.data.Subset(train, range(args.align_steps * batch, len(train)))
    trainer = DistillationTrainer(model=student, args=arguments, train_dataset=offset, teacher=teacher, callbacks=[lit])
    trainer.train()
    report(f"kd ({args.kd_steps} steps; LIT unfroze after step {lit.unfrozen_at})", began)


if __name__ == "__main__":
    main()
