"""`xatl export`: a converted folder in transformers' own GraniteMoeHybrid, which loads without remote code and
computes what the xatl model computes (pure Mamba2 and hybrids), or a one-line refusal naming every reason."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from tests.bad_input import error_line, invoke
from tests.test_families import FAMILIES, save_family
from xatl_convert.conversion import convert

# Llama-shaped (SmolLM2's eps, GQA, tied), without the family test's random biases: a Bamba home when pure Mamba2
LLAMA = ("LlamaForCausalLM", "LlamaConfig", {
    "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 3, "num_attention_heads": 4,
    "num_key_value_heads": 2, "rms_norm_eps": 1e-5, "tie_word_embeddings": True})  # fmt: skip
# Granite-shaped (multipliers, GQA, tied) without biases: GraniteMoeHybrid's home
HYBRID_READY = ("GraniteForCausalLM", "GraniteConfig", {
    **FAMILIES["granite"][2], "attention_bias": False, "mlp_bias": False, "rms_norm_eps": 1e-5})  # fmt: skip


def _logits(folder: Path, ids: torch.Tensor, remote: bool) -> torch.Tensor:
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, trust_remote_code=remote).eval()
    with torch.no_grad():
        return model(ids, use_cache=False).logits


@pytest.mark.parametrize("attn_layers", ["none", "every-2", "1"], ids=["pure-mamba2", "every-2", "layer-1"])
def test_granitemoehybrid_export_loads_natively_and_computes_the_same(attn_layers: str, tmp_path: Path) -> None:
    source = save_family(tmp_path / "source", "granite", HYBRID_READY)
    convert(source, tmp_path / "xatl", to="mamba2", attn_layers=attn_layers)
    result = invoke("export", tmp_path / "xatl", "--format", "granitemoehybrid", "--out", tmp_path / "granite")
    assert result.exit_code == 0, result.output
    config = json.loads((tmp_path / "granite" / "config.json").read_text())
    assert config["model_type"] == "granitemoehybrid" and "auto_map" not in config
    ids = torch.randint(0, 256, (2, 40), generator=torch.Generator().manual_seed(0))
    ours, theirs = _logits(tmp_path / "xatl", ids, True), _logits(tmp_path / "granite", ids, False)
    assert ((theirs - ours).norm() / ours.norm()).item() <= 1e-5
    native = AutoModelForCausalLM.from_pretrained(tmp_path / "granite", dtype=torch.float32).eval()
    xatl = AutoModelForCausalLM.from_pretrained(tmp_path / "xatl", dtype=torch.float32, trust_remote_code=True).eval()
    prompt = ids[:1, :8]
    # pure Mamba2: transformers 5 generates without a cache (its hybrid cache asks an attention layer for the
    # length), which the export's generation_config says
    generated = [m.generate(prompt, max_new_tokens=6, do_sample=False) for m in (native, xatl)]
    assert torch.equal(generated[0], generated[1])
    report = invoke("verify", tmp_path / "granite", "--json", tmp_path / "report.json")
    assert report.exit_code == 0, report.output
    checks = {c["name"]: c for c in json.loads((tmp_path / "report.json").read_text())["checks"]}
    assert checks["tensors as exported"]["status"] == "pass"
    assert checks["logits = xatl model (granitemoehybrid, no remote code)"]["details"]["relative_error"] <= 1e-5
    manifest = json.loads((tmp_path / "granite" / "xatl_manifest.json").read_text())
    assert manifest["export"]["format"] == "granitemoehybrid" and manifest["tensors"]  # freezing still reads it


def test_verify_of_an_export_finds_a_changed_tensor(tmp_path: Path) -> None:
    from safetensors.torch import load_file, save_file

    source = save_family(tmp_path / "source", "llama", LLAMA)
    convert(source, tmp_path / "xatl", to="mamba2")
    assert invoke("export", tmp_path / "xatl", "--format", "bamba", "--out", tmp_path / "bamba").exit_code == 0
    weights = load_file(tmp_path / "bamba" / "model.safetensors")
    weights["model.layers.1.feed_forward.gate_proj.weight"] = weights[
        "model.layers.1.feed_forward.up_proj.weight"
    ].clone()
    save_file(weights, tmp_path / "bamba" / "model.safetensors", metadata={"format": "pt"})
    result = invoke("verify", tmp_path / "bamba", "--json", tmp_path / "report.json")
    assert result.exit_code == 1
    checks = {c["name"]: c for c in json.loads((tmp_path / "report.json").read_text())["checks"]}
    assert checks["tensors as exported"]["details"]["differ"] == ["model.layers.1.feed_forward.gate_proj.weight"]
    assert checks["logits = xatl model (bamba, no remote code)"]["status"] == "fail"


def test_an_export_that_would_compute_something_else_is_refused_with_every_reason(tmp_path: Path) -> None:
    source = save_family(tmp_path / "source", "gpt2")
    convert(source, tmp_path / "xatl", to="mamba")
    line = error_line(invoke("export", tmp_path / "xatl", "--format", "granitemoehybrid", "--out", tmp_path / "g"))
    assert "cannot be exported as granitemoehybrid without changing what it computes" in line
    for reason in ("Mamba (v1) layers", "norm_type is 'layernorm'", "position_embedding_type is 'learned'"):
        assert reason in line
    assert not (tmp_path / "g").exists()
    line = error_line(invoke("export", tmp_path / "xatl", "--format", "bamba2", "--out", tmp_path / "g"))
    assert line == "error: --format 'bamba2': unknown (known: granitemoehybrid, bamba, mamba-ssm, gguf, qwen3_next)"


def test_convert_format_writes_the_export_directly_and_refuses_before_writing(tmp_path: Path) -> None:
    source = save_family(tmp_path / "source", "granite", HYBRID_READY)
    out = tmp_path / "granite"
    result = invoke("convert", source, "--to", "mamba2", "--attn-layers", "1", "--format", "granitemoehybrid",
                    "--out", out)  # fmt: skip
    assert result.exit_code == 0, result.output
    assert json.loads((out / "config.json").read_text())["layer_types"][:2] == ["linear_attention", "full_attention"]
    assert sorted(path.name for path in tmp_path.iterdir()) == ["granite", "source"]  # no temporary folder left
    convert(source, tmp_path / "xatl", to="mamba2", attn_layers="1")
    ids = torch.randint(0, 256, (1, 24), generator=torch.Generator().manual_seed(1))
    assert ((_logits(out, ids, False) - _logits(tmp_path / "xatl", ids, True)).norm()).item() <= 1e-4
    line = error_line(invoke("convert", source, "--format", "granitemoehybrid", "--out", tmp_path / "m1"))
    assert "cannot be exported as granitemoehybrid" in line and "Mamba (v1) layers" in line  # --to mamba
    assert not (tmp_path / "m1").exists()


def test_bamba_export_holds_a_pure_mamba2_conversion_and_refuses_full_rotary_attention(tmp_path: Path) -> None:
    source = save_family(tmp_path / "source", "llama", LLAMA)
    convert(source, tmp_path / "xatl", to="mamba2", overrides={"options.attention_init": True})
    assert invoke("export", tmp_path / "xatl", "--format", "bamba", "--out", tmp_path / "bamba").exit_code == 0
    config = json.loads((tmp_path / "bamba" / "config.json").read_text())
    assert config["model_type"] == "bamba" and config["attn_layer_indices"] == []
    ids = torch.randint(0, 256, (2, 40), generator=torch.Generator().manual_seed(0))
    ours, theirs = _logits(tmp_path / "xatl", ids, True), _logits(tmp_path / "bamba", ids, False)
    assert ((theirs - ours).norm() / ours.norm()).item() <= 1e-5
    native = AutoModelForCausalLM.from_pretrained(tmp_path / "bamba", dtype=torch.float32).eval()
    xatl = AutoModelForCausalLM.from_pretrained(tmp_path / "xatl", dtype=torch.float32, trust_remote_code=True).eval()
    generated = [m.generate(ids[:1, :8], max_new_tokens=6, do_sample=False) for m in (native, xatl)]
    assert torch.equal(generated[0], generated[1])  # pure Mamba2: transformers generates without a cache
    convert(source, tmp_path / "hybrid", to="mamba2", attn_layers="1")
    line = error_line(invoke("export", tmp_path / "hybrid", "--format", "bamba", "--out", tmp_path / "b2"))
    assert "Bamba's rotate half" in line and "export a hybrid as granitemoehybrid" in line


API = json.loads((Path(__file__).parent / "fixtures" / "mamba_ssm_api.json").read_text())


@pytest.mark.parametrize(("mixer", "layer"), [("mamba2", "Mamba2"), ("mamba", "Mamba1")])
def test_mamba_ssm_export_has_mamba_ssms_names_config_keys_and_exact_layouts(
    mixer: str, layer: str, tmp_path: Path
) -> None:
    """mamba-ssm needs CUDA, so: its own config fields, module arguments and parameter names (read from its source,
    tests/fixtures/mamba_ssm_api.json), and the two layouts that differ from xatl's checked numerically."""
    narrow = (LLAMA[0], LLAMA[1], {**LLAMA[2], "intermediate_size": 100})  # GatedMLP pads it to 128
    source = save_family(tmp_path / "source", "llama", narrow)
    convert(source, tmp_path / "xatl", to=mixer, attn_layers="1")
    result = invoke("export", tmp_path / "xatl", "--format", "mamba-ssm", "--out", tmp_path / "ssm")
    assert result.exit_code == 0, result.output
    config = json.loads((tmp_path / "ssm" / "config.json").read_text())
    assert list(config) == API["config_fields"]  # MambaConfig(**config) takes exactly these
    assert config["ssm_cfg"]["layer"] == layer and config["attn_layer_idx"] == [1]
    assert set(config["ssm_cfg"]) - {"layer"} <= set(API[f"{layer.lower()}_args"])
    assert set(config["attn_cfg"]) <= set(API["mha_args"])
    assert config["d_intermediate"] == 128 and config["pad_vocab_size_multiple"] == 1
    state = torch.load(tmp_path / "ssm" / "pytorch_model.bin", weights_only=True)
    expected = set(API["parameters"]["model"])
    for i in range(3):
        expected |= {name.replace("{i}", str(i)) for name in API["parameters"]["block"]}
        kind = "MHA" if i == 1 else layer
        expected |= {f"backbone.layers.{i}.{name}" for name in API["parameters"][kind]}
    assert set(state) == expected
    xatl = AutoModelForCausalLM.from_pretrained(tmp_path / "xatl", dtype=torch.float32, trust_remote_code=True)
    block = xatl.model.layers[0]
    x = torch.randn(2, 5, 64)
    fc1, fc2 = state["backbone.layers.0.mlp.fc1.weight"], state["backbone.layers.0.mlp.fc2.weight"]
    y, gate = (x @ fc1.T).chunk(2, dim=-1)  # mamba-ssm's GatedMLP, on the padded weights
    assert torch.allclose((y * torch.nn.functional.silu(gate)) @ fc2.T, block.mlp(x), atol=1e-6)
    attention = xatl.model.layers[1].mixer
    fused = torch.cat([attention.q_proj.weight, attention.k_proj.weight, attention.v_proj.weight])
    assert torch.equal(state["backbone.layers.1.mixer.in_proj.weight"], fused)  # MHA's rows: Q, then K, then V
    report = invoke("verify", tmp_path / "ssm", "--json", tmp_path / "report.json")
    checks = {c["name"]: c for c in json.loads((tmp_path / "report.json").read_text())["checks"]}
    assert report.exit_code == 0 and checks["tensors as exported"]["status"] == "pass"
    assert checks["logits = xatl model (mamba-ssm, no remote code)"]["status"] == "skip"


def test_a_sharded_folder_exports_shard_by_shard_and_verifies(tmp_path: Path) -> None:
    source = save_family(tmp_path / "source", "llama", LLAMA)
    convert(source, tmp_path / "xatl", to="mamba2", max_shard_bytes=100_000)
    shards = sorted(path.name for path in (tmp_path / "xatl").glob("*.safetensors"))
    assert len(shards) > 2
    assert invoke("export", tmp_path / "xatl", "--format", "bamba", "--out", tmp_path / "bamba").exit_code == 0
    assert sorted(path.name for path in (tmp_path / "bamba").glob("*.safetensors")) == shards  # one in memory at a time
    assert (tmp_path / "bamba" / "model.safetensors.index.json").is_file()
    assert invoke("verify", tmp_path / "bamba").exit_code == 0  # loads through the index; logits equal
