"""End-to-end conversion of GPT-NeoX checkpoints: outputs, the paper's transfer set, layouts, determinism."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer, GPTNeoXForCausalLM

from tests.conftest import EXAMPLE_CHECKPOINT
from xatl_convert.conversion import convert
from xatl_convert.manifest import read_manifest, transferred_tensor_names
from xatl_convert.models import XatlForCausalLM


def _source_state(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(folder / "model.safetensors")


def _output_state(folder: Path) -> dict[str, torch.Tensor]:
    tensors: dict[str, torch.Tensor] = {}
    for file in folder.glob("*.safetensors"):
        tensors.update(load_file(file))
    return tensors


def test_pure_mamba_conversion_writes_weights_config_manifest_and_card(neox_checkpoint: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    convert(neox_checkpoint, out)
    assert sorted(p.name for p in out.iterdir()) == [
        "README.md",
        "config.json",
        "config_keys_xatl.py",
        "configuration_xatl.py",
        "delta_rule_xatl.py",
        "generation_config.json",
        "kernels_xatl.py",
        "mixers_xatl.py",
        "model.safetensors",
        "modeling_xatl.py",
        "scans_xatl.py",
        "xatl_manifest.json",
    ]
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "xatl"
    assert config["layer_types"] == ["mamba"] * 4
    assert config["auto_map"]["AutoModelForCausalLM"] == "modeling_xatl.XatlForCausalLM"
    manifest = read_manifest(out)
    assert set(manifest["tensors"]) == set(_output_state(out))
    card = (out / "README.md").read_text()
    assert card.startswith("---\nbase_model: ")
    assert "library_name: transformers" in card and "- xatl" in card and "- mamba" in card
    assert "name: gpt-neox\n" in card  # the mapping is embedded


def test_paper_transfer_set_is_copied_exactly(neox_checkpoint: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    convert(neox_checkpoint, out)
    source, target = _source_state(neox_checkpoint), _output_state(out)
    pairs = {
        "model.embed_tokens.weight": "gpt_neox.embed_in.weight",
        "lm_head.weight": "embed_out.weight",
        "model.final_norm.weight": "gpt_neox.final_layer_norm.weight",
        "model.final_norm.bias": "gpt_neox.final_layer_norm.bias",
    }
    for layer in range(4):
        for ours, theirs in {
            "input_norm": "input_layernorm",
            "mlp_norm": "post_attention_layernorm",
            "mlp.fc1": "mlp.dense_h_to_4h",
            "mlp.fc2": "mlp.dense_4h_to_h",
            "mixer.out_proj": "attention.dense",  # W_O into the Mamba out_proj (expand = 1)
        }.items():
            for kind in ("weight", "bias"):
                pairs[f"model.layers.{layer}.{ours}.{kind}"] = f"gpt_neox.layers.{layer}.{theirs}.{kind}"
    for ours, theirs in pairs.items():
        assert torch.equal(target[ours], source[theirs]), ours
    manifest = read_manifest(out)
    assert set(transferred_tensor_names(manifest)) == set(pairs)
    assert manifest["tensors"]["model.layers.0.mixer.A_log"] == {
        "status": "initialised",
        "shape": [32, 16],
        "dtype": "float32",
        "rule": manifest["tensors"]["model.layers.0.mixer.A_log"]["rule"],
        "strategy": "default",
    }
    qkv = [name for name in manifest["dropped"] if name.endswith("query_key_value.weight")]
    assert len(qkv) == 4


def test_new_mamba_mixers_get_mamba_ssm_init(neox_checkpoint: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    convert(neox_checkpoint, out, overrides={"mamba.d_state": 8})
    state = _output_state(out)
    a_log = state["model.layers.2.mixer.A_log"]
    assert a_log.shape == (32, 8)
    assert torch.allclose(a_log, torch.log(torch.arange(1, 9, dtype=torch.float32)).expand(32, 8))
    assert torch.equal(state["model.layers.2.mixer.D"], torch.ones(32))
    dt = torch.nn.functional.softplus(state["model.layers.2.mixer.dt_proj.bias"])
    assert dt.min() >= 1e-4 - 1e-7 and dt.max() <= 0.1 + 1e-6
    dt_rank = state["model.layers.2.mixer.dt_proj.weight"].shape[1]
    assert state["model.layers.2.mixer.dt_proj.weight"].abs().max() <= dt_rank**-0.5
    # different layers get different draws: the seed depends on the module name
    assert not torch.equal(state["model.layers.0.mixer.in_proj.weight"], state["model.layers.1.mixer.in_proj.weight"])


def test_w_o_is_dropped_and_reported_when_shapes_differ(neox_checkpoint: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    plan = convert(neox_checkpoint, out, overrides={"mamba.expand": 2})
    manifest = read_manifest(out)
    assert manifest["tensors"]["model.layers.0.mixer.out_proj.weight"]["status"] == "initialised"
    reason = manifest["dropped"]["gpt_neox.layers.0.attention.dense.weight"]
    assert "[32, 64]" in reason and "[32, 32]" in reason
    assert "gpt_neox.layers.0.attention.dense.bias" in plan.dropped


def test_w_o_transfer_can_be_switched_off_by_option(neox_checkpoint: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    convert(neox_checkpoint, out, overrides={"options.transfer_attention_output": False})
    manifest = read_manifest(out)
    assert manifest["tensors"]["model.layers.3.mixer.out_proj.weight"]["status"] == "initialised"
    assert "option transfer_attention_output is off" in manifest["dropped"]["gpt_neox.layers.3.attention.dense.weight"]


@pytest.mark.parametrize(("attn_layers", "expected"), [("1,2", [1, 2]), ("paper", [1, 1]), ("every-2", [1, 3])])
def test_attention_layers_keep_every_attention_weight(
    make_neox, tmp_path: Path, attn_layers: str, expected: list[int]
) -> None:
    source_dir = make_neox(num_hidden_layers=4)
    out = tmp_path / "out"
    plan = convert(source_dir, out, attn_layers=attn_layers)
    kept = sorted(set(expected))
    assert plan.attention_layers == kept
    assert [index for index, kind in enumerate(plan.layer_types) if kind == "attention"] == kept
    source, target = _source_state(source_dir), _output_state(out)
    layer = kept[0]
    qkv = source[f"gpt_neox.layers.{layer}.attention.query_key_value.weight"].view(4, 3, 8, 32)
    for index, name in enumerate(("q_proj", "k_proj", "v_proj")):
        assert torch.equal(target[f"model.layers.{layer}.mixer.{name}.weight"], qkv[:, index].reshape(32, 32))


def test_paper_preset_keeps_layers_1_and_half_minus_1(make_neox, tmp_path: Path) -> None:
    plan = convert(make_neox(num_hidden_layers=8), tmp_path / "out", attn_layers="paper")
    assert plan.attention_layers == [1, 3]


@pytest.mark.parametrize("layout", ["sharded", "bin"])
def test_sharded_and_bin_sources_convert_to_the_same_tensors(make_neox, tmp_path: Path, layout: str) -> None:
    reference = tmp_path / "reference"
    convert(make_neox("safetensors", seed=3), reference)
    other = tmp_path / layout
    convert(make_neox(layout, seed=3), other)
    left, right = _output_state(reference), _output_state(other)
    assert left.keys() == right.keys()
    assert all(torch.equal(left[name], right[name]) for name in left)


def test_bin_source_with_pickled_code_is_refused(make_neox, tmp_path: Path) -> None:
    from xatl_convert.errors import SourceError

    folder = make_neox("bin")
    torch.save({"weights": torch.zeros(2), "evil": print}, folder / "pytorch_model.bin")
    with pytest.raises(SourceError, match=r"pytorch_model.bin: refused: it holds pickled code"):
        convert(folder, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_same_inputs_and_seed_give_byte_identical_files(neox_checkpoint: Path, tmp_path: Path) -> None:
    first, second, other_seed = tmp_path / "a", tmp_path / "b", tmp_path / "c"
    convert(neox_checkpoint, first, attn_layers="1")
    convert(neox_checkpoint, second, attn_layers="1")
    convert(neox_checkpoint, other_seed, attn_layers="1", seed=1)
    assert (first / "model.safetensors").read_bytes() == (second / "model.safetensors").read_bytes()
    assert (first / "model.safetensors").read_bytes() != (other_seed / "model.safetensors").read_bytes()


def test_output_loads_with_auto_class_and_matches_direct_load(neox_checkpoint: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    convert(neox_checkpoint, out, attn_layers="2")
    model = AutoModelForCausalLM.from_pretrained(out)
    assert isinstance(model, XatlForCausalLM)
    state = _output_state(out)
    for name, parameter in model.state_dict().items():
        assert torch.equal(parameter, state[name]), name


def test_output_loads_with_trust_remote_code_without_xatl_convert(neox_checkpoint: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    convert(neox_checkpoint, out, attn_layers="all")
    ids = torch.arange(12).unsqueeze(0)
    with torch.no_grad():
        expected = GPTNeoXForCausalLM.from_pretrained(neox_checkpoint).eval()(ids).logits
    with_tokenizer = tmp_path / "with-tokenizer"
    convert(EXAMPLE_CHECKPOINT, with_tokenizer)
    script = f"""
import sys
sys.modules["xatl_convert"] = None  # make `import xatl_convert` fail, as where it is not installed
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer
model = AutoModelForCausalLM.from_pretrained({str(out)!r}, trust_remote_code=True).eval()
assert type(model).__module__.startswith("transformers_modules"), type(model).__module__
with torch.no_grad():
    torch.save(model(torch.arange(12).unsqueeze(0)).logits, {str(tmp_path / "logits.pt")!r})
tokenizer = AutoTokenizer.from_pretrained({str(with_tokenizer)!r}, trust_remote_code=True)
print(tokenizer("Hello world")["input_ids"])
"""
    env = {**os.environ, "HF_MODULES_CACHE": str(tmp_path / "modules"), "HF_HUB_OFFLINE": "1"}
    run = subprocess.run(
        [sys.executable, "-c", script], env=env, cwd=tmp_path, capture_output=True, text=True, stdin=subprocess.DEVNULL
    )
    assert run.returncode == 0, run.stderr
    assert "Do you wish to run the custom code" not in run.stdout + run.stderr
    reference = AutoTokenizer.from_pretrained(EXAMPLE_CHECKPOINT)("Hello world")["input_ids"]
    assert run.stdout.strip().splitlines()[-1] == str(reference)
    logits = torch.load(tmp_path / "logits.pt")
    assert (logits - expected).abs().max() <= 1e-4


def test_shard_size_limit_splits_output_with_index(neox_checkpoint: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    convert(neox_checkpoint, out, max_shard_bytes=20_000)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    files = sorted(p.name for p in out.glob("*.safetensors"))
    assert len(files) > 1 and files[0].startswith("model-00001-of-")
    assert set(index["weight_map"].values()) == set(files)
    total = 0
    for file in files:
        with safe_open(out / file, "pt") as handle:
            for name in handle.keys():  # noqa: SIM118
                total += handle.get_tensor(name).numel() * 4
    assert index["metadata"]["total_size"] == total


def test_failure_while_writing_leaves_no_output_and_no_temporary_folder(
    neox_checkpoint: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from xatl_convert import writer

    produced = 0
    original = writer.TensorProducer.produce

    def fail_midway(self, planned):
        nonlocal produced
        produced += 1
        if produced == 10:
            raise KeyboardInterrupt  # what Ctrl-C (or SIGTERM, which the writer maps to it) raises
        return original(self, planned)

    monkeypatch.setattr(writer.TensorProducer, "produce", fail_midway)
    with pytest.raises(KeyboardInterrupt):
        convert(neox_checkpoint, tmp_path / "out", max_shard_bytes=10_000)
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_corrupt_safetensors_header_is_a_clear_error(make_neox, tmp_path: Path) -> None:
    from xatl_convert.errors import SourceError

    folder = make_neox()
    (folder / "model.safetensors").write_bytes(b"\xff" * 64)
    with pytest.raises(SourceError, match=r"model.safetensors: not a readable safetensors file"):
        convert(folder, tmp_path / "out")
    assert not (tmp_path / "out").exists()
