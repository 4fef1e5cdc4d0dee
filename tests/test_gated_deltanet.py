"""Gated DeltaNet as a third target: Q/K/V/O transfer, the paper hybrid, decoding, kernel call sites, and the mixer
matching transformers' own Qwen3-Next Gated DeltaNet layer."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from tests.test_llama import save_source
from xatl_convert.cli import app
from xatl_convert.conversion import convert
from xatl_convert.manifest import read_manifest
from xatl_convert.mapping.loader import builtin_mappings
from xatl_convert.models import XatlConfig
from xatl_convert.models.kernels_xatl import kernel_path
from xatl_convert.models.modeling_xatl import XatlForCausalLM, XatlGatedDeltaNet, new_cache
from xatl_convert.verify import verify

HEADS, KV_HEADS, HEAD_DIM, HIDDEN = 4, 2, 16, 64  # the llama-gqa-untied source of test_llama


def _rows(source: dict[str, torch.Tensor], name: str) -> torch.Tensor:
    """An attention projection with its kv heads repeated to every head, as the mapping's repeat transform does."""
    return source[name].view(KV_HEADS, HEAD_DIM, HIDDEN).repeat_interleave(HEADS // KV_HEADS, dim=0).reshape(-1, HIDDEN)


def test_conversion_moves_w_q_w_k_w_v_and_w_o_into_the_mixer_and_records_them(tmp_path: Path) -> None:
    source_dir = save_source(tmp_path / "llama", "llama-gqa-untied")
    out = tmp_path / "out"
    plan = convert(source_dir, out, to="gated-deltanet")
    assert plan.mapping.name == "llama-to-gated-deltanet" and set(plan.layer_types) == {"gated_deltanet"}
    weights, source = load_file(out / "model.safetensors"), load_file(source_dir / "model.safetensors")
    in_proj = weights["model.layers.0.mixer.in_proj.weight"]  # rows [q, k, v, z, b, a]
    key = HEADS * HEAD_DIM
    assert torch.equal(in_proj[:key], source["model.layers.0.self_attn.q_proj.weight"])
    assert torch.equal(in_proj[key : 2 * key], _rows(source, "model.layers.0.self_attn.k_proj.weight"))
    assert torch.equal(in_proj[2 * key : 3 * key], _rows(source, "model.layers.0.self_attn.v_proj.weight"))
    assert torch.equal(
        weights["model.layers.0.mixer.out_proj.weight"], source["model.layers.0.self_attn.o_proj.weight"]
    )
    record = read_manifest(out)["tensors"]["model.layers.0.mixer.in_proj.weight"]
    parts = {part["part"]: (part["rows"], part["sources"]) for part in record["parts"]}
    assert parts == {
        p: ([i * key, (i + 1) * key], [f"model.layers.0.self_attn.{p}_proj.weight"]) for i, p in enumerate("qkv")
    }
    assert read_manifest(out)["tensors"]["model.layers.0.mixer.out_proj.weight"]["status"] == "transferred"


def test_qkv_transfer_is_an_option_that_can_be_turned_off(tmp_path: Path) -> None:
    source_dir = save_source(tmp_path / "llama", "llama-gqa-untied")
    on, off = tmp_path / "on", tmp_path / "off"
    convert(source_dir, on, to="gated_deltanet")
    convert(source_dir, off, to="gated_deltanet", overrides={"options.transfer_attention_qkv": False})
    key = HEADS * HEAD_DIM
    q_on = load_file(on / "model.safetensors")["model.layers.0.mixer.in_proj.weight"][:key]
    q_off = load_file(off / "model.safetensors")["model.layers.0.mixer.in_proj.weight"][:key]
    assert not torch.equal(q_on, q_off)
    assert "parts" not in read_manifest(off)["tensors"]["model.layers.0.mixer.in_proj.weight"]


@pytest.mark.parametrize("attn_layers", ["none", "paper"])
def test_gated_deltanet_conversion_verifies_pure_and_as_the_paper_hybrid(tmp_path: Path, attn_layers: str) -> None:
    source_dir = save_source(tmp_path / "llama", "qwen2-qkv-bias-tied")
    out = tmp_path / "out"
    plan = convert(source_dir, out, to="gated-deltanet", attn_layers=attn_layers)
    assert ("attention" in plan.layer_types) is (attn_layers == "paper")
    report = verify(out, source_dir)
    assert report.passed, [c for c in report.checks if c.status != "pass"]
    assert report.check("source twin = source").details["logits"] <= 1e-5
    decoding = report.check("incremental decoding = full forward")
    assert decoding.status == "pass" and max(decoding.details["per_layer"]) <= 1e-4
    sites = report.check("gated_deltanet kernel call sites = reference")
    assert sites.status == "pass"
    # Qwen2's q/k/v biases fill in_proj's bias rows
    bias = load_file(out / "model.safetensors")["model.layers.0.mixer.in_proj.bias"]
    source = load_file(source_dir / "model.safetensors")
    assert torch.equal(bias[: HEADS * HEAD_DIM], source["model.layers.0.self_attn.q_proj.bias"])


def test_convert_to_gated_deltanet_from_the_command_line(tmp_path: Path) -> None:
    source_dir = save_source(tmp_path / "llama", "llama-gqa-untied")
    result = CliRunner().invoke(
        app, ["convert", str(source_dir), "--to", "gated-deltanet", "--out", str(tmp_path / "o")]
    )
    assert result.exit_code == 0, result.output
    assert "gated_deltanet" in result.output
    unknown = CliRunner().invoke(app, ["convert", str(source_dir), "--to", "deltanet", "--out", str(tmp_path / "x")])
    assert unknown.exit_code != 0 and "gated-deltanet" in unknown.output and not (tmp_path / "x").exists()


def _tiny(layer_types: list[str], **settings: object) -> XatlConfig:
    return XatlConfig(
        vocab_size=100, hidden_size=64, num_hidden_layers=len(layer_types), intermediate_size=96,
        num_attention_heads=4, num_key_value_heads=2, layer_types=layer_types, norm_type="rmsnorm",
        mlp_gated=True, parallel_residual=False, hidden_act="silu", gated_deltanet=settings,
    )  # fmt: skip


def test_decoding_with_the_recurrent_state_equals_the_full_forward_on_both_paths() -> None:
    torch.manual_seed(0)
    model = XatlForCausalLM(_tiny(["gated_deltanet", "attention", "gated_deltanet"], chunk_size=16)).eval()
    ids = torch.randint(0, 100, (2, 40))
    with torch.no_grad():
        full = model(ids).logits
        for path in ("reference", "kernels"):
            cache = new_cache(model, 2)
            with kernel_path(path):
                steps = [model(ids[:, :30], cache=cache, use_cache=True).logits]
                steps += [model(ids[:, t : t + 1], cache=cache, use_cache=True).logits for t in range(30, 40)]
            error = (torch.cat(steps, 1) - full).norm() / full.norm()
            assert error < 1e-5, path
    assert cache.recurrent_bytes() == 2 * (64 * 3 * 4 * 4 + 4 * 16 * 16 * 4)  # 2 layers: conv + state, fp32


def test_mixer_equals_transformers_qwen3_next_gated_deltanet_layer() -> None:
    """Same weights (our in_proj rows regrouped into Qwen3-Next's in_proj_qkvz / in_proj_ba) give the same output."""
    from transformers import Qwen3NextConfig
    from transformers.models.qwen3_next.modeling_qwen3_next import Qwen3NextGatedDeltaNet

    torch.manual_seed(0)
    nk, nv, dk, dv, hidden = 2, 4, 16, 8, 64
    config = XatlConfig(
        vocab_size=100, hidden_size=hidden, num_hidden_layers=1, num_attention_heads=4, norm_type="rmsnorm",
        layer_types=["gated_deltanet"], gated_deltanet={"num_heads": nk, "num_v_heads": nv, "head_k_dim": dk,
                                                        "head_v_dim": dv, "norm_eps": 1e-6, "chunk_size": 16},
    )  # fmt: skip
    ours = XatlGatedDeltaNet(config, 0)
    for parameter in ours.parameters():
        torch.nn.init.normal_(parameter, std=0.3)
    theirs = Qwen3NextGatedDeltaNet(
        Qwen3NextConfig(
            hidden_size=hidden, linear_num_key_heads=nk, linear_num_value_heads=nv, linear_key_head_dim=dk,
            linear_value_head_dim=dv, linear_conv_kernel_dim=4, rms_norm_eps=1e-6, hidden_act="silu",
            layer_types=["linear_attention"], num_hidden_layers=1,
        ),
        0,
    )  # fmt: skip
    q, k, v, z, b, a = ours.in_proj.weight.split([nk * dk, nk * dk, nv * dv, nv * dv, nv, nv])
    per = nv // nk
    groups_qkvz = [
        torch.cat(
            [q.view(nk, dk, -1)[g], k.view(nk, dk, -1)[g], v.view(nk, per * dv, -1)[g], z.view(nk, per * dv, -1)[g]]
        )
        for g in range(nk)
    ]
    groups_ba = [torch.cat([b.view(nk, per, -1)[g], a.view(nk, per, -1)[g]]) for g in range(nk)]
    with torch.no_grad():
        theirs.in_proj_qkvz.weight.copy_(torch.cat(groups_qkvz))
        theirs.in_proj_ba.weight.copy_(torch.cat(groups_ba))
        theirs.conv1d.weight.copy_(ours.conv1d.weight)
        for name in ("dt_bias", "A_log"):
            getattr(theirs, name).copy_(getattr(ours, name))
        theirs.norm.weight.copy_(ours.norm.weight)
        theirs.out_proj.weight.copy_(ours.out_proj.weight)
        x = torch.randn(2, 37, hidden)
        want, got = theirs(x), ours(x)
    assert (got - want).norm() / want.norm() < 1e-5


@pytest.mark.parametrize("format", ["granitemoehybrid", "bamba", "mamba-ssm", "gguf"])
def test_formats_that_do_not_hold_gated_deltanet_refuse_it_by_the_registry(tmp_path: Path, format: str) -> None:
    """Export fit is an allow-list: a format that the mixer's registry entry does not name refuses it, with the
    formats that can hold it, and writes nothing."""
    from xatl_convert.export import ExportError, export_folder

    source_dir = save_source(tmp_path / "llama", "llama-gqa-untied")
    convert(source_dir, tmp_path / "gdn", to="gated-deltanet")
    with pytest.raises(ExportError, match=rf"Gated DeltaNet layers, which {format} cannot hold .*qwen3_next"):
        export_folder(tmp_path / "gdn", tmp_path / "out", format)
    assert not (tmp_path / "out").exists()


def test_conv_identity_init_passes_the_moved_projections_through_the_short_conv(tmp_path: Path) -> None:
    """With `options.conv_identity_init` (on by default), the conv starts as a causal pass-through, so the mixer's q is
    silu(W_Q x): the transferred projection itself, not a random mix of the last d_conv tokens."""
    source_dir = save_source(tmp_path / "llama", "llama-gqa-untied")
    out = tmp_path / "out"
    convert(source_dir, out, to="gated-deltanet")
    conv = load_file(out / "model.safetensors")["model.layers.0.mixer.conv1d.weight"]
    assert torch.equal(conv[..., -1], torch.ones_like(conv[..., -1])) and not conv[..., :-1].any()
    assert read_manifest(out)["tensors"]["model.layers.0.mixer.conv1d.weight"]["strategy"] == "identity_conv"
    model = XatlForCausalLM.from_pretrained(out).eval()
    mixer = model.model.layers[0].mixer
    x = torch.randn(1, 5, HIDDEN)
    q_proj = load_file(source_dir / "model.safetensors")["model.layers.0.self_attn.q_proj.weight"]
    with torch.no_grad():
        qkv = mixer.in_proj(x)[..., : mixer.conv_dim].transpose(1, 2)
        conv_out = torch.nn.functional.silu(mixer.conv1d(qkv)[..., :5]).transpose(1, 2)
    assert torch.allclose(conv_out[..., : HEADS * HEAD_DIM], torch.nn.functional.silu(x @ q_proj.T), atol=1e-6)
    # turned off, the conv keeps its own (random) init
    convert(source_dir, tmp_path / "off", to="gated-deltanet", overrides={"options.conv_identity_init": False})
    assert load_file(tmp_path / "off" / "model.safetensors")["model.layers.0.mixer.conv1d.weight"][..., :-1].any()


def test_identity_conv_on_a_tensor_that_is_no_conv_is_refused_naming_the_rule(tmp_path: Path) -> None:
    from xatl_convert.errors import PlanError

    source_dir = save_source(tmp_path / "llama", "llama-gqa-untied")
    text = Path(builtin_mappings()["llama-to-gated-deltanet"]).read_text()
    text = text.replace(
        'target: "model.layers.{i}.mixer.conv1d.weight", where: gated_deltanet, strategy: identity_conv',
        'target: "model.layers.{i}.mixer.dt_bias", where: gated_deltanet, strategy: identity_conv',
    )
    mapping = tmp_path / "mine.yaml"
    mapping.write_text(text)
    with pytest.raises(PlanError, match=r"mine.yaml:\d+: strategy identity_conv is for a depthwise conv weight"):
        convert(source_dir, tmp_path / "out", to="gated-deltanet", mapping=mapping)
    assert not (tmp_path / "out").exists()
