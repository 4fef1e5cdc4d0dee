"""The export formats by name, with what loads each, for the CLI's help: this module imports nothing, so `--help`
stays fast (the formats themselves, `xatl_convert.export.FORMATS`, import torch). tests/test_newcomer.py checks that
the names are FORMATS' keys, in order."""

from __future__ import annotations

EXPORT_FORMATS: dict[str, str] = {
    "granitemoehybrid": "transformers, vLLM",
    "bamba": "transformers, vLLM",
    "mamba-ssm": "mamba-ssm, CUDA",
    "gguf": "llama.cpp, Ollama, LM Studio",
    "qwen3_next": "transformers",
}


def export_formats_help() -> str:
    """`granitemoehybrid (transformers, vLLM), bamba (transformers, vLLM) or mamba-ssm (mamba-ssm, CUDA)`."""
    named = [f"{name} ({loads_with})" for name, loads_with in EXPORT_FORMATS.items()]
    return ", ".join(named[:-1]) + " or " + named[-1] if len(named) > 1 else "".join(named)
