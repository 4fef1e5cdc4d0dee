"""Per-token decode cost against context length: a pure-Mamba xatl model against its source Transformer.

The Transformer (GPT-NeoX, pythia-160m shape, random weights) decodes with its KV cache; the xatl model converted
from it (every layer Mamba) decodes with its recurrent state. For each context length the prompt is prefilled once,
then DECODE_STEPS single-token steps are timed. Reported: ms per token, the ratio of each model's time at the
longest context to its time at the shortest, and the memory each keeps per sequence (recurrent state bytes
against KV-cache bytes).

    python benchmarks/decode_bench.py                 # contexts 256, 1024, 4096
    python benchmarks/decode_bench.py --contexts 256,1024
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch
from transformers import GPTNeoXConfig, GPTNeoXForCausalLM
from transformers.utils import logging as transformers_logging

from xatl_convert.conversion import convert
from xatl_convert.models import XatlForCausalLM

DECODE_STEPS = 16
SHAPE = {"hidden_size": 768, "num_hidden_layers": 12, "num_attention_heads": 12, "intermediate_size": 3072,
         "vocab_size": 50304, "rotary_pct": 0.25, "max_position_embeddings": 8192}  # fmt: skip


def decode_ms_per_token(model: torch.nn.Module, context: int, steps: int = DECODE_STEPS) -> tuple[float, object]:
    """Prefill `context` tokens with the cache on, then time `steps` single-token steps; median ms per token."""
    generator = torch.Generator().manual_seed(0)
    prompt = torch.randint(0, SHAPE["vocab_size"], (1, context), generator=generator)
    with torch.no_grad():
        out = model(prompt, use_cache=True)
        cache = out.cache  # transformers 5 names the cache `cache` (formerly past_key_values)
        token = out.logits[:, -1:].argmax(-1)
        timings = []
        for _ in range(steps):
            start = time.perf_counter()
            out = model(token, cache=cache, use_cache=True)
            timings.append(time.perf_counter() - start)
            cache = out.cache
            token = out.logits[:, -1:].argmax(-1)
    return 1000 * statistics.median(timings), cache


def cache_bytes(cache: object) -> int:
    """Bytes held per sequence: XatlCache reports its own; a transformers Cache is summed over its tensors."""
    if hasattr(cache, "state_bytes"):
        return cache.state_bytes()
    total = 0
    for layer in getattr(cache, "layers", []):
        for name in ("keys", "values"):
            tensor = getattr(layer, name, None)
            if isinstance(tensor, torch.Tensor):
                total += tensor.numel() * tensor.element_size()
    return total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--contexts", default="256,1024,4096")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    transformers_logging.disable_progress_bar()
    contexts = [int(value) for value in args.contexts.split(",")]
    with tempfile.TemporaryDirectory() as folder:
        source = Path(folder) / "source"
        torch.manual_seed(0)
        GPTNeoXForCausalLM(GPTNeoXConfig(**SHAPE)).save_pretrained(source)
        convert(source, Path(folder) / "mamba", overrides={"mamba.expand": 2})
        models = {
            "transformer (KV cache)": GPTNeoXForCausalLM.from_pretrained(source).eval(),
            "xatl mamba (state)": XatlForCausalLM.from_pretrained(Path(folder) / "mamba").eval(),
        }
        rows: dict[str, list[tuple[float, int]]] = {name: [] for name in models}
        for context in contexts:
            for name, model in models.items():
                ms, cache = decode_ms_per_token(model, context)
                rows[name].append((ms, cache_bytes(cache)))
                print(f"  context {context:5d}  {name:24s} {ms:8.2f} ms/token  {cache_bytes(cache) / 2**20:8.2f} MiB",
                      flush=True)  # fmt: skip
    print()
    header = " | ".join(f"{c} ms/token" for c in contexts)
    print(f"| model | {header} | ratio {contexts[-1]}/{contexts[0]} | memory/sequence at {contexts[-1]} |")
    print("|---|" + "---:|" * (len(contexts) + 2))
    for name, values in rows.items():
        cells = " | ".join(f"{ms:.2f}" for ms, _ in values)
        print(f"| {name} | {cells} | {values[-1][0] / values[0][0]:.2f} | {values[-1][1] / 2**20:.2f} MiB |")


if __name__ == "__main__":
    main()
