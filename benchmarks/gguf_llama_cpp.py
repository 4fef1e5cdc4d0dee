"""llama.cpp itself runs xatl's GGUF exports and computes what the xatl model computes.

For each case (tiny random Llama-family conversions: pure Mamba2, and hybrids with layer 1 kept as attention: plain,
Granite with its multipliers and MLP biases, an untied head with linear RoPE scaling, partial rotary; SmolLM2-135M
converted to pure
Mamba2 and to the paper hybrid, layers 1 and 14 kept as attention), and each tensor type (F32, F16, BF16, Q8_0):
`xatl export --format gguf`, then `xatl verify` on the export (tensors and keys read back; llama.cpp's logits against
the xatl model), then llama.cpp (through llama-cpp-python) against the plain float32 xatl model on the same tokens,
with an F32 KV cache and with llama.cpp's default F16 one: the largest relative logit error, the share of positions
whose argmax agrees, and greedy decoding (llama.cpp one token at a time through its recurrent state; the xatl model
through its cache); whether llama.cpp tokenizes the sample text as the folder's own tokenizer does; and, for F16,
BF16 and Q8_0, how far the rounding llama.cpp applies (weights, and each matmul's input) moves the xatl model's own
logits in torch (`simulated_rounding`): the size of the difference to expect from the model, not from the file.

llama-cpp-python has no wheel here; build it once into a git-ignored folder (about 30 minutes on 2 cores):

    CMAKE_ARGS="-DGGML_NATIVE=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_TOOLS=OFF" \\
    CMAKE_BUILD_PARALLEL_LEVEL=2 pip install --no-deps --target benchmarks/.deps/llama_cpp llama-cpp-python==0.3.36
    pip install --no-deps --target benchmarks/.deps/llama_cpp diskcache

    python benchmarks/gguf_llama_cpp.py [--skip-smollm2] [--types f32,q8_0]   # → benchmarks/results/gguf_llama_cpp.json
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

HERE = Path(__file__).resolve().parent
DEPS = HERE / ".deps" / "llama_cpp"
WORK = HERE / ".work" / "gguf"
RESULTS = HERE / "results" / "gguf_llama_cpp.json"
sys.path[:0] = [str(DEPS), str(HERE.parent)]

F32_BOUND = 1e-3  # the bound for llama.cpp against the xatl model in F32
GREEDY_TOKENS = 32
FILE_CHECKS = ("tensors as exported", "keys as exported")
PROMPT_TOKENS = 16
TINY = ("LlamaForCausalLM", "LlamaConfig", {
    "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 3, "num_attention_heads": 4,
    "num_key_value_heads": 2, "rms_norm_eps": 1e-5, "tie_word_embeddings": True, "vocab_size": 320,
    "max_position_embeddings": 256})  # fmt: skip


def tiny_source(folder: Path) -> Path:
    """A random tiny Llama with a small byte-level BPE tokenizer (GPT-2's pre-tokenizer) trained on a few lines."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    from tests.test_families import save_family

    if (folder / "tokenizer.json").is_file():
        return folder
    save_family(folder, "llama", TINY)
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    trainer = trainers.BpeTrainer(vocab_size=TINY[2]["vocab_size"], initial_alphabet=alphabet,
                                  special_tokens=["<|endoftext|>"], show_progress=False)  # fmt: skip
    text = (Path(__file__).resolve().parents[1] / "xatl_convert" / "verify" / "sample.txt").read_text()
    tokenizer.train_from_iterator(text.splitlines(), trainer)
    tokenizer.save(str(folder / "tokenizer.json"))
    return folder


# Variants of the tiny source for what the GGUF writer maps: Granite's multipliers (embedding, residual, attention,
# logits) and MLP biases; an untied head with linear RoPE scaling; partial rotary dims.
VARIANTS = {
    "granite": ("GraniteForCausalLM", "GraniteConfig", {"family": "granite", "num_hidden_layers": 3,
                "rms_norm_eps": 1e-5, "attention_bias": False}),
    "untied-linear-rope": (*TINY[:2], {**TINY[2], "tie_word_embeddings": False,
                           "rope_parameters": {"rope_type": "linear", "factor": 2.0, "rope_theta": 10000.0}}),
    "partial-rotary": (*TINY[:2], {**TINY[2], "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0,
                                                                  "partial_rotary_factor": 0.5}}),
}  # fmt: skip


def variant_source(folder: Path, tiny: Path, name: str) -> Path:
    """A random tiny variant (VARIANTS) with the tiny Llama's tokenizer."""
    from tests.test_families import FAMILIES, save_family

    if not (folder / "tokenizer.json").is_file():
        model, config, values = VARIANTS[name]
        family = values.pop("family", "llama")
        base = FAMILIES[family][2] if family != "llama" else {}
        values = {**base, **values, "vocab_size": TINY[2]["vocab_size"], "max_position_embeddings": 256}
        save_family(folder, family, (model, config, values))
        shutil.copyfile(tiny / "tokenizer.json", folder / "tokenizer.json")
    return folder


def converted(source: Path, folder: Path, attn_layers: str) -> Path:
    from xatl_convert.conversion import convert

    if not (folder / "config.json").is_file():
        convert(source, folder, to="mamba2", attn_layers=attn_layers)
    return folder


def xatl_model(folder: Path) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, trust_remote_code=True).eval()


def xatl_greedy(model: torch.nn.Module, prompt: torch.Tensor, steps: int) -> list[int]:
    """The xatl model's greedy continuation through its own cache (the end-of-text token is not special here, as
    it is not to the llama.cpp loop below)."""
    tokens: list[int] = []
    with torch.no_grad():
        out = model(prompt, use_cache=True)
        for _ in range(steps):
            tokens.append(int(out.logits[0, -1].argmax()))
            out = model(torch.tensor([[tokens[-1]]]), cache=out.past_key_values, use_cache=True)
    return tokens


def llama_greedy(model: Any, prompt: list[int], steps: int) -> list[int]:
    """llama.cpp's greedy continuation: the prompt in one batch, then one token at a time (its recurrent step)."""
    model.reset()
    model.eval(prompt)
    tokens: list[int] = []
    for _ in range(steps):
        token = int(np.argmax(model.scores[model.n_tokens - 1]))
        tokens.append(token)
        model.eval([token])
    return tokens


def simulated_rounding(folder: Path, config: dict[str, Any], kind: str, ids: torch.Tensor) -> torch.Tensor:
    """The xatl model's logits with the file's rounded weights and, as llama.cpp's CPU matmuls do, each linear
    layer's input rounded to the weights' type (F16, BF16, or Q8_0 blocks of 32): how much that rounding alone moves
    this model's logits, in torch."""
    import gguf

    from xatl_convert.export.gguf_verify import rounded_xatl_model

    def rounded_input(x: torch.Tensor) -> torch.Tensor:
        if kind == "F16":
            return x.half().float()
        if kind == "BF16":
            return x.bfloat16().float()
        width = x.shape[-1]
        padded = torch.nn.functional.pad(x.float(), (0, -width % 32)).reshape(-1, width + -width % 32).numpy()
        qtype = gguf.GGMLQuantizationType.Q8_0
        values = np.array(gguf.quants.dequantize(gguf.quants.quantize(padded, qtype), qtype), dtype=np.float32)
        return torch.from_numpy(values).reshape(*x.shape[:-1], -1)[..., :width]

    model = rounded_xatl_model(folder, config, kind)
    for module in model.modules():
        if isinstance(module, torch.nn.Linear):
            module.register_forward_pre_hook(lambda _, args: (rounded_input(args[0]), *args[1:]))
    with torch.no_grad():
        return model(ids, use_cache=False).logits[0].float()


def measure(case: str, folder: Path, types: list[str], max_tokens: int) -> list[dict[str, Any]]:
    """Export `folder` in each type, verify it, and compare llama.cpp with the xatl model."""
    from transformers import AutoTokenizer

    from xatl_convert.export import export_folder
    from xatl_convert.export.gguf_verify import llama_cpp_model, verify_gguf_export
    from xatl_convert.verify.checks import read_output_config, sample_input_ids
    from xatl_convert.verify.streaming import relative_error

    config = read_output_config(folder)
    ids = sample_input_ids(folder, config, None, max_tokens)
    model = xatl_model(folder)
    started = time.perf_counter()
    with torch.no_grad():
        reference = model(ids, use_cache=False).logits[0].float()
    prompt = ids[0, :PROMPT_TOKENS].tolist()
    xatl_tokens = xatl_greedy(model, ids[:, :PROMPT_TOKENS], GREEDY_TOKENS)
    xatl_seconds = time.perf_counter() - started
    text = (Path(__file__).resolve().parents[1] / "xatl_convert" / "verify" / "sample.txt").read_text()[:2000]
    hf_tokens = AutoTokenizer.from_pretrained(folder).encode(text, add_special_tokens=False)

    def run(path: Path, f32_cache: bool) -> dict[str, Any]:
        """llama.cpp's logits on `ids` and its greedy continuation of the prompt, against the xatl model's."""
        llm = llama_cpp_model(path, 512, f32_cache=f32_cache, threads=2)
        started = time.perf_counter()
        llm.eval(ids[0].tolist())
        seconds = time.perf_counter() - started
        theirs = torch.from_numpy(np.array(llm.scores[: ids.shape[1]], dtype=np.float32))
        greedy = llama_greedy(llm, prompt, GREEDY_TOKENS)
        tokens = llm.tokenize(text.encode(), add_bos=False, special=False)
        llm.close()
        same = next((i for i, (a, b) in enumerate(zip(xatl_tokens, greedy, strict=True)) if a != b), GREEDY_TOKENS)
        return {"relative_error": relative_error(theirs, reference),
                "argmax_agreement": float((theirs.argmax(-1) == reference.argmax(-1)).float().mean()),
                "greedy_equal_before_first_difference": same, "llama_cpp_greedy": greedy,
                "tokenizer_equal": tokens == hf_tokens, "seconds": seconds, "logits": theirs}  # fmt: skip

    rows = []
    for kind in types:
        out = WORK / f"{case}-{kind}"
        export_folder(folder, out, "gguf", force=True, gguf_type=kind)
        record = json.loads((out / "xatl_manifest.json").read_text())["export"]
        report = verify_gguf_export(out, folder, record, None, max_tokens)
        f32_cache = run(out / "model.gguf", f32_cache=True)
        row = {"case": case, "type": record["gguf_type"], "tokens": int(ids.shape[1]),
               "file_bytes": (out / "model.gguf").stat().st_size, "tokenizer_pre": record["tokenizer_pre"],
               "xatl_greedy": xatl_tokens, "xatl_seconds_forward_and_greedy": xatl_seconds,
               "f32_kv_cache": f32_cache, "default_f16_kv_cache": run(out / "model.gguf", f32_cache=False),
               "verify": {check.name: {"status": check.status, "value": check.value, **check.details}
                          for check in report.checks}}  # fmt: skip
        theirs = f32_cache.pop("logits")
        row["default_f16_kv_cache"].pop("logits")
        if row["type"] != "F32":
            simulated = simulated_rounding(folder, config.to_dict(), row["type"], ids)
            row["xatl_with_simulated_rounding_vs_xatl"] = relative_error(simulated, reference)
            row["llama_cpp_vs_xatl_with_simulated_rounding"] = relative_error(theirs, simulated)
        rows.append(row)
        default = row["default_f16_kv_cache"]
        print(f"{case:22} {row['type']:5} rel.err {f32_cache['relative_error']:.2e} (F16 KV cache "
              f"{default['relative_error']:.2e}) argmax {f32_cache['argmax_agreement']:.3f} greedy "
              f"{f32_cache['greedy_equal_before_first_difference']}/{GREEDY_TOKENS} "
              f"(F16 KV {default['greedy_equal_before_first_difference']}) simulated rounding "
              f"{row.get('xatl_with_simulated_rounding_vs_xatl', 0):.1e} (llama.cpp vs it "
              f"{row.get('llama_cpp_vs_xatl_with_simulated_rounding', 0):.1e}) tokenizer "
              f"{'=' if f32_cache['tokenizer_equal'] else '≠'} verify "
              f"{','.join(c['status'] for c in row['verify'].values())}", flush=True)  # fmt: skip
        if case.startswith("smollm2"):  # hundreds of MB each; the figures are what is kept
            shutil.rmtree(out)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--skip-smollm2", action="store_true", help="only the tiny models")
    parser.add_argument("--types", default="f32,f16,bf16,q8_0")
    args = parser.parse_args()
    try:
        import llama_cpp
    except ImportError:
        sys.exit(f"llama_cpp does not import from {DEPS}: build it first (see this file's docstring)")
    types = args.types.split(",")
    WORK.mkdir(parents=True, exist_ok=True)
    source = tiny_source(WORK / "tiny-llama")
    cases = [("tiny-mamba2", converted(source, WORK / "tiny-mamba2-xatl", "none"), 64),
             ("tiny-hybrid-layer-1", converted(source, WORK / "tiny-hybrid-xatl", "1"), 64)]  # fmt: skip
    for name in VARIANTS:
        variant = variant_source(WORK / f"tiny-{name}", source, name)
        cases.append((f"tiny-{name}-hybrid", converted(variant, WORK / f"tiny-{name}-xatl", "1"), 64))
    if not args.skip_smollm2:
        from benchmarks.real_model import build

        smol = build()
        cases += [("smollm2-mamba2", converted(smol, WORK / "smollm2-mamba2-xatl", "none"), 128),
                  ("smollm2-paper-hybrid", converted(smol, WORK / "smollm2-hybrid-xatl", "paper"), 128)]  # fmt: skip
    rows = []
    for case, folder, tokens in cases:
        rows += measure(case, folder, types, tokens)
    f32 = [row["f32_kv_cache"] for row in rows if row["type"] == "F32"]
    summary = {
        "llama_cpp_python": llama_cpp.__version__,
        "f32_bound": F32_BOUND,
        "f32_max_relative_error": max(run["relative_error"] for run in f32) if f32 else None,
        "f32_within_bound": all(run["relative_error"] <= F32_BOUND for run in f32),
        "f32_greedy_all_equal": all(run["greedy_equal_before_first_difference"] == GREEDY_TOKENS for run in f32),
        "verify_tensors_and_keys_all_pass": all(
            row["verify"][name]["status"] == "pass"
            for row in rows
            for name in ("tensors as exported", "keys as exported")
        ),
    }
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps({"summary": summary, "rows": rows}, indent=2) + "\n")
    print(json.dumps(summary, indent=2))
    print(f"wrote {RESULTS}")


if __name__ == "__main__":
    main()
