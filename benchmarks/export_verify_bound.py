"""The bound of `xatl verify` on an export, from measured rounding: SmolLM2-135M (30 layers, bf16; built by
benchmarks/real_model.py) converted to the paper hybrid (attention at layers 1 and 14) and to pure Mamba2, exported
to granitemoehybrid and bamba, and to pure Gated DeltaNet, exported to qwen3_next; each verified in float32 and
float64 at 190 tokens (the worst length measured in float32) and at 1024 and 1395 tokens (the whole built-in sample).
Prints, per export, precision and length, the measured relative error of the export's logits against the xatl
model's, the fixed bound (`Bounds.export` in xatl_convert/verify/passes.py) and their ratio, and where the fixed bound
is exceeded, the rounding floor verify then measures (the export's and the xatl model's float32 distance from the
float64 answer, and their ratio, against `ROUNDING_MARGIN`); then injects real export bugs into the hybrid's and the
Gated DeltaNet export (in config or tensors, as a wrong exporter would write them) and prints what the same check
measures: each fails, the fixed bound and the rounding floor both.

    python -m benchmarks.export_verify_bound                      # about 35 minutes on 2 CPU cores
    python -m benchmarks.export_verify_bound --exports gated_deltanet --lengths 100,190,1024 --precisions float32
    python -m benchmarks.export_verify_bound --exports gated_deltanet --floor-always --no-bugs  # the floor's margin
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import shutil
import time
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from benchmarks.real_model import WORK, build
from xatl_convert.conversion import convert
from xatl_convert.export import export_folder
from xatl_convert.verify import verify
from xatl_convert.verify.export_logits import ROUNDING_MARGIN, check_name
from xatl_convert.verify.passes import BOUNDS
from xatl_convert.verify.report import CheckResult

FOLDER = WORK / "export-verify"
CONVERSIONS = {
    "hybrid": ("mamba2", "paper"),
    "mamba2": ("mamba2", "none"),
    "gated_deltanet": ("gated_deltanet", "none"),
}
EXPORTS = [
    ("hybrid", "granitemoehybrid"),
    ("mamba2", "granitemoehybrid"),
    ("mamba2", "bamba"),
    ("gated_deltanet", "qwen3_next"),
]
SAMPLE_TOKENS = 1395  # the whole built-in sample through SmolLM2's tokenizer


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--lengths", default=f"190,1024,{SAMPLE_TOKENS}", help="token counts, comma-separated")
    parser.add_argument("--precisions", default="float32,float64")
    parser.add_argument("--no-bugs", action="store_true", help="measure the rounding only")
    parser.add_argument("--exports", default=",".join(CONVERSIONS), help="conversions to measure, comma-separated")
    parser.add_argument("--floor-always", action="store_true", help="measure the rounding floor on every row")
    args = parser.parse_args()
    if args.floor_always:  # a fixed bound nothing meets: verify measures the floor on every row
        for dtype, bounds in BOUNDS.items():
            BOUNDS[dtype] = dataclasses.replace(bounds, export=1e-12)
    lengths = [int(length) for length in args.lengths.split(",")]
    exports = prepare(args.exports.split(","))
    print(f"{'export':32} {'precision':9} {'tokens':>6} {'measured':>9} {'bound':>8} {'ratio':>6}  status  "
          f"{'floor: export':>13} {'xatl f32':>9} {'ratio':>6}  seconds")  # fmt: skip
    for name, folder in exports.items():
        for precision in args.precisions.split(","):
            for tokens in lengths:
                started = time.monotonic()
                result = logits_check(folder, tokens, precision)
                print(f"{name:32} {precision:9} {_row(result)}  {time.monotonic() - started:.0f}", flush=True)
    if args.no_bugs:
        return
    for name, bugs in BUGS.items():
        if name not in exports:
            continue
        print(f"\ninjected bugs in {exports[name].name}, float32, 1024 tokens (fixed bound "
              f"{BOUNDS[torch.float32].export:.1e}, rounding margin ×{ROUNDING_MARGIN:g}):")  # fmt: skip
        for label, inject in bugs.items():
            broken = FOLDER / "bug"
            shutil.rmtree(broken, ignore_errors=True)
            shutil.copytree(exports[name], broken)
            inject(broken)
            result = logits_check(broken, 1024, "float32")
            print(f"  {label:44} {_row(result)}", flush=True)
            shutil.rmtree(broken)


def _row(result: CheckResult) -> str:
    details = result.details
    floor = details.get("rounding_floor")
    measured = (f"{details['tokens']:>6} {details['relative_error']:>9.2e} {details['bound']:>8.1e} "
                f"{details['ratio']:>6.3f}  {result.status:6}")  # fmt: skip
    if floor is None:
        return measured + f" {'-':>13} {'-':>9} {'-':>6}"
    return (
        measured
        + f" {floor['export_vs_float64']:>13.2e} {floor['xatl_float32_vs_float64']:>9.2e} {floor['ratio']:>6.2f}"
    )


def prepare(conversions: list[str]) -> dict[str, Path]:
    """The conversions and their exports, made once into benchmarks/.work/smol/export-verify."""
    source = build()
    exports = {}
    for conversion, format in EXPORTS:
        if conversion not in conversions:
            continue
        xatl = FOLDER / conversion
        if not (xatl / "config.json").is_file():
            to, attn_layers = CONVERSIONS[conversion]
            convert(source, xatl, to=to, attn_layers=attn_layers, force=True)
        out = FOLDER / f"{conversion}-{format}"
        if not (out / "config.json").is_file():
            export_folder(xatl, out, format, force=True)
        exports[f"{conversion} → {format}"] = out
    return exports


def logits_check(folder: Path, tokens: int, precision: str) -> CheckResult:
    """What `xatl verify FOLDER --max-tokens N --precision P` says in its logits row."""
    report = verify(folder, max_tokens=tokens, precision=precision)
    format = json.loads((folder / "xatl_manifest.json").read_text())["export"]["format"]
    return report.check(check_name(format))


def _edit_config(key: str, value: Callable[[dict], object]) -> Callable[[Path], None]:
    def inject(folder: Path) -> None:
        config = json.loads((folder / "config.json").read_text())
        config[key] = value(config)
        (folder / "config.json").write_text(json.dumps(config, indent=2))

    return inject


def _edit_tensor(name: str, change: Callable[[torch.Tensor], torch.Tensor]) -> Callable[[Path], None]:
    def inject(folder: Path) -> None:
        path = folder / "model.safetensors"
        weights = load_file(path)
        weights[name] = change(weights[name]).contiguous()
        save_file(weights, path, metadata={"format": "pt"})

    return inject


BUGS: dict[str, dict[str, Callable[[Path], None]]] = {
    "hybrid → granitemoehybrid": {
        "RoPE theta 1e4 instead of 1e5 (config)": _edit_config(
            "rope_parameters", lambda config: {**config["rope_parameters"], "rope_theta": 10000.0}
        ),
        "norm eps 1e-6 instead of 1e-5 (config)": _edit_config("rms_norm_eps", lambda config: 1e-6),
        "layer 0 Mamba2 D skip missing (tensor)": _edit_tensor("model.layers.0.mamba.D", torch.zeros_like),
        "layer 0 conv taps reversed in time (tensor)": _edit_tensor(
            "model.layers.0.mamba.conv1d.weight", lambda weight: weight.flip(-1)
        ),
    },
    "gated_deltanet → qwen3_next": {
        "norm eps 1e-6 instead of 1e-5 (config)": _edit_config("rms_norm_eps", lambda config: 1e-6),
        "layer 0 input norm stored w, not w - 1 (tensor)": _edit_tensor(
            "model.layers.0.input_layernorm.weight", lambda weight: weight + 1
        ),
        "layer 0 decay A_log + 0.1 (tensor)": _edit_tensor("model.layers.0.linear_attn.A_log", lambda a: a + 0.1),
        "layer 0 dt_bias zeroed (tensor)": _edit_tensor("model.layers.0.linear_attn.dt_bias", torch.zeros_like),
        "layer 0 conv taps reversed in time (tensor)": _edit_tensor(
            "model.layers.0.linear_attn.conv1d.weight", lambda weight: weight.flip(-1)
        ),
    },
}


if __name__ == "__main__":
    main()
