"""Qwen-family conversions leave the xatl format (issue 23): the Mamba2 gated norm takes the source's eps (1e-6), a
setting of attention blocks an export only where attention layers remain, and a format's one attention bias flag
takes a zero o_proj bias where Qwen2 has none. A Qwen3 hybrid keeps its q/k norm, which neither format holds."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.bad_input import error_line, invoke
from tests.test_export import LLAMA, _logits
from tests.test_families import save_family
from xatl_convert.conversion import convert
from xatl_convert.models import XatlConfig, XatlForCausalLM

# Qwen2.5-0.5B's shape, scaled down: q/k/v biases and no o_proj bias, GQA 2:1, tied, eps 1e-6
QWEN2 = ("Qwen2ForCausalLM", "Qwen2Config", {
    "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 3, "num_attention_heads": 4,
    "num_key_value_heads": 2, "rms_norm_eps": 1e-6, "rope_theta": 1e6, "tie_word_embeddings": True})  # fmt: skip
IDS = torch.randint(0, 256, (2, 40), generator=torch.Generator().manual_seed(0))


def _relative_error(export: Path, xatl: Path) -> float:
    ours, theirs = _logits(xatl, IDS, True), _logits(export, IDS, False)
    return ((theirs - ours).norm() / ours.norm()).item()


@pytest.fixture(scope="module")
def qwen3(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A Qwen3 source (per-head q/k norms, a sliding window on its first layers, eps 1e-6)."""
    return save_family(tmp_path_factory.mktemp("qwen3") / "source", "qwen3")


def test_qwen2_hybrid_exports_to_granitemoehybrid_with_a_zero_o_proj_bias(tmp_path: Path) -> None:
    source = save_family(tmp_path / "source", "qwen2", QWEN2)
    convert(source, tmp_path / "xatl", to="mamba2", attn_layers="1")
    assert json.loads((tmp_path / "xatl" / "config.json").read_text())["mamba2"]["norm_eps"] == 1e-6
    result = invoke("export", tmp_path / "xatl", "--format", "granitemoehybrid", "--out", tmp_path / "granite")
    assert result.exit_code == 0, result.output
    assert json.loads((tmp_path / "granite" / "config.json").read_text())["attention_bias"] is True
    weights = load_file(tmp_path / "granite" / "model.safetensors")
    assert torch.equal(weights["model.layers.1.self_attn.o_proj.bias"], torch.zeros(64))
    assert weights["model.layers.1.self_attn.q_proj.bias"].abs().sum() > 0  # the source's own, carried
    assert _relative_error(tmp_path / "granite", tmp_path / "xatl") <= 1e-5
    report = invoke("verify", tmp_path / "granite", "--json", tmp_path / "report.json")
    assert report.exit_code == 0, report.output
    checks = {c["name"]: c for c in json.loads((tmp_path / "report.json").read_text())["checks"]}
    assert checks["tensors as exported"]["status"] == "pass"  # the zero bias is part of the format's mapping


def test_pure_mamba2_qwen3_exports_to_bamba_and_an_older_folder_is_refused(qwen3: Path, tmp_path: Path) -> None:
    convert(qwen3, tmp_path / "xatl", to="mamba2")
    assert json.loads((tmp_path / "xatl" / "config.json").read_text())["mamba2"]["norm_eps"] == 1e-6
    result = invoke("export", tmp_path / "xatl", "--format", "bamba", "--out", tmp_path / "bamba")
    assert result.exit_code == 0, result.output  # qk_norm and the sliding window: no attention layer has them
    assert _relative_error(tmp_path / "bamba", tmp_path / "xatl") <= 1e-5
    # A folder written before the key: its Mamba2 norm computed with 1e-5, which it keeps, so Bamba refuses it
    shutil.copytree(tmp_path / "xatl", tmp_path / "old")
    config = json.loads((tmp_path / "old" / "config.json").read_text())
    del config["mamba2"]["norm_eps"]
    (tmp_path / "old" / "config.json").write_text(json.dumps(config))
    assert XatlConfig.from_pretrained(tmp_path / "old").mamba2["norm_eps"] == 1e-5
    line = error_line(invoke("export", tmp_path / "old", "--format", "bamba", "--out", tmp_path / "old-bamba"))
    assert "mamba2.norm_eps 1e-05 is not norm_eps 1e-06" in line and "convert again" in line


@pytest.mark.parametrize("format", ["granitemoehybrid", "bamba"])
def test_qwen3_hybrid_is_refused_for_its_q_k_norm(format: str, qwen3: Path, tmp_path: Path) -> None:
    convert(qwen3, tmp_path / "xatl", to="mamba2", attn_layers="1")
    line = error_line(invoke("export", tmp_path / "xatl", "--format", format, "--out", tmp_path / "out"))
    assert f"cannot be exported as {format}" in line and "a q/k norm (qk_norm 'head')" in line
    assert not (tmp_path / "out").exists()


def test_a_mamba2_norm_eps_given_is_used_and_refused_by_formats_that_fix_it(tmp_path: Path) -> None:
    source = save_family(tmp_path / "source", "llama", LLAMA)  # eps 1e-5, which every format takes
    convert(source, tmp_path / "xatl", to="mamba2", overrides={"mamba2.norm_eps": 1e-3})
    config = XatlConfig.from_pretrained(tmp_path / "xatl")
    assert config.mamba2["norm_eps"] == 1e-3 and config.norm_eps == 1e-5
    assert XatlForCausalLM(config).model.layers[0].mixer.norm.eps == 1e-3  # the one norm both paths run
    for format, reason in (("mamba-ssm", "mamba-ssm's Mamba2 norm uses 1e-05"), ("bamba", "is not norm_eps 1e-05")):
        line = error_line(invoke("export", tmp_path / "xatl", "--format", format, "--out", tmp_path / format))
        assert "mamba2.norm_eps 0.001" in line and reason in line
