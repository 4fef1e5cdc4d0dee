"""The bound of `xatl verify` on an export, from measured rounding: SmolLM2-135M (30 layers, bf16; built by
benchmarks/real_model.py) converted to the paper hybrid (attention at layers 1 and 14) and to pure Mamba2, exported
to granitemoehybrid and bamba, each verified in float32 and float64 at 190 tokens (the worst length measured in
float32) and at 1024 and 1395 tokens (the whole built-in sample). Prints, per export, precision and length, the
measured relative error of the export's logits against the xatl model's, the bound (`Bounds.export` in
xatl_convert/verify/passes.py) and their ratio; then injects real export bugs into the hybrid's export (in its
config or its tensors, as a wrong exporter would write them) and prints what the same check measures: each fails.

    python -m benchmarks.export_verify_bound                      # about 25 minutes on 2 CPU cores
    python -m benchmarks.export_verify_bound --lengths 100,300,500,700,900 --precisions float32 --no-bugs
"""

from __future__ import annotations

import argparse
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
from xatl_convert.verify.export_logits import check_name
from xatl_convert.verify.passes import BOUNDS
from xatl_convert.verify.report import CheckResult

FOLDER = WORK / "export-verify"
CONVERSIONS = {"hybrid": "paper", "mamba2": "none"}  # name → --attn-layers
EXPORTS = [("hybrid", "granitemoehybrid"), ("mamba2", "granitemoehybrid"), ("mamba2", "bamba")]
SAMPLE_TOKENS = 1395  # the whole built-in sample through SmolLM2's tokenizer


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--lengths", default=f"190,1024,{SAMPLE_TOKENS}", help="token counts, comma-separated")
    parser.add_argument("--precisions", default="float32,float64")
    parser.add_argument("--no-bugs", action="store_true", help="measure the rounding only")
    args = parser.parse_args()
    lengths = [int(length) for length in args.lengths.split(",")]
    exports = prepare()
    print(f"{'export':28} {'precision':9} {'tokens':>6} {'measured':>9} {'bound':>8} {'ratio':>6}  status  seconds")
    for name, folder in exports.items():
        for precision in args.precisions.split(","):
            for tokens in lengths:
                started = time.monotonic()
                result = logits_check(folder, tokens, precision)
                details = result.details
                print(f"{name:28} {precision:9} {details['tokens']:>6} {details['relative_error']:>9.2e} "
                      f"{details['bound']:>8.1e} {details['ratio']:>6.3f}  {result.status:6}  "
                      f"{time.monotonic() - started:.0f}", flush=True)  # fmt: skip
    if args.no_bugs:
        return
    clean = exports["hybrid → granitemoehybrid"]
    print(f"\ninjected bugs in {clean.name}, float32, 1024 tokens (bound {BOUNDS[torch.float32].export:.1e}):")
    for label, inject in BUGS.items():
        broken = FOLDER / "bug"
        shutil.rmtree(broken, ignore_errors=True)
        shutil.copytree(clean, broken)
        inject(broken)
        result = logits_check(broken, 1024, "float32")
        details = result.details
        print(f"  {label:44} {result.status:5} measured {details['relative_error']:.2e}  "
              f"x{details['ratio']:.0f} the bound; {result.value}", flush=True)  # fmt: skip
        shutil.rmtree(broken)


def prepare() -> dict[str, Path]:
    """The conversions and their exports, made once into benchmarks/.work/smol/export-verify."""
    source = build()
    exports = {}
    for conversion, format in EXPORTS:
        xatl = FOLDER / conversion
        if not (xatl / "config.json").is_file():
            convert(source, xatl, to="mamba2", attn_layers=CONVERSIONS[conversion], force=True)
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


BUGS: dict[str, Callable[[Path], None]] = {
    "RoPE theta 1e4 instead of 1e5 (config)": _edit_config(
        "rope_parameters", lambda config: {**config["rope_parameters"], "rope_theta": 10000.0}
    ),
    "norm eps 1e-6 instead of 1e-5 (config)": _edit_config("rms_norm_eps", lambda config: 1e-6),
    "layer 0 Mamba2 D skip missing (tensor)": _edit_tensor("model.layers.0.mamba.D", torch.zeros_like),
    "layer 0 conv taps reversed in time (tensor)": _edit_tensor(
        "model.layers.0.mamba.conv1d.weight", lambda weight: weight.flip(-1)
    ),
}


if __name__ == "__main__":
    main()
