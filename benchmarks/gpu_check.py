"""Every GPU check of xatl-convert in one run; benchmarks/gpu_check.sh prepares the machine and calls this.

    python benchmarks/gpu_check.py run --device cuda --json results.json   # on the GPU machine
    python benchmarks/gpu_check.py run --device cpu --quick                # the CPU-side dry run, here
    python benchmarks/gpu_check.py patch-sources --arch 90 --into /tmp/x   # unpack the sdists for one GPU arch

`run` converts the shipped example checkpoint (to Mamba, to Mamba2 with the attention-informed init, and to the
paper's hybrid) and a pythia-160m-shaped random GPT-NeoX (to Mamba and Mamba2), then runs `xatl verify` on each
with the given device; verify's kernel row runs every kernel call site against the reference path (relative error
≤ 1e-3 in fp32, ≤ 2e-2 in bf16), on the real kernels on CUDA. Then `kernel_timing` takes one 1B-shaped mixer of
each kind (hidden 2048, d_inner 4096): every call site compared again, and a bf16 prefill and decoding timed on the
kernel path against the reference path (the ratio is the kernels' speed-up), and `model_timing` does the same for a
whole Llama-3.2-1B-shaped hybrid (logits compared, prefill and decoding timed). Everything lands in one JSON file.

`patch-sources` unpacks the carried mamba-ssm and causal-conv1d sdists and limits their CUDA builds to one
architecture: their setup.py compiles for about ten (sm_75 … sm_121), which takes far longer than one.
"""

from __future__ import annotations

import argparse
import json
import platform
import tarfile
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
DEPS = ROOT / ".gpu-deps"
EXAMPLE = ROOT / "examples" / "pythia-tiny"
PYTHIA_160M = {"hidden_size": 768, "num_hidden_layers": 12, "num_attention_heads": 12, "intermediate_size": 3072,
               "vocab_size": 50304, "rotary_pct": 0.25, "max_position_embeddings": 2048}  # fmt: skip
ARCH_MARKER = "    # HACK: The compiler flag"


def patch_sources(arch: str, into: Path) -> list[Path]:
    """Unpack each sdist in .gpu-deps and make its setup.py compile for `arch` (e.g. "90") only."""
    folders = []
    for archive in sorted(DEPS.glob("*.tar.gz")):
        with tarfile.open(archive) as tar:
            tar.extractall(into, filter="data")
        folder = into / archive.name.removesuffix(".tar.gz")
        setup = folder / "setup.py"
        text = setup.read_text()
        if ARCH_MARKER not in text:
            raise SystemExit(f"{setup}: marker not found; check the architecture patch for this version")
        only = (
            '    cc_flag[:] = [f for f in cc_flag if not f.startswith(("-gencode", "arch="))]'
            f' + ["-gencode", "arch=compute_{arch},code=sm_{arch}"]\n'
        )
        setup.write_text(text.replace(ARCH_MARKER, only + ARCH_MARKER, 1))
        folders.append(folder)
    return folders


def run(device: str, quick: bool, json_path: Path | None) -> bool:
    import torch
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM
    from transformers.utils import logging as transformers_logging

    from xatl_convert.conversion import convert, init_overrides
    from xatl_convert.models.mixers_xatl import MIXERS
    from xatl_convert.models.modeling_xatl import kernels_available
    from xatl_convert.verify import verify

    transformers_logging.disable_progress_bar()
    results: dict[str, object] = {
        "device": torch.cuda.get_device_name(0) if device == "cuda" else platform.processor() or "cpu",
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "kernels": {kind: kernels_available(kind) for kind in MIXERS},
        "conversions": {},
    }
    with tempfile.TemporaryDirectory() as work:
        sources = {"example": EXAMPLE}
        if not quick:
            torch.manual_seed(0)
            sources["pythia-160m-shape"] = Path(work) / "pythia-160m"
            GPTNeoXForCausalLM(GPTNeoXConfig(**PYTHIA_160M)).save_pretrained(sources["pythia-160m-shape"])
        cases = [
            ("example", "mamba", {}, None),
            ("example", "mamba2", init_overrides("attention"), None),
            ("example", "mamba", {}, "paper"),
            ("example", "gated_deltanet", {}, "paper"),  # fla's chunk / fused-recurrent kernels, W_Q/K/V/O moved
            ("pythia-160m-shape", "mamba", {"mamba.expand": 2}, None),
            ("pythia-160m-shape", "mamba2", {}, None),
        ]
        passed = True
        for source_name, target, overrides, attn_layers in cases:
            if source_name not in sources:
                continue
            name = f"{source_name} → {target}" + (f" ({attn_layers})" if attn_layers else "")
            out = Path(work) / name.replace(" ", "_").replace("→", "to")
            start = time.perf_counter()
            convert(sources[source_name], out, to=target, overrides=overrides, attn_layers=attn_layers)
            report = verify(out, sources[source_name], device=device)
            results["conversions"][name] = {**report.to_dict(), "seconds": round(time.perf_counter() - start, 1)}
            passed &= report.passed
            for check in report.checks:
                print(f"{name:40s} {check.name:45s} {check.status:5s} {check.value}", flush=True)
        timing = kernel_timing(device, quick)
        results["kernel_timing"] = timing
        passed &= all(kind["call_sites_passed"] for kind in timing.values())
        for kind, measured in timing.items():
            print(f"{'1B-shaped ' + kind:40s} {measured}", flush=True)
        whole = model_timing(device, quick)
        results["model_timing"] = whole
        passed &= all(measured["passed"] for measured in whole.values())
        for name, measured in whole.items():
            print(f"{'Llama-3.2-1B-shaped ' + name:40s} {measured}", flush=True)
        if device == "cuda":
            exported = mamba_ssm_export_check(Path(work))
            results["mamba_ssm_export"] = exported
            passed &= exported.get("passed", True)
            print(f"{'mamba-ssm export':40s} {exported}", flush=True)
    results["passed"] = passed
    if json_path is not None:
        json_path.parent.mkdir(parents=True, exist_ok=True)
        json_path.write_text(json.dumps(results, indent=2, default=str) + "\n")
    return passed


def kernel_timing(device: str, quick: bool) -> dict[str, dict[str, object]]:
    """One mixer of each LCI kind at a 1B model's width (Llama-3.2-1B / pythia-1b: hidden 2048, d_inner 4096;
    Mamba2 d_state 128, headdim 64): every kernel call site against the reference path, then bf16 prefill (1 × 2048
    tokens) and decoding (64 single-token steps) timed on both paths. --quick (the CPU dry run): a small shape."""
    import torch

    from xatl_convert.models import XatlCache, XatlConfig, XatlForCausalLM
    from xatl_convert.verify.kernel_sites import compare_call_sites, used_kernels

    hidden, prefill, steps = (256, 330, 8) if quick else (2048, 2048, 64)
    results: dict[str, dict[str, object]] = {}
    for kind in ("mamba", "mamba2"):
        config = XatlConfig(vocab_size=256, hidden_size=hidden, intermediate_size=4 * hidden, num_hidden_layers=1,
                            num_attention_heads=hidden // 64, layer_types=[kind],
                            mamba2={"d_state": 128, "headdim": 64, "chunk_size": 256})  # fmt: skip
        torch.manual_seed(0)
        mixer = XatlForCausalLM(config).model.layers[0].mixer.to(device).eval()
        sample = torch.randn(2, 330, hidden, device=device)
        comparisons = compare_call_sites(mixer, config, sample)
        mixer = mixer.to(torch.bfloat16)

        def run_mixer(x: torch.Tensor, cache: XatlCache | None, mixer: torch.nn.Module = mixer) -> torch.Tensor:
            out = mixer(x, cache=cache)
            if cache is not None:  # the model advances it after its last layer; a lone mixer does it here
                cache.seen_tokens += x.shape[1]
            return out

        tokens = torch.randn(1, prefill + steps, hidden, device=device, dtype=torch.bfloat16)
        timings, _ = _time_both_paths(
            run_mixer,
            lambda config=config: XatlCache(config, 1, dtype=torch.bfloat16, device=device),
            tokens,
            prefill,
            steps,
            device,
        )
        results[kind] = {
            "kernels": used_kernels(torch.device(device)),
            "call_sites_passed": all(c.passed for c in comparisons),
            "worst_call_site": max((c.error, c.scenario, str(c.dtype)) for c in comparisons),
            **timings,
        }
    return results


def model_timing(device: str, quick: bool) -> dict[str, dict[str, object]]:
    """A whole Llama-3.2-1B-shaped xatl model (hidden 2048, 16 layers, GQA 32/8, gated MLP 8192, vocab 128256) as
    xatl convert gives it, the paper's hybrid (attention at layers 1 and 7, the rest Mamba or Mamba2 with the Llama
    mapping's shapes), in bf16: the same logits on both paths, and a 2048-token prefill and 64 decoding steps timed
    on the kernel call path against the reference path. --quick: a small shape."""
    import torch

    from xatl_convert.models import XatlConfig, XatlForCausalLM, new_cache

    if quick:
        sizes = {"hidden_size": 256, "num_hidden_layers": 4, "num_attention_heads": 4, "num_key_value_heads": 2,
                 "head_dim": 64, "intermediate_size": 512, "vocab_size": 1000}  # fmt: skip
        prefill, steps, attention = 300, 8, (1,)
    else:
        sizes = {"hidden_size": 2048, "num_hidden_layers": 16, "num_attention_heads": 32, "num_key_value_heads": 8,
                 "head_dim": 64, "intermediate_size": 8192, "vocab_size": 128256}  # fmt: skip
        prefill, steps, attention = 2048, 64, (1, 7)
    results: dict[str, dict[str, object]] = {}
    for kind in ("mamba", "mamba2"):
        layer_types = [("attention" if i in attention else kind) for i in range(sizes["num_hidden_layers"])]
        config = XatlConfig(**sizes, layer_types=layer_types, mlp_gated=True, hidden_act="silu", norm_type="rmsnorm",
                            norm_eps=1e-5, tie_word_embeddings=True, mamba={"expand": 1},
                            mamba2={"expand": 1, "headdim": 64, "ngroups": sizes["num_key_value_heads"],
                                    "d_state": 64})  # fmt: skip
        torch.manual_seed(0)
        with torch.device(device):
            model = XatlForCausalLM(config).to(torch.bfloat16).eval()
        ids = torch.randint(0, sizes["vocab_size"], (1, prefill + steps), device=device)

        def last_logits(x: torch.Tensor, cache: object, model: torch.nn.Module = model) -> torch.Tensor:
            return model(x, cache=cache, use_cache=cache is not None).logits[:, -16:].float()

        timings, logits = _time_both_paths(
            last_logits, lambda model=model: new_cache(model, 1), ids, prefill, steps, device
        )
        difference = float((logits["kernels"] - logits["reference"]).norm() / logits["reference"].norm())
        results[f"{kind} paper hybrid"] = {
            "parameters": sum(p.numel() for p in model.parameters()),
            **timings,
            "relative_logit_difference": difference,
            "passed": difference <= 2e-2,
        }
        del model
    return results


def _time_both_paths(
    forward: Callable[[Any, Any], Any], new_state: Callable[[], Any], inputs: Any, prefill: int, steps: int,
    device: str,
) -> tuple[dict[str, float], dict[str, Any]]:  # fmt: skip
    """A `prefill`-token forward, then `steps` single-token steps from a fresh state, each timed on the kernel call
    path and on the reference path: forward(inputs, state), state None or new_state(). Returns the times (ms) and
    speed-ups (reference / kernels), and each path's prefill output."""
    import torch

    from xatl_convert.models.kernels_xatl import kernel_path

    timings: dict[str, float] = {}
    outputs: dict[str, Any] = {}
    for path in ("kernels", "reference"):
        with kernel_path(path), torch.no_grad():
            forward(inputs[:, :prefill], None)  # warm-up (Triton compiles here)
            start = _synchronized_clock(device)
            outputs[path] = forward(inputs[:, :prefill], None)
            timings[f"{path}_prefill_ms"] = round(1000 * (_synchronized_clock(device) - start), 2)
            state = new_state()
            forward(inputs[:, :prefill], state)
            start = _synchronized_clock(device)
            for t in range(prefill, prefill + steps):
                forward(inputs[:, t : t + 1], state)
            timings[f"{path}_step_ms"] = round(1000 * (_synchronized_clock(device) - start) / steps, 3)
    timings["prefill_speedup"] = round(timings["reference_prefill_ms"] / timings["kernels_prefill_ms"], 2)
    timings["step_speedup"] = round(timings["reference_step_ms"] / timings["kernels_step_ms"], 2)
    return timings, outputs


def _synchronized_clock(device: str) -> float:
    import torch

    if device == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter()


def mamba_ssm_export_check(work: Path) -> dict[str, object]:
    """A Llama-shaped hybrid (Mamba2 + one attention layer) exported as mamba-ssm, loaded by mamba-ssm's own
    MambaLMHeadModel, against the xatl model on the same tokens: what the CPU tests can only check by names."""
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

    from xatl_convert.conversion import convert
    from xatl_convert.export import export_folder

    try:
        from mamba_ssm.models.mixer_seq_simple import MambaLMHeadModel
    except ImportError as error:
        return {"skipped": f"mamba-ssm does not import ({error})"}
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=512, hidden_size=256, intermediate_size=600, num_hidden_layers=4,
                         num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=1e-5)  # fmt: skip
    LlamaForCausalLM(config).save_pretrained(work / "llama")
    convert(work / "llama", work / "llama-xatl", to="mamba2", attn_layers="1")
    export_folder(work / "llama-xatl", work / "llama-ssm", "mamba-ssm")
    ids = torch.randint(0, 512, (1, 64), device="cuda")
    xatl = AutoModelForCausalLM.from_pretrained(work / "llama-xatl", trust_remote_code=True, dtype=torch.float32)
    ssm = MambaLMHeadModel.from_pretrained(str(work / "llama-ssm"), device="cuda", dtype=torch.float32)
    with torch.no_grad():
        ours, theirs = xatl.cuda().eval()(ids).logits, ssm.eval()(ids).logits
    error = float((theirs - ours).norm() / ours.norm())
    return {"relative_logit_error": error, "passed": error <= 1e-3}  # both on CUDA kernels (tf32 off by default)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    run_parser = commands.add_parser("run")
    run_parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    run_parser.add_argument("--quick", action="store_true", help="only the example checkpoint")
    run_parser.add_argument("--json", type=Path)
    patch_parser = commands.add_parser("patch-sources")
    patch_parser.add_argument("--arch", required=True, help='compute capability without the dot, e.g. "90"')
    patch_parser.add_argument("--into", type=Path, required=True)
    args = parser.parse_args()
    if args.command == "patch-sources":
        for folder in patch_sources(args.arch, args.into):
            print(folder)
        return
    raise SystemExit(0 if run(args.device, args.quick, args.json) else 1)


if __name__ == "__main__":
    main()
