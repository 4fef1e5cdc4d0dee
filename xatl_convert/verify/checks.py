"""The checks of `xatl verify`: tensors as planned, transfers exact, forward sane, losses, exactness vs the source.

Each check returns a CheckResult; `verify()` runs them in order and collects the report.
"""

from __future__ import annotations

import math
import time
from contextlib import ExitStack
from importlib import resources
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from xatl_convert.errors import XatlError
from xatl_convert.manifest import read_manifest
from xatl_convert.models import XatlConfig, XatlForCausalLM
from xatl_convert.sources import SourceCheckpoint, resolve_source
from xatl_convert.transforms import parse_transform
from xatl_convert.verify.report import CheckResult, VerifyReport

SAMPLE_TOKENS = 256
LOGITS_TOLERANCE = 1e-4
DECODE_TOKENS = 48  # tokens of the sample that the incremental-decoding check walks through
PREFILL_TOKENS = 16


def verify(output: str | Path, source: str | Path | None = None, seed: int = 0, device: str = "auto") -> VerifyReport:
    """Run every check that applies to a converted folder (and its source, when given or recorded).

    device: "cpu", "cuda", or "auto" (CUDA when available). On CUDA with mamba-ssm importable, each LCI mixer's
    kernel path is also checked against its reference path.
    """
    output = Path(output)
    target = resolve_device(device)
    manifest = read_manifest(output)
    if source is None and Path(manifest["source"]["path"]).is_dir():
        source = manifest["source"]["path"]
    report = VerifyReport(output=str(output), source=str(source) if source is not None else None)
    with ExitStack() as stack:
        tensors = _open_output_tensors(output, stack)
        report.checks.append(check_tensors_as_planned(manifest, tensors))
        checkpoint = stack.enter_context(resolve_source(source)) if source is not None else None
        if checkpoint is not None:
            report.checks.append(check_transfers_exact(manifest, tensors, checkpoint))
    source_path = checkpoint.path if checkpoint is not None else None  # resolved once (a Hub id costs a request)
    model = _load_converted(output).to(target)
    input_ids = sample_input_ids(output, model.config).to(target)
    report.checks.append(check_logits_finite(model, input_ids))
    reference = _load_source_model(source_path).to(target) if source_path is not None else None
    report.checks.append(check_loss_against_scratch(model, input_ids, seed, reference))
    report.checks.append(check_attention_reproduces_source(model, input_ids, reference))
    report.checks.append(check_incremental_decoding(model, input_ids))
    if target.type == "cuda":
        report.checks.extend(check_kernels_against_reference(model))
    return report


def resolve_device(device: str) -> torch.device:
    """'auto' → CUDA when available, else CPU; 'cuda' without a GPU is a clear error."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device not in ("cpu", "cuda"):
        raise XatlError(f"--device {device!r}: expected auto, cpu or cuda")
    if device == "cuda" and not torch.cuda.is_available():
        raise XatlError("--device cuda: no CUDA device is available (torch.cuda.is_available() is False)")
    return torch.device(device)


def check_tensors_as_planned(manifest: dict[str, Any], tensors: dict[str, Any]) -> CheckResult:
    """(a) Every planned tensor is present with its planned shape and dtype, and every value is finite."""
    problems: list[str] = []
    for name, entry in manifest["tensors"].items():
        if name not in tensors:
            problems.append(f"{name}: missing")
            continue
        tensor = tensors[name]
        if list(tensor.shape) != entry["shape"] or str(tensor.dtype).removeprefix("torch.") != entry["dtype"]:
            problems.append(f"{name}: {list(tensor.shape)} {tensor.dtype}, planned {entry['shape']} {entry['dtype']}")
        elif tensor.is_floating_point() and not torch.isfinite(tensor).all():
            problems.append(f"{name}: non-finite values")
    extra = sorted(set(tensors) - set(manifest["tensors"]))
    problems += [f"{name}: not in the plan" for name in extra]
    return CheckResult(
        name="tensors as planned",
        status="fail" if problems else "pass",
        value=f"{len(manifest['tensors']) - len(problems)}/{len(manifest['tensors'])} ok",
        bound="all present, planned shape and dtype, finite",
        details={"problems": problems[:20]},
    )


def check_transfers_exact(manifest: dict[str, Any], tensors: dict[str, Any], source: SourceCheckpoint) -> CheckResult:
    """(b) Every transferred tensor (and every transferred row block) equals its sources after the recorded
    transform, bit for bit."""
    checked = 0
    mismatched: list[str] = []
    for name, entry in manifest["tensors"].items():
        pieces = [(None, entry)] if entry["status"] == "transferred" else []
        pieces += [(tuple(part["rows"]), part) for part in entry.get("parts", [])]
        for rows, piece in pieces:
            checked += 1
            expected = parse_transform(piece["transform"]).apply([source.read(item) for item in piece["sources"]])
            actual = tensors[name] if rows is None else tensors[name][rows[0] : rows[1]]
            if not torch.equal(expected.to(actual.dtype), actual):
                mismatched.append(name if rows is None else f"{name}[{piece['part']}]")
    return CheckResult(
        name="transfers exact",
        status="fail" if mismatched else "pass",
        value=f"{checked - len(mismatched)}/{checked} equal",
        bound="bit-for-bit",
        details={"mismatched": mismatched[:20]},
    )


def check_logits_finite(model: XatlForCausalLM, input_ids: torch.Tensor) -> CheckResult:
    """(c) A forward pass over the sample gives finite logits."""
    with torch.no_grad():
        logits = model(input_ids).logits
    finite = bool(torch.isfinite(logits).all())
    return CheckResult(
        name="logits finite",
        status="pass" if finite else "fail",
        value=f"{tuple(logits.shape)}, max |logit| {logits.abs().max().item():.3g}",
        bound="all finite",
    )


def check_loss_against_scratch(
    model: XatlForCausalLM, input_ids: torch.Tensor, seed: int, reference: torch.nn.Module | None
) -> CheckResult:
    """(d) Sample loss of the converted model beside a from-scratch model of the same config (and the source)."""
    losses = {"converted": _loss(model, input_ids)}
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        scratch = XatlForCausalLM(XatlConfig.from_dict(model.config.to_dict())).eval()
    losses["from_scratch"] = _loss(scratch, input_ids)
    if reference is not None:
        losses["source"] = _loss(reference, input_ids)
    finite = all(math.isfinite(value) for value in losses.values())
    value = ", ".join(f"{key} {loss:.3f}" for key, loss in losses.items())
    return CheckResult(
        name="loss vs from-scratch",
        status="pass" if finite else "fail",
        value=value,
        bound="finite (reported, not compared)",
        details={"losses": losses, "uniform": math.log(model.config.vocab_size)},
    )


def check_attention_reproduces_source(
    model: XatlForCausalLM, input_ids: torch.Tensor, reference: torch.nn.Module | None
) -> CheckResult:
    """(e) With every layer kept as attention, the logits equal the source model's (transformers' own class)."""
    name, bound = "all-attention logits = source", f"max abs diff ≤ {LOGITS_TOLERANCE:g}"
    if any(kind != "attention" for kind in model.config.layer_types):
        return CheckResult(name, "skip", "LCI layers present", bound)
    if reference is None:
        return CheckResult(name, "skip", "no source given", bound)
    with torch.no_grad():
        difference = (model(input_ids).logits - reference(input_ids).logits).abs().max().item()
    passed = difference <= LOGITS_TOLERANCE
    return CheckResult(name, "pass" if passed else "fail", f"{difference:.2e}", bound, {"max_abs_diff": difference})


def check_incremental_decoding(model: XatlForCausalLM, input_ids: torch.Tensor) -> CheckResult:
    """(f) Prefill, then one token at a time through the cache: the logits equal one full forward's."""
    ids = input_ids[:, :DECODE_TOKENS]
    prefill = min(PREFILL_TOKENS, ids.shape[1] - 1)
    with torch.no_grad():
        full = model(ids).logits
        out = model(ids[:, :prefill], use_cache=True)
        steps = [out.logits]
        for position in range(prefill, ids.shape[1]):
            out = model(ids[:, position : position + 1], cache=out.cache, use_cache=True)
            steps.append(out.logits)
    difference = (torch.cat(steps, dim=1) - full).abs().max().item()
    return CheckResult(
        name="incremental decoding = full forward",
        status="pass" if difference <= LOGITS_TOLERANCE else "fail",
        value=f"{difference:.2e} over {ids.shape[1] - prefill} steps",
        bound=f"max abs diff ≤ {LOGITS_TOLERANCE:g}",
        details={"max_abs_diff": difference, "prefill": prefill, "steps": ids.shape[1] - prefill},
    )


def check_kernels_against_reference(model: XatlForCausalLM) -> list[CheckResult]:
    """(g) On CUDA: each LCI mixer type's kernel path against its reference path, in fp32 and bf16, timed."""
    from xatl_convert.models.modeling_xatl import kernels_available, reference_path

    results = []
    for kind in sorted(set(model.config.layer_types) - {"attention"}):
        name = f"{kind} kernels = reference"
        if not kernels_available(kind):
            results.append(CheckResult(name, "skip", "mamba-ssm / causal-conv1d not importable", "—"))
            continue
        mixer = next(layer.mixer for layer in model.model.layers if layer.layer_type == kind)
        for dtype, bound in ((torch.float32, 1e-3), (torch.bfloat16, 2e-2)):
            generator = torch.Generator(device="cuda").manual_seed(0)
            hidden = torch.randn(2, 512, model.config.hidden_size, device="cuda", generator=generator, dtype=dtype)
            module = mixer.to(dtype)
            with torch.no_grad():
                kernel_out, kernel_ms = _timed_cuda(module, hidden)
                with reference_path():
                    reference_out, reference_ms = _timed_cuda(module, hidden)
            error = ((kernel_out.float() - reference_out.float()).norm() / reference_out.float().norm()).item()
            results.append(
                CheckResult(
                    f"{name} ({str(dtype).removeprefix('torch.')})",
                    "pass" if error <= bound else "fail",
                    f"rel. error {error:.1e}; kernel {kernel_ms:.2f} ms, reference {reference_ms:.2f} ms",
                    f"≤ {bound:g}",
                    {"relative_error": error, "kernel_ms": kernel_ms, "reference_ms": reference_ms},
                )
            )
        mixer.to(torch.float32)
    return results


def _timed_cuda(module: torch.nn.Module, hidden: torch.Tensor, repeats: int = 5) -> tuple[torch.Tensor, float]:
    result = module(hidden)  # warm-up (and Triton compilation)
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(repeats):
        result = module(hidden)
    torch.cuda.synchronize()
    return result, 1000 * (time.perf_counter() - start) / repeats


def sample_input_ids(folder: Path, config: XatlConfig) -> torch.Tensor:
    """The shipped sample text through the folder's tokenizer; fixed random ids when there is no tokenizer."""
    length = min(SAMPLE_TOKENS, config.max_position_embeddings)
    if (folder / "tokenizer.json").is_file() or (folder / "tokenizer_config.json").is_file():
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(folder)
        text = resources.files("xatl_convert.verify").joinpath("sample.txt").read_text()
        ids = tokenizer(text, return_tensors="pt").input_ids[:, :length]
        if ids.shape[1] >= 2 and int(ids.max()) < config.vocab_size:
            return ids
    generator = torch.Generator().manual_seed(0)
    return torch.randint(0, config.vocab_size, (1, length), generator=generator)


def _loss(model: torch.nn.Module, input_ids: torch.Tensor) -> float:
    with torch.no_grad():
        return float(model(input_ids, labels=input_ids).loss)


def _load_converted(folder: Path) -> XatlForCausalLM:
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()


def _load_source_model(path: Path) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, trust_remote_code=False).eval()


def _open_output_tensors(folder: Path, stack: ExitStack) -> dict[str, torch.Tensor]:
    tensors: dict[str, torch.Tensor] = {}
    for file in sorted(folder.glob("*.safetensors")):
        handle = stack.enter_context(safe_open(file, framework="pt"))
        for name in handle.keys():  # noqa: SIM118  (safe_open is not a mapping)
            tensors[name] = handle.get_tensor(name)
    return tensors
