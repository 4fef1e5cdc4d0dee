"""The checks of `xatl verify`: tensors as planned, transfers exact, forward sane, losses, exactness vs the source.

Each check returns a CheckResult; `verify()` runs them in order and collects the report.
"""

from __future__ import annotations

import json
import math
import time
from contextlib import ExitStack
from importlib import resources
from pathlib import Path
from typing import Any

import torch
from huggingface_hub.errors import StrictDataclassError
from safetensors import SafetensorError, safe_open

from xatl_convert.errors import OutputError, SourceError, XatlError, first_line
from xatl_convert.json_files import read_json
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
    # everything a user can get wrong is read and validated here, before any model is built
    manifest = read_manifest(output)
    config = read_output_config(output)
    recorded = source is None
    source, no_source = _choose_source(manifest, source)
    report = VerifyReport(output=str(output), source=str(source) if source is not None else None)
    with ExitStack() as stack:
        tensors = _open_output_tensors(output, stack)
        _check_config_fits_weights(output, config, tensors)
        checkpoint = stack.enter_context(_open_source(source, recorded)) if source is not None else None
        report.checks.append(check_tensors_as_planned(manifest, tensors))
        if checkpoint is not None:
            report.checks.append(check_transfers_exact(manifest, tensors, checkpoint))
        else:  # listed all the same: a check left out would read as one that passed
            report.checks.append(_skipped("transfers exact", "bit-for-bit", no_source))
    source_path = checkpoint.path if checkpoint is not None else None  # resolved once (a Hub id costs a request)
    model = _load_converted(output).to(target)
    input_ids = sample_input_ids(output, model.config).to(target)
    report.checks.append(check_logits_finite(model, input_ids))
    reference = _load_source_model(source_path).to(target) if source_path is not None else None
    report.checks.append(check_loss_against_scratch(model, input_ids, seed, reference))
    report.checks.append(check_attention_reproduces_source(model, input_ids, reference, no_source))
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
    transform, bit for bit.

    A piece that cannot be recomputed (its source tensor is gone, or no longer fits the transform) fails the check
    by name rather than stopping verify: it is exactly what a user swapping or editing a source needs to see.
    """
    checked = 0
    mismatched: list[str] = []
    problems: list[str] = []
    for name, entry in manifest["tensors"].items():
        pieces = [(None, entry)] if entry["status"] == "transferred" else []
        pieces += [(tuple(part["rows"]), part) for part in entry.get("parts", [])]
        for rows, piece in pieces:
            checked += 1
            label = name if rows is None else f"{name}[{piece['part']}]"
            if name not in tensors:
                problems.append(f"{label}: missing from the output")
                continue
            try:
                expected = parse_transform(piece["transform"]).apply([source.read(item) for item in piece["sources"]])
            except SourceError as error:  # the recorded source tensor is absent or unreadable
                problems.append(f"{label}: {error}")
                continue
            except (RuntimeError, IndexError) as error:  # torch: the source tensor no longer fits the transform
                problems.append(f"{label}: cannot apply {piece['transform']} to the source: {first_line(error)}")
                continue
            actual = tensors[name] if rows is None else tensors[name][rows[0] : rows[1]]
            if not torch.equal(expected.to(actual.dtype), actual):
                mismatched.append(label)
    failed = len(mismatched) + len(problems)
    return CheckResult(
        name="transfers exact",
        status="fail" if failed else "pass",
        value=f"{checked - failed}/{checked} equal",
        bound="bit-for-bit",
        details={"mismatched": mismatched[:20], "problems": problems[:20]},
    )


def _skipped(name: str, bound: str, reason: str | None) -> CheckResult:
    """A check that cannot run, with why, in the value column and in the JSON details."""
    return CheckResult(name, "skip", reason or "", bound, {"reason": reason})


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
    model: XatlForCausalLM, input_ids: torch.Tensor, reference: torch.nn.Module | None, no_source: str | None = None
) -> CheckResult:
    """(e) With every layer kept as attention, the logits equal the source model's (transformers' own class)."""
    name, bound = "all-attention logits = source", f"max abs diff ≤ {LOGITS_TOLERANCE:g}"
    if any(kind != "attention" for kind in model.config.layer_types):
        return CheckResult(name, "skip", "LCI layers present", bound)
    if reference is None:
        return _skipped(name, bound, no_source or "no source given")
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
        tokenizer = _load_tokenizer(folder)
        text = resources.files("xatl_convert.verify").joinpath("sample.txt").read_text()
        ids = tokenizer(text, return_tensors="pt").input_ids[:, :length]
        if ids.shape[1] >= 2 and int(ids.max()) < config.vocab_size:
            return ids
    generator = torch.Generator().manual_seed(0)
    return torch.randint(0, config.vocab_size, (1, length), generator=generator)


def _loss(model: torch.nn.Module, input_ids: torch.Tensor) -> float:
    with torch.no_grad():
        return float(model(input_ids, labels=input_ids).loss)


def _load_tokenizer(folder: Path) -> Any:
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(folder)
    except Exception as error:  # the tokenizers library raises a bare Exception on a malformed file
        raise OutputError(
            f"{folder}: the tokenizer files cannot be loaded ({first_line(error)}); convert again, or remove them "
            "to verify on fixed random token ids"
        ) from None


def _load_converted(folder: Path) -> XatlForCausalLM:
    from transformers import AutoModelForCausalLM

    try:
        return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    except (OSError, ValueError, RuntimeError) as error:  # a last resort: config and weights were checked before
        raise OutputError(f"{folder}: transformers cannot load the converted model ({first_line(error)})") from None


def _load_source_model(path: Path) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM

    try:
        return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, trust_remote_code=False).eval()
    except (OSError, ValueError, RuntimeError) as error:
        raise SourceError(
            f"{path}: transformers cannot load the source model ({first_line(error)}); pass another --source"
        ) from None


def _choose_source(manifest: dict[str, Any], given: str | Path | None) -> tuple[str | Path | None, str | None]:
    """The source to compare against and, when there is none, why (the reason each skipped check shows)."""
    if given is not None:
        return given, None
    recorded = manifest["source"]
    if Path(recorded["path"]).is_dir():
        return recorded["path"], None
    hint = f"pass --source {recorded['reference']}" if recorded["reference"] != recorded["path"] else "pass --source"
    return None, f"source not found: {recorded['path']} (recorded in the manifest); {hint}"


def _open_source(source: str | Path, recorded: bool) -> SourceCheckpoint:
    """Open the source; the error says whether the path came from --source or from the manifest."""
    try:
        return resolve_source(source)
    except SourceError as error:
        if not recorded:
            raise SourceError(f"--source {error}") from None
        raise SourceError(f"{error} (the source path recorded in the manifest); pass --source") from None


def read_output_config(folder: Path) -> XatlConfig:
    """The folder's config.json as an XatlConfig; missing, not JSON, or not an xatl config is one clear line."""
    path = folder / "config.json"
    data = read_json(path, OutputError, "convert again", expect_object=True)
    if data.get("model_type") != XatlConfig.model_type:
        raise OutputError(f"{path}: model_type is {data.get('model_type')!r}, expected 'xatl'; convert again")
    try:
        return XatlConfig.from_dict(data)
    except (ValueError, TypeError, KeyError, StrictDataclassError) as error:
        raise OutputError(f"{path}: not a valid xatl config ({first_line(error)}); convert again") from None


def _check_config_fits_weights(folder: Path, config: XatlConfig, tensors: dict[str, torch.Tensor]) -> None:
    """A config that does not fit the weights makes transformers print a long load report and raise; say it once."""
    path = folder / "config.json"
    try:
        with torch.device("meta"):  # shapes only: no memory, no initialisation
            expected = {name: tuple(value.shape) for name, value in XatlForCausalLM(config).state_dict().items()}
    except (ValueError, RuntimeError) as error:
        raise OutputError(f"{path}: not a valid xatl config ({first_line(error)}); convert again") from None
    for name, tensor in tensors.items():
        if name in expected and tuple(tensor.shape) != expected[name]:
            raise OutputError(
                f"{path}: does not fit the weights: {name!r} is {list(tensor.shape)} in the safetensors, "
                f"the config needs {list(expected[name])}; convert again"
            )


def _open_output_tensors(folder: Path, stack: ExitStack) -> dict[str, torch.Tensor]:
    tensors: dict[str, torch.Tensor] = {}
    for file in _weight_files(folder):
        try:
            handle = stack.enter_context(safe_open(file, framework="pt"))
            for name in handle.keys():  # noqa: SIM118  (safe_open is not a mapping)
                tensors[name] = handle.get_tensor(name)
        except (SafetensorError, OSError) as error:
            raise OutputError(
                f"{file}: not a readable safetensors file ({first_line(error)}); it is truncated or damaged: "
                "convert again"
            ) from None
    return tensors


def _weight_files(folder: Path) -> list[Path]:
    """The safetensors files to read; the file (or the shards its index names) that a conversion writes must exist."""
    index = folder / "model.safetensors.index.json"
    expected = [folder / "model.safetensors"]
    if index.exists():
        expected = [folder / name for name in _index_shards(index)]
    for file in expected:
        if not file.exists() and not file.is_symlink():
            raise OutputError(f"{file}: missing; the converted folder has lost its weights: convert again")
    return sorted(set(expected) | set(folder.glob("*.safetensors")))


def _index_shards(index: Path) -> list[str]:
    try:
        weight_map = json.loads(index.read_bytes().decode("utf-8"))["weight_map"]
        return sorted({str(name) for name in weight_map.values()})
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError, AttributeError) as error:
        raise OutputError(f"{index}: not a valid shard index ({first_line(error)}); convert again") from None
