"""`xatl verify` on a gguf export: the .gguf against the xatl folder it came from, and, where llama-cpp-python imports,
llama.cpp's own logits against the xatl model's.

- "tensors as exported": every tensor of the file equals the xatl tensor mapped to llama.cpp's layout and rounded
  to the tensor's type by gguf-py (the writer's own rounding): bit for bit, F32 included; no tensor missing or extra.
  Q8_0 values are also checked against Q8_0's bound (half a block's step, plus the step's float16 rounding).
- "keys as exported": the architecture, layer layout, sizes, eps, RoPE, ssm and tokenizer keys equal what the xatl
  folder gives.
- "logits = xatl model (llama.cpp)": llama.cpp runs the file (with an F32 KV cache: its default F16 cache is a
  run-time choice that rounds keys and values) against the xatl model's float32 logits. Bounded in F32 only: with
  F16, BF16 or Q8_0 matrices llama.cpp also rounds each matmul's input to that type, and how far that moves the
  logits is a property of the model (an undistilled conversion moves a lot), so the figure is reported and the check
  is skipped; the reference then has the file's rounded weights. Skipped, with the reason, where `llama_cpp` does not
  import (CI; benchmarks/gguf_llama_cpp.py builds it).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from xatl_convert.errors import OutputError
from xatl_convert.export import gguf as layout
from xatl_convert.export.gguf_file import converted, dequantized, mapped_values, read_gguf
from xatl_convert.export.verify import tensors_as_exported
from xatl_convert.verify.report import CheckResult, VerifyReport

LOGIT_BOUND = 1e-3  # relative (max |difference| / max |logit|), llama.cpp's fp32 CPU kernels against torch's
_PROVENANCE = ("general.name", "xatl.")  # says where the file came from; not a function of the folder


def verify_gguf_export(
    folder: Path, origin: Path, record: dict[str, Any], text: str | Path | None = None, max_tokens: int = 256
) -> VerifyReport:
    """The three checks above, for the export at `folder` made from the xatl folder `origin`."""
    from xatl_convert.export.writer import xatl_weights
    from xatl_convert.verify.checks import read_output_config, sample_input_ids

    chosen = record.get("gguf_type")
    if chosen not in ("F32", "F16", "BF16", "Q8_0"):
        raise OutputError(f"{folder}: its export record has gguf_type {chosen!r}, not F32, F16, BF16 or Q8_0; "
                          "export again")  # fmt: skip
    path = folder / layout.FILE_NAME
    if not path.is_file():
        raise OutputError(f"{path}: missing; export again")
    config_object = read_output_config(origin)
    config = config_object.to_dict()
    reader = read_gguf(path)
    report = VerifyReport(output=str(folder), source=str(origin))
    with xatl_weights(origin) as weights:
        report.checks.append(_tensors_check(reader, weights, config, chosen))
    report.checks.append(_keys_check(reader, origin, config, chosen))
    ids = sample_input_ids(origin, config_object, text, max_tokens)
    report.sample = {"tokens": int(ids.shape[1]), "text": str(text) if text is not None else "built-in"}
    report.checks.append(logits_check(path, origin, config, chosen, ids))
    return report


def _tensors_check(reader: Any, weights: Any, config: dict[str, Any], chosen: str) -> CheckResult:
    stored = {tensor.name: tensor for tensor in reader.tensors}
    differ: list[str] = []
    expected: set[str] = set()
    worst = 0.0
    for name, value in mapped_values(weights, config):
        expected.add(name)
        tensor = stored.get(name)
        kind = layout.tensor_type(name, tuple(value.shape), chosen)
        if tensor is None or tensor.tensor_type.name != kind:
            differ.append(name)
            continue
        if np.asarray(tensor.data).tobytes() != converted(value, kind).tobytes():
            differ.append(name)
        elif kind == "Q8_0":
            worst = max(worst, q8_0_error_over_bound(dequantized(tensor), value))
    details: dict[str, Any] = {"type": chosen}
    if chosen == "Q8_0":
        details["q8_0_max_error_over_bound"] = worst
    bound = f"bit-for-bit, the xatl tensors rounded to {chosen}"
    return tensors_as_exported(expected, differ, stored, bound, details, within_bound=worst <= 1)


def q8_0_error_over_bound(stored: torch.Tensor, value: torch.Tensor) -> float:
    """The largest |stored − value| as a share of Q8_0's bound for its block: half a step (d = max |block| / 127,
    round to nearest) plus 127 × the float16 rounding of d, which the file stores. ≤ 1 when within the bound."""
    rows = value.detach().float().reshape(-1, layout.Q8_0_BLOCK)
    step = rows.abs().amax(dim=1, keepdim=True) / 127
    # tight: x = 126.5 d in a block whose stored d rounded up reaches it; + the float32 rounding of x / d and d × q
    bound = 0.5 * step + 127 * (step - step.half().float()).abs() + 1e-4 * step
    error = (stored.reshape(-1, layout.Q8_0_BLOCK) - rows).abs()
    return float((error / bound.clamp_min(torch.finfo(torch.float32).tiny)).max()) if rows.numel() else 0.0


def _keys_check(reader: Any, origin: Path, config: dict[str, Any], chosen: str) -> CheckResult:
    """Every key the writer would write for this folder, as read back from the file."""
    import gguf

    from xatl_convert.export.gguf_file import expected_keys

    expected = expected_keys(origin, config, chosen)
    differ = []
    for key, value in expected.items():
        field = reader.fields.get(key)
        if field is None or not _same_value(field.contents(), value):
            differ.append(key)
    architecture = reader.fields.get(gguf.Keys.General.ARCHITECTURE)
    if architecture is None or architecture.contents() != layout.ARCHITECTURE:
        differ.append(gguf.Keys.General.ARCHITECTURE)
    status = "pass" if not differ else "fail"
    return CheckResult("keys as exported", status, f"{len(expected) - len(differ)}/{len(expected)} equal",
                       "the values the xatl folder gives", {"differ": differ[:20]})  # fmt: skip


def _same_value(found: Any, expected: Any) -> bool:
    """Equal as the file stores them (floats as float32, lists item by item)."""
    if isinstance(expected, (list, tuple)):
        return isinstance(found, list) and len(found) == len(expected) and all(map(_same_value, found, expected))
    if isinstance(expected, float):
        return np.float32(found) == np.float32(expected)
    return found == expected


def logits_check(path: Path, origin: Path, config: dict[str, Any], chosen: str, ids: torch.Tensor) -> CheckResult:
    """llama.cpp's logits on `ids` against the xatl model with the file's rounding, or a skip saying why."""
    from xatl_convert.verify.streaming import relative_error

    name = "logits = xatl model (llama.cpp)"
    try:
        import llama_cpp  # noqa: F401
    except ImportError:
        return CheckResult(name, "skip", "llama_cpp does not import here",
                           "benchmarks/gguf_llama_cpp.py builds llama-cpp-python and runs it")  # fmt: skip
    reference = rounded_xatl_logits(origin, config, chosen, ids)
    theirs = torch.from_numpy(llama_cpp_logits(path, ids[0].tolist()))
    error = relative_error(theirs, reference[0])
    agreement = float((theirs.argmax(-1) == reference[0].argmax(-1)).float().mean())
    details = {"relative_error": error, "argmax_agreement": agreement, "type": chosen}
    if chosen != "F32":
        bound = f"F32 only (llama.cpp rounds {chosen} matmul inputs; check with --gguf-type f32)"
        return CheckResult(name, "skip", f"{error:.1e}", bound, details)
    status = "pass" if error <= LOGIT_BOUND else "fail"
    return CheckResult(name, status, f"{error:.1e}", f"relative ≤ {LOGIT_BOUND:g}", details)


def rounded_xatl_logits(origin: Path, config: dict[str, Any], chosen: str, ids: torch.Tensor) -> torch.Tensor:
    """The xatl model's float32 logits with every weight rounded as the .gguf holds it (`rounded_like_gguf`)."""
    model = rounded_xatl_model(origin, config, chosen)
    with torch.no_grad():
        return model(ids, use_cache=False).logits.float()


def rounded_xatl_model(origin: Path, config: dict[str, Any], chosen: str) -> torch.nn.Module:
    """The xatl model in float32, each parameter replaced by its value as the .gguf stores it (`rounded_like_gguf`)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(origin, dtype=torch.float32, trust_remote_code=True).eval()
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            parameter.copy_(rounded_like_gguf(name, parameter, config, chosen))
    return model


def rounded_like_gguf(name: str, value: torch.Tensor, config: dict[str, Any], chosen: str) -> torch.Tensor:
    """One xatl tensor rounded in its own layout exactly as the .gguf rounds its mapped copy.

    The mapping only reorders whole rows, splits them, or appends zeros (rows, or columns at the end of a row), and
    F16/BF16 round each value alone. Q8_0 rounds blocks of 32 along a row: a row padded with zeros to whole blocks
    rounds as the file's (zero columns appended by the mapping change no block's maximum).
    """
    import gguf

    gguf_name, mapped = layout.tensors(name, value.detach().to("meta"), config)[0]
    kind = layout.tensor_type(gguf_name, tuple(mapped.shape), chosen)
    if kind == "F32":
        return value
    data = value.detach().float()
    width = data.shape[-1]
    if kind == "Q8_0" and width % layout.Q8_0_BLOCK:
        data = torch.nn.functional.pad(data, (0, layout.Q8_0_BLOCK - width % layout.Q8_0_BLOCK))
    qtype = gguf.GGMLQuantizationType[kind]
    rounded = gguf.quants.dequantize(converted(data, kind), qtype)
    return torch.from_numpy(np.array(rounded, dtype=np.float32)).reshape(data.shape)[..., :width].to(value.dtype)


def llama_cpp_model(path: Path, context: int, f32_cache: bool = True, threads: int | None = None) -> Any:
    """A llama-cpp-python `Llama` on the file that keeps every position's logits; with `f32_cache`, its KV cache in
    F32 (llama.cpp's default is F16)."""
    import llama_cpp

    cache = {"type_k": llama_cpp.GGML_TYPE_F32, "type_v": llama_cpp.GGML_TYPE_F32} if f32_cache else {}
    return llama_cpp.Llama(model_path=str(path), n_ctx=context, n_batch=context, n_ubatch=context, logits_all=True,
                           n_threads=threads, verbose=False, **cache)  # fmt: skip


def llama_cpp_logits(path: Path, ids: list[int], threads: int | None = None) -> np.ndarray:
    """llama.cpp's logits (len(ids) × vocab, float32) for one sequence, all positions, F32 KV cache."""
    model = llama_cpp_model(path, max(len(ids), 16), threads=threads)
    try:
        model.eval(ids)
        return np.array(model.scores[: len(ids)], dtype=np.float32)
    finally:
        model.close()
