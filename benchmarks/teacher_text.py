"""General text for `xatl distill --mix-data`: the teacher's own samples, so the student keeps the teacher's range.

A student distilled on one domain (here CPython's NEWS) forgets what its teacher knew elsewhere: distill_bench's
licence loss shows it. Mixing general text into training is the usual cure, but no general corpus is on this
machine offline. The teacher's own samples are the text whose distribution the student should keep: sampled at
temperature 1 from short, varied openings (plain text, no chat template), one document per opening. Cached in
benchmarks/.work/smol/distill-text/teacher_samples.txt.

    python -m benchmarks.teacher_text [--documents 64] [--tokens 256]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from benchmarks.real_model import WORK, build

OPENINGS = (
    "The history of", "In a small village", "Scientists have found", "The best way to", "When I was young",
    "The city council", "Here is a recipe for", "The main causes of", "Dear", "Chapter 1.", "The weather",
    "In economics,", "A good teacher", "The river", "According to the report,", "How to", "The game began",
    "Photosynthesis is", "The company announced", "Once upon a time", "The law states that", "Music is",
    "The patient", "In 1848,", "The following are", "Our planet", "The museum", "Many people believe",
    "This agreement", "The train", "Water", "The first step",
)  # fmt: skip


def samples(documents: int = 64, tokens: int = 256, batch: int = 32) -> Path:
    """The cached samples file, generated when missing (about a minute per 32 documents on 2 cores)."""
    out = WORK / "distill-text" / "teacher_samples.txt"
    if out.exists():
        return out
    from transformers import AutoModelForCausalLM, AutoTokenizer

    teacher = build()
    tokenizer = AutoTokenizer.from_pretrained(teacher)
    tokenizer.padding_side = "left"
    model = AutoModelForCausalLM.from_pretrained(teacher, dtype=torch.float32).eval()
    torch.manual_seed(0)
    texts = []
    began = time.perf_counter()
    for first in range(0, documents, batch):
        prompts = [OPENINGS[i % len(OPENINGS)] for i in range(first, min(first + batch, documents))]
        inputs = tokenizer(prompts, return_tensors="pt", padding=True)
        with torch.no_grad():
            output = model.generate(**inputs, do_sample=True, temperature=1.0, top_k=0, top_p=1.0,
                                    max_new_tokens=tokens, pad_token_id=tokenizer.eos_token_id)  # fmt: skip
        for row in output:
            text = tokenizer.decode(row, skip_special_tokens=True).strip()
            texts.append(" ".join(text.split()))  # one paragraph: one document for xatl's text reader
        print(f"{len(texts)}/{documents} documents, {time.perf_counter() - began:.0f} s", flush=True)
    out.parent.mkdir(parents=True, exist_ok=True)
    partial = out.with_suffix(".partial")
    partial.write_text("\n\n".join(texts) + "\n")
    partial.rename(out)
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--documents", type=int, default=64)
    parser.add_argument("--tokens", type=int, default=256)
    args = parser.parse_args()
    print(samples(args.documents, args.tokens))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
