"""Mamba2 targets: conversion, the attention-informed init (V → x, K → B, Q → C), and verify on hybrids."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from tests.test_llama import save_source
from xatl_convert.cli import app
from xatl_convert.conversion import convert, init_overrides
from xatl_convert.errors import PlanError
from xatl_convert.manifest import read_manifest
from xatl_convert.verify import verify


def test_gpt_neox_to_mamba2_converts_and_verifies(neox_checkpoint: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    plan = convert(neox_checkpoint, out, to="mamba2", attn_layers="1")
    assert plan.mapping.name == "gpt-neox-to-mamba2"
    assert plan.layer_types == ["mamba2", "attention", "mamba2", "mamba2"]
    weights = load_file(out / "model.safetensors")
    # 4 heads of head_dim 8: ngroups = 4, d_state = headdim = 8, expand 1 → in_proj rows z, x, B, C (32 each), dt (4)
    assert weights["model.layers.0.mixer.in_proj.weight"].shape == (4 * 32 + 4, 32)
    assert weights["model.layers.0.mixer.A_log"].shape == (4,)
    report = verify(out, neox_checkpoint)
    assert report.passed
    assert report.check("incremental decoding = full forward").details["worst"]["error"] <= 1e-5


def test_attention_informed_init_writes_v_k_q_into_x_b_c(neox_checkpoint: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    convert(neox_checkpoint, out, to="mamba2", overrides=init_overrides("attention"))
    weights, source = load_file(out / "model.safetensors"), load_file(neox_checkpoint / "model.safetensors")
    qkv = source["gpt_neox.layers.3.attention.query_key_value.weight"].view(4, 3, 8, 32)
    q, k, v = (qkv[:, index].reshape(32, 32) for index in range(3))
    in_proj = weights["model.layers.3.mixer.in_proj.weight"]
    assert torch.equal(in_proj[32:64], v) and torch.equal(in_proj[64:96], k) and torch.equal(in_proj[96:128], q)
    default = tmp_path / "default"
    convert(neox_checkpoint, default, to="mamba2")
    baseline = load_file(default / "model.safetensors")["model.layers.3.mixer.in_proj.weight"]
    assert torch.equal(in_proj[:32], baseline[:32]) and torch.equal(in_proj[128:], baseline[128:])  # z and dt
    assert torch.equal(weights["model.layers.3.mixer.out_proj.weight"],
                       source["gpt_neox.layers.3.attention.dense.weight"])  # fmt: skip
    parts = read_manifest(out)["tensors"]["model.layers.3.mixer.in_proj.weight"]["parts"]
    assert [(part["part"], part["rows"]) for part in parts] == [("x", [32, 64]), ("B", [64, 96]), ("C", [96, 128])]
    assert verify(out, neox_checkpoint).check("transfers exact").value == "56/56 equal"


def test_attention_informed_init_repeats_gqa_kv_heads(tmp_path: Path) -> None:
    source_dir = save_source(tmp_path / "llama", "llama-gqa-untied")  # 4 heads, 2 kv heads, head_dim 16
    out = tmp_path / "out"
    plan = convert(source_dir, out, to="mamba2", overrides=init_overrides("attention"))
    assert plan.mapping.name == "llama-to-mamba2"
    weights, source = load_file(out / "model.safetensors"), load_file(source_dir / "model.safetensors")
    in_proj = weights["model.layers.0.mixer.in_proj.weight"]
    k = source["model.layers.0.self_attn.k_proj.weight"].view(2, 16, 64).repeat_interleave(2, dim=0).reshape(64, 64)
    v = source["model.layers.0.self_attn.v_proj.weight"].view(2, 16, 64).repeat_interleave(2, dim=0).reshape(64, 64)
    assert torch.equal(in_proj[64:128], v) and torch.equal(in_proj[128:192], k)
    assert torch.equal(in_proj[192:256], source["model.layers.0.self_attn.q_proj.weight"])
    assert verify(out, source_dir).passed


def test_init_attention_needs_a_mamba2_target(neox_checkpoint: Path, tmp_path: Path) -> None:
    with pytest.raises(PlanError, match="--init attention: mapping 'gpt-neox-to-mamba' has no attention-informed"):
        convert(neox_checkpoint, tmp_path / "out", to="mamba", overrides=init_overrides("attention"))


def test_init_attention_from_the_command_line(neox_checkpoint: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    result = CliRunner().invoke(app, ["convert", str(neox_checkpoint), "--to", "mamba2", "--init", "attention",
                                      "--out", str(out)])  # fmt: skip
    assert result.exit_code == 0, result.output
    assert read_manifest(out)["mapping"]["options"]["attention_init"] is True


def test_verify_on_cuda_without_a_gpu_is_a_clear_error(neox_checkpoint: Path, tmp_path: Path) -> None:
    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    out = tmp_path / "out"
    convert(neox_checkpoint, out)
    result = CliRunner().invoke(app, ["verify", str(out), "--device", "cuda"])
    assert result.exit_code == 2
    assert "no CUDA device is available" in result.stderr


@pytest.mark.parametrize("target", ["mamba", "mamba2"])
@pytest.mark.parametrize("attn_layers", ["none", "every-2"])
def test_verify_checks_incremental_decoding_for_pure_and_hybrid_models(
    neox_checkpoint: Path, tmp_path: Path, target: str, attn_layers: str
) -> None:
    out = tmp_path / "out"
    plan = convert(neox_checkpoint, out, to=target, attn_layers=attn_layers)
    assert ("attention" in plan.layer_types) is (attn_layers != "none")
    check = verify(out, neox_checkpoint).check("incremental decoding = full forward")
    assert check.status == "pass" and max(check.details["per_layer"]) <= 1e-5
    assert check.details["layer_types"] == plan.layer_types  # every block, attention ones included
