"""The checks of `xatl verify`: tensors as planned, transfers exact, forward sane, losses, exactness vs the source.

Each check returns a CheckResult; `verify()` runs them in order and collects the report.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
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
from xatl_convert.regular_files import require_regular_file
from xatl_convert.sources import SourceCheckpoint, resolve_source
from xatl_convert.sources.checkpoint import open_checkpoint
from xatl_convert.sources.transformers_config import check_field_types
from xatl_convert.verify.audit import TensorAudit
from xatl_convert.verify.kernel_sites import SITE_TOKENS
from xatl_convert.verify.passes import ConvertedPass, Progress, Run, next_token_loss, uniform_loss
from xatl_convert.verify.report import CheckResult, VerifyReport
from xatl_convert.verify.streaming import return_freed_blocks_to_the_os
from xatl_convert.verify.twin import run_twin

SAMPLE_TOKENS = 256  # a conversion's verify: several passes per block, decoding included
EXPORT_SAMPLE_TOKENS = 1024  # an export's: two plain passes, at the length its rounding bound was measured at
PRECISIONS = {"float32": torch.float32, "float64": torch.float64}


def verify(
    output: str | Path,
    source: str | Path | None = None,
    seed: int = 0,
    device: str = "auto",
    layers: int | None = None,
    text: str | Path | None = None,
    max_tokens: int | None = None,
    precision: str = "float32",
    progress: Progress | None = None,
) -> VerifyReport:
    """Run every check that applies to a converted folder (and its source, when given or recorded).

    Streamed: no model is ever held whole (see `streaming`). device: "cpu", "cuda", or "auto" (CUDA when
    available). Each LCI mixer type's kernel call path is checked against its reference path: on the real kernels
    where they serve the device, else on their stand-ins. layers: check only the first N blocks (quick CI); the
    checks that need the logits of the whole model are then skipped. text: a UTF-8 file to score instead of the
    built-in sample (its first `max_tokens` tokens: by default 256 for a converted folder, 1024 for an export).
    precision: "float32" (the default, whatever the checkpoint's dtype) or "float64", which separates a logic error
    from rounding. progress(pass, block, blocks) is called as each pass starts each block.
    """
    output = Path(output)
    from xatl_convert.export.verify import is_export, verify_export

    dtype = _precision(precision)
    return_freed_blocks_to_the_os()
    if is_export(output):  # written by xatl export: checked against the xatl folder it came from
        return verify_export(output, text, max_tokens, dtype, progress)
    target = resolve_device(device)
    max_tokens = SAMPLE_TOKENS if max_tokens is None else max_tokens
    # everything a user can get wrong is read and validated here, before any model is built
    manifest = read_manifest(output)
    config = read_output_config(output)
    layers = _layer_limit(layers, config.num_hidden_layers)
    recorded = source is None
    source, no_source = _choose_source(manifest, source)
    report = VerifyReport(output=str(output), source=str(source) if source is not None else None)
    with ExitStack() as stack:
        tensors = stack.enter_context(open_output_tensors(output))
        _check_config_fits_weights(output, config, tensors)
        checkpoint = stack.enter_context(_open_source(source, recorded)) if source is not None else None
        input_ids = sample_input_ids(output, config, text, max_tokens).to(target)
        report.sample = {"tokens": int(input_ids.shape[1]), "text": str(text) if text is not None else "built-in"}
        trained = _trained_after_conversion(manifest)
        audit = TensorAudit(manifest, tensors, checkpoint if trained is None else None)  # (a), (b) as it streams
        run = Run(config, input_ids, dtype, target, layers, progress)
        missing = [name for name in manifest["tensors"] if name not in tensors.tensors]
        converted = run.converted(audit) if not missing else None
        audit.finish()
        report.checks.append(audit.planned_result())
        if checkpoint is not None and trained is None:
            report.checks.append(audit.exact_result())
        else:  # listed all the same: a check left out would read as one that passed
            report.checks.append(_skipped("transfers exact", "bit-for-bit", trained or no_source))
        cannot_run = f"the output lacks {len(missing)} planned tensor(s), e.g. {missing[0]}" if missing else None
        logits = converted.logits if converted is not None else None
        report.checks.append(check_logits_finite(logits, run, cannot_run))
        scratch_loss = run.scratch_loss(seed) if logits is not None else None
        twin = run_twin(run, manifest, checkpoint, no_source or "no source given", logits)
        report.checks.append(check_loss_against_scratch(logits, scratch_loss, twin.source_logits, run, cannot_run))
        report.checks.append(twin.result)
        errors = converted.decode_errors if converted is not None else []
        report.checks.append(check_incremental_decoding(errors, run, cannot_run))
        report.checks.extend(check_kernels_against_reference(run, converted, cannot_run))
    return report


def _trained_after_conversion(manifest: dict[str, Any]) -> str | None:
    """Why transferred tensors may differ from the source now: `xatl distill` trained them (the twin, which is
    planned from the source, still checks the mapping)."""
    record = manifest.get("distillation")
    if not isinstance(record, dict):
        return None
    stages = [stage.get("stage") for stage in record.get("stages", []) if isinstance(stage, dict)]
    return f"trained after conversion by xatl distill ({', '.join(map(str, stages)) or 'no stages'})"


def resolve_device(device: str) -> torch.device:
    """'auto' → CUDA when available, else CPU; 'cuda' without a GPU is a clear error."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device not in ("cpu", "cuda"):
        raise XatlError(f"--device {device!r}: expected auto, cpu or cuda")
    if device == "cuda" and not torch.cuda.is_available():
        raise XatlError("--device cuda: no CUDA device is available (torch.cuda.is_available() is False)")
    return torch.device(device)


def _precision(precision: str) -> torch.dtype:
    if precision not in PRECISIONS:
        raise XatlError(f"--precision {precision!r}: expected {' or '.join(PRECISIONS)}")
    return PRECISIONS[precision]


def _layer_limit(layers: int | None, total: int) -> int | None:
    """--layers N: None (all) when N covers the model; an error when N is not a count of blocks."""
    if layers is None:
        return None
    if layers < 1:
        raise XatlError(f"--layers {layers}: expected a number of blocks from 1 to {total}")
    return layers if layers < total else None


def _skipped(name: str, bound: str, reason: str | None) -> CheckResult:
    """A check that cannot run, with why, in the value column and in the JSON details."""
    return CheckResult(name, "skip", reason or "", bound, {"reason": reason})


def check_logits_finite(logits: torch.Tensor | None, run: Run, cannot_run: str | None = None) -> CheckResult:
    """(c) The converted model's forward pass over the sample gives finite logits."""
    name, bound = "logits finite", "all finite"
    if logits is None:
        return _skipped(name, bound, cannot_run or _partial(run))
    finite = bool(torch.isfinite(logits).all())
    return CheckResult(
        name=name,
        status="pass" if finite else "fail",
        value=f"{tuple(logits.shape)}, max |logit| {logits.abs().max().item():.3g}",
        bound=bound,
    )


def _partial(run: Run) -> str:
    return f"--layers {run.layers}: the first {run.layers} of {run.config.num_hidden_layers} blocks only"


def check_loss_against_scratch(
    logits: torch.Tensor | None,
    scratch_loss: float | None,
    source_logits: torch.Tensor | None,
    run: Run,
    cannot_run: str | None = None,
) -> CheckResult:
    """(d) Sample loss of the converted model beside a from-scratch model of the same config (and the source)."""
    name, bound = "sample losses finite", "each finite; the losses are reported, not compared"
    if logits is None or scratch_loss is None:
        return _skipped(name, bound, cannot_run or _partial(run))
    losses = {"converted": next_token_loss(logits, run.input_ids), "from_scratch": scratch_loss}
    if source_logits is not None:
        losses["source"] = next_token_loss(source_logits, run.input_ids)
    finite = all(math.isfinite(value) for value in losses.values())
    value = ", ".join(f"{key} {loss:.3f}" for key, loss in losses.items())
    return CheckResult(
        name=name,
        status="pass" if finite else "fail",
        value=value,
        bound=bound,
        details={"losses": losses, "uniform": uniform_loss(run.config), "tokens": int(run.input_ids.shape[1])},
    )


def check_incremental_decoding(errors: list[float], run: Run, cannot_run: str | None = None) -> CheckResult:
    """(f) In every block: prefill, a cached chunk, then one token at a time equal one full pass (per mixer)."""
    limit = run.bounds.decode
    bound = f"per layer, relative ≤ {limit:g}"
    details: dict[str, Any] = {"per_layer": errors, "layer_types": run.config.layer_types[: len(errors)]}
    if not errors:
        return _skipped("incremental decoding = full forward", bound, cannot_run or "no blocks run")
    failing = next((i for i, error in enumerate(errors) if not error <= limit), None)
    worst = max(range(len(errors)), key=lambda i: errors[i])
    details["worst"] = {"where": f"layer {worst}", "error": errors[worst]}
    if failing is not None:
        details["first_divergence"] = {"where": f"layer {failing}", "error": errors[failing]}
        kind = run.config.layer_types[failing]
        value = f"diverges at layer {failing} ({kind}): {errors[failing]:.2e}"
    else:
        value = f"worst layer {worst}: {errors[worst]:.1e}"
    return CheckResult(
        "incremental decoding = full forward", "fail" if failing is not None else "pass", value, bound, details
    )


def check_kernels_against_reference(
    run: Run, converted: ConvertedPass | None, cannot_run: str | None = None
) -> list[CheckResult]:
    """(g) Each LCI mixer type's kernel call path against its reference path, on the first layer of that type and
    its real input from the sample (see `kernel_sites`): every call site (prefill, cached prefill, continuation,
    steps, padding) in fp32 and bf16. On CUDA with mamba-ssm / causal-conv1d (or Hub kernels) the real kernels
    run; elsewhere their signature-identical stand-ins do, and the row says which."""
    from xatl_convert.verify.kernel_sites import scenarios, used_kernels

    config = run.config
    used = used_kernels(run.device)
    bound = "fp32 ≤ 1e-3, bf16 ≤ 2e-2"
    results = []
    for kind in sorted(set(config.layer_types) - {"attention"}):
        name = f"{kind} kernel call sites = reference"
        if converted is None or kind not in converted.call_sites:
            first = config.layer_types.index(kind)
            reason = cannot_run or f"the first {kind} layer ({first}) is beyond --layers {run.checked_layers}"
            results.append(_skipped(name, bound, reason))
            continue
        index, comparisons = converted.call_sites[kind]
        if isinstance(comparisons, str):  # outside the kernels' limits: the mixers always take the reference path
            results.append(_skipped(name, bound, f"{comparisons}; layer {index}'s mixers run the reference path"))
            continue
        worst = max(comparisons, key=lambda c: (not c.passed, c.error / c.bound))
        dtype = str(worst.dtype).removeprefix("torch.")
        if worst.refused is not None:
            value = f"{worst.scenario} ({dtype}) refused: {worst.refused}"
        else:
            value = f"worst {worst.scenario} ({dtype}): {worst.error:.1e}"
        tokens = SITE_TOKENS
        details = {
            "kernels": used,
            "layer": index,
            "input": f"layer {index}'s normed input on the sample, repeated to {tokens} tokens, batch of 2",
            "scenarios": {scenario: segments for scenario, (segments, _, _) in scenarios(tokens).items()},
            "comparisons": [
                {
                    "scenario": c.scenario,
                    "dtype": str(c.dtype).removeprefix("torch."),
                    "relative_error": c.error,
                    "bound": c.bound,
                    "refused": c.refused,
                    "kernel_ms": c.kernel_ms,
                    "reference_ms": c.reference_ms,
                }
                for c in comparisons
            ],
        }
        status = "pass" if all(c.passed for c in comparisons) else "fail"
        results.append(CheckResult(name, status, f"{value} over {len(comparisons)} runs; {used}", bound, details))
    return results


def sample_input_ids(
    folder: Path, config: XatlConfig, text: str | Path | None = None, max_tokens: int = SAMPLE_TOKENS
) -> torch.Tensor:
    """The text to score through the folder's tokenizer: the user's `text` file, else the shipped sample; fixed
    random ids when there is no tokenizer (and no text file). At most `max_tokens` tokens."""
    if max_tokens < 2:
        raise XatlError(f"--max-tokens {max_tokens}: expected at least 2 (one token to predict the next)")
    length = min(max_tokens, config.max_position_embeddings)
    has_tokenizer = (folder / "tokenizer.json").is_file() or (folder / "tokenizer_config.json").is_file()
    if text is not None:
        require_regular_file(text, XatlError, "give a UTF-8 text file", name=f"--text {text}")
        if not has_tokenizer:
            raise OutputError(f"{folder}: has no tokenizer to read --text {text} with; convert again")
        ids = load_output_tokenizer(folder)(_read_text(Path(text)), return_tensors="pt").input_ids[:, :length]
        if ids.shape[1] < 2:
            raise XatlError(f"--text {text}: {ids.shape[1]} token(s); at least 2 are needed to score a text")
        if int(ids.max()) >= config.vocab_size:
            raise OutputError(f"{folder}: the tokenizer gives ids beyond vocab_size {config.vocab_size}")
        return ids
    if has_tokenizer:
        tokenizer = load_output_tokenizer(folder)
        sample = resources.files("xatl_convert.verify").joinpath("sample.txt").read_text()
        ids = tokenizer(sample, return_tensors="pt").input_ids[:, :length]
        if ids.shape[1] >= 2 and int(ids.max()) < config.vocab_size:
            return ids
    generator = torch.Generator().manual_seed(0)
    return torch.randint(0, config.vocab_size, (1, length), generator=generator)


def _read_text(path: Path) -> str:
    try:
        return path.read_bytes().decode("utf-8")
    except OSError as error:
        raise XatlError(f"--text {path}: cannot read it ({error.strerror or error})") from None
    except UnicodeDecodeError as error:
        raise XatlError(f"--text {path}: not UTF-8 text (byte {error.start})") from None


def load_output_tokenizer(folder: Path) -> Any:
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(folder)
    except Exception as error:  # the tokenizers library raises a bare Exception on a malformed file
        raise OutputError(
            f"{folder}: the tokenizer files cannot be loaded ({first_line(error)}); convert again, or remove them "
            "to verify on fixed random token ids"
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
    check_field_types(XatlConfig, data, path, OutputError, "convert again")  # transformers' own fields
    try:
        return XatlConfig.from_dict(data)
    except (ValueError, TypeError, KeyError, StrictDataclassError) as error:
        raise OutputError(f"{path}: not a valid xatl config ({first_line(error)}); convert again") from None


def _check_config_fits_weights(folder: Path, config: XatlConfig, tensors: SourceCheckpoint) -> None:
    """A config that does not fit the weights makes transformers print a long load report and raise; say it once."""
    path = folder / "config.json"
    try:
        with torch.device("meta"):  # shapes only: no memory, no initialisation
            expected = {name: tuple(value.shape) for name, value in XatlForCausalLM(config).state_dict().items()}
    except (ValueError, RuntimeError) as error:
        raise OutputError(f"{path}: not a valid xatl config ({first_line(error)}); convert again") from None
    for name, tensor in tensors.tensors.items():
        if name in expected and tuple(tensor.shape) != expected[name]:
            raise OutputError(
                f"{path}: does not fit the weights: {name!r} is {list(tensor.shape)} in the safetensors, "
                f"the config needs {list(expected[name])}; convert again"
            )


@contextmanager
def open_output_tensors(folder: Path) -> Iterator[SourceCheckpoint]:
    """The converted folder's tensors, read one at a time (never the whole model); damage is one clear line."""
    for file in _weight_files(folder):
        try:
            with safe_open(file, framework="pt") as handle:  # parses and checks the header; reads no tensor
                handle.keys()
        except (SafetensorError, OSError) as error:
            raise OutputError(
                f"{file}: not a readable safetensors file ({first_line(error)}); it is truncated or damaged: "
                "convert again"
            ) from None
    try:
        checkpoint = open_checkpoint(folder)
    except SourceError as error:
        raise OutputError(f"{error}; convert again") from None
    with checkpoint:
        yield checkpoint


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
