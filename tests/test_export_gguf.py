"""`--format gguf`: one model.gguf in llama.cpp's granitehybrid architecture, read back with gguf-py's own reader
(architecture, per-layer layout, RoPE, eps, ssm sizes, tokenizer, every tensor's name, shape and type), checked by
`xatl verify` (and caught when a tensor is changed), and refused in one line where llama.cpp would compute something
else. llama.cpp itself runs these files in benchmarks/gguf_llama_cpp.py (CI does not build it)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch

from tests.bad_input import error_line, invoke
from tests.test_families import save_family
from xatl_convert.conversion import convert

gguf = pytest.importorskip("gguf")

# Llama-shaped (GQA, tied), with a byte-level BPE tokenizer; hidden 64 with 4 heads of 16: the Llama mapping's
# Mamba2 is expand 1 (d_inner 64, 4 groups of 16), which the GGUF pads to llama.cpp's 2 × hidden with 4 zero groups
TINY = ("LlamaForCausalLM", "LlamaConfig", {
    "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 3, "num_attention_heads": 4,
    "num_key_value_heads": 2, "rms_norm_eps": 1e-5, "tie_word_embeddings": True, "vocab_size": 320})  # fmt: skip
CHAT_TEMPLATE = "{% for m in messages %}<|im_start|>{{ m['content'] }}{% endfor %}"


def tiny_llama_with_tokenizer(folder: Path) -> Path:
    """A random tiny Llama with a small byte-level BPE tokenizer (GPT-2's pre-tokenizer) and a chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    save_family(folder, "llama", TINY)
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  special_tokens=["<|endoftext|>"], show_progress=False)  # fmt: skip
    tokenizer.train_from_iterator(["the quick brown fox jumps over the lazy dog"] * 20, trainer)
    tokenizer.save(str(folder / "tokenizer.json"))
    (folder / "chat_template.jinja").write_text(CHAT_TEMPLATE)
    return folder


@pytest.fixture(scope="module")
def conversions(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("gguf")
    source = tiny_llama_with_tokenizer(root / "source")
    convert(source, root / "mamba2", to="mamba2")
    convert(source, root / "hybrid", to="mamba2", attn_layers="1")
    return {"source": source, "mamba2": root / "mamba2", "hybrid": root / "hybrid"}


def _export(folder: Path, out: Path, *options: str) -> gguf.GGUFReader:
    result = invoke("export", folder, "--format", "gguf", "--out", out, *options)
    assert result.exit_code == 0, result.output
    return gguf.GGUFReader(out / "model.gguf")


def _keys(reader: gguf.GGUFReader) -> dict[str, object]:
    return {key: field.contents() for key, field in reader.fields.items() if not key.startswith("GGUF.")}


def _tensors(reader: gguf.GGUFReader) -> dict[str, tuple[str, list[int]]]:
    """name: (GGML type, shape in llama.cpp's order)"""
    return {t.name: (t.tensor_type.name, [int(n) for n in t.shape]) for t in reader.tensors}


def test_pure_mamba2_gguf_has_llama_cpps_granitehybrid_layout(conversions: dict[str, Path], tmp_path: Path) -> None:
    reader = _export(conversions["mamba2"], tmp_path / "out", "--gguf-type", "f32")
    keys = _keys(reader)
    assert keys["general.architecture"] == "granitehybrid"
    # three recurrent layers (head_count_kv 0), then the identity layer llama.cpp needs when nothing attends
    assert keys["granitehybrid.block_count"] == 4
    assert keys["granitehybrid.attention.head_count_kv"] == [0, 0, 0, 1]
    assert keys["granitehybrid.attention.head_count"] == [4, 4, 4, 1]
    assert keys["granitehybrid.embedding_length"] == 64 and keys["granitehybrid.feed_forward_length"] == 128
    assert keys["granitehybrid.ssm.inner_size"] == 128  # 2 × hidden: 4 zero groups appended
    assert keys["granitehybrid.ssm.group_count"] == 8 and keys["granitehybrid.ssm.time_step_rank"] == 8
    assert keys["granitehybrid.ssm.state_size"] == 16 and keys["granitehybrid.ssm.conv_kernel"] == 4
    assert keys["granitehybrid.attention.layer_norm_rms_epsilon"] == pytest.approx(1e-5)
    assert keys["tokenizer.ggml.model"] == "gpt2" and keys["tokenizer.ggml.pre"] == "gpt-2"
    assert len(keys["tokenizer.ggml.tokens"]) == 320  # the embedding's rows; ids the tokenizer lacks are [PADn]
    assert keys["tokenizer.ggml.tokens"][-1] == "[PAD319]" and keys["tokenizer.ggml.merges"]
    assert keys["tokenizer.ggml.add_bos_token"] is False
    assert keys["tokenizer.chat_template"] == CHAT_TEMPLATE
    assert keys["xatl.layer_types"] == ["mamba2"] * 3 and keys["xatl.version"]
    assert not any(key.startswith("granitehybrid.") and "scale" in key for key in keys)  # neutral multipliers
    tensors = _tensors(reader)
    assert tensors["blk.0.ssm_in.weight"] == ("F32", [64, 2 * 128 + 2 * 8 * 16 + 8])
    assert tensors["blk.0.ssm_conv1d.weight"] == ("F32", [4, 128 + 2 * 8 * 16])
    assert tensors["blk.0.ssm_a"] == ("F32", [1, 8]) and tensors["blk.0.ssm_d"] == ("F32", [1, 8])
    assert tensors["blk.0.ssm_norm.weight"] == ("F32", [16, 8]) and tensors["blk.0.ssm_out.weight"] == (
        "F32",
        [128, 64],
    )
    assert tensors["blk.0.ffn_gate.weight"] == ("F32", [64, 128]) and tensors["blk.0.ffn_down.weight"] == (
        "F32",
        [128, 64],
    )
    assert "output.weight" not in tensors  # tied: llama.cpp reuses token_embd
    known = {gguf.TENSOR_NAMES[t] for t in gguf.MODEL_TENSORS[gguf.MODEL_ARCH.GRANITE_HYBRID]}
    for name in tensors:
        base = name.rsplit(".", 1)[0] if name.endswith((".weight", ".bias")) else name
        assert re.sub(r"^blk\.\d+\.", "blk.{bid}.", base) in known, name
    manifest = json.loads((tmp_path / "out" / "xatl_manifest.json").read_text())
    assert manifest["export"]["format"] == "gguf" and manifest["export"]["gguf_type"] == "F32"
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["README.md", "model.gguf", "xatl_manifest.json"]


def test_hybrid_gguf_marks_its_attention_layer_and_keeps_rope_on(conversions: dict[str, Path], tmp_path: Path) -> None:
    keys = _keys(_export(conversions["hybrid"], tmp_path / "out"))
    assert keys["granitehybrid.block_count"] == 3  # an attention layer: no identity layer
    assert keys["granitehybrid.attention.head_count_kv"] == [0, 2, 0]
    assert keys["granitehybrid.rope.scaling.finetuned"] is True  # granitehybrid's RoPE switch
    assert keys["granitehybrid.rope.dimension_count"] == 16 and keys["granitehybrid.rope.freq_base"] == 10000.0
    assert keys["granitehybrid.attention.key_length"] == 16 and keys["general.file_type"] == 1  # auto: F16


def test_granite_multipliers_and_mlp_biases_go_into_llama_cpps_keys_and_tensors(
    conversions: dict[str, Path], tmp_path: Path
) -> None:
    from tests.test_families import FAMILIES

    spec = ("GraniteForCausalLM", "GraniteConfig", {**FAMILIES["granite"][2], "vocab_size": 320, "rms_norm_eps": 1e-5})
    source = save_family(tmp_path / "granite", "granite", (*spec[:2], {**spec[2], "attention_bias": False}))
    (source / "tokenizer.json").write_bytes((conversions["source"] / "tokenizer.json").read_bytes())
    convert(source, tmp_path / "xatl", to="mamba2", attn_layers="1")
    reader = _export(tmp_path / "xatl", tmp_path / "out")
    keys = _keys(reader)
    assert keys["granitehybrid.embedding_scale"] == 12.0 and keys["granitehybrid.logit_scale"] == 8.0
    assert keys["granitehybrid.residual_scale"] == pytest.approx(0.22)
    assert keys["granitehybrid.attention.scale"] == 0.0625
    assert {"blk.0.ffn_up.bias", "blk.0.ffn_gate.bias", "blk.0.ffn_down.bias"} <= set(_tensors(reader))
    biased = save_family(tmp_path / "biased", "granite", spec)  # q/k/v biases: the Mamba2 in_proj takes one
    (biased / "tokenizer.json").write_bytes((conversions["source"] / "tokenizer.json").read_bytes())
    line = error_line(invoke("convert", biased, "--to", "mamba2", "--format", "gguf", "--out", tmp_path / "refused"))
    assert "the Mamba2 in_proj or out_proj has a bias; llama.cpp's granitehybrid's has none" in line


def test_q_and_k_rows_are_permuted_so_llama_cpps_pairwise_rope_gives_the_same_scores() -> None:
    """xatl (Llama) rotates halves (i, i + d/2); llama.cpp's granitehybrid rope rotates adjacent pairs (2i, 2i+1)."""
    from xatl_convert.export.gguf import _halves_to_pairs

    heads, head_dim, hidden, position = 2, 8, 12, 5.0
    torch.manual_seed(0)
    wq, wk, x = torch.randn(heads * head_dim, hidden), torch.randn(heads * head_dim, hidden), torch.randn(hidden)
    angle = position * 10000.0 ** (-torch.arange(0, head_dim, 2) / head_dim)

    def halves(v: torch.Tensor) -> torch.Tensor:
        v = v.view(heads, head_dim)
        first, second = v[:, : head_dim // 2], v[:, head_dim // 2 :]
        return torch.cat([first * angle.cos() - second * angle.sin(), second * angle.cos() + first * angle.sin()], 1)

    def pairs(v: torch.Tensor) -> torch.Tensor:
        v = v.view(heads, head_dim // 2, 2)
        even, odd = v[..., 0], v[..., 1]
        return torch.stack([even * angle.cos() - odd * angle.sin(), odd * angle.cos() + even * angle.sin()], -1)

    xatl_scores = (halves(wq @ x) * halves(wk @ x)).sum(-1)
    gguf_q, gguf_k = _halves_to_pairs(wq, head_dim, head_dim), _halves_to_pairs(wk, head_dim, head_dim)
    gguf_scores = (pairs(gguf_q @ x) * pairs(gguf_k @ x)).sum((-1, -2))
    torch.testing.assert_close(gguf_scores, xatl_scores)


def test_zero_groups_padding_computes_the_same_mamba2_model(conversions: dict[str, Path], tmp_path: Path) -> None:
    """The GGUF's Mamba2 tensors, loaded back into an xatl model of llama.cpp's width (expand 2, twice the groups),
    give the xatl model's logits: the appended zero groups add exactly nothing."""
    from transformers import AutoModelForCausalLM

    reader = _export(conversions["mamba2"], tmp_path / "out", "--gguf-type", "f32")
    stored = {t.name: torch.from_numpy(t.data.copy()) for t in reader.tensors}
    xatl = AutoModelForCausalLM.from_pretrained(conversions["mamba2"], dtype=torch.float32, trust_remote_code=True)
    config = xatl.config
    config.mamba2 = {**config.mamba2, "expand": 2, "ngroups": 2 * config.mamba2["ngroups"]}
    wide = type(xatl)(config).eval()
    state = {name: value for name, value in xatl.state_dict().items() if ".mixer." not in name}
    for i in range(config.num_hidden_layers):
        mixer, block = f"model.layers.{i}.mixer.", f"blk.{i}."
        state |= {mixer + "in_proj.weight": stored[block + "ssm_in.weight"],
                  mixer + "conv1d.weight": stored[block + "ssm_conv1d.weight"][:, None, :],
                  mixer + "conv1d.bias": stored[block + "ssm_conv1d.bias"],
                  mixer + "dt_bias": stored[block + "ssm_dt.bias"], mixer + "D": stored[block + "ssm_d"].flatten(),
                  mixer + "A_log": torch.log(-stored[block + "ssm_a"].flatten()),
                  mixer + "norm.weight": stored[block + "ssm_norm.weight"].flatten(),
                  mixer + "out_proj.weight": stored[block + "ssm_out.weight"]}  # fmt: skip
    wide.load_state_dict(state, strict=False)
    ids = torch.randint(0, 320, (1, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ours, theirs = xatl.eval()(ids, use_cache=False).logits, wide(ids, use_cache=False).logits
    torch.testing.assert_close(theirs, ours, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kind", ["f32", "f16", "bf16", "q8_0"])
def test_each_tensor_type_verifies_and_keeps_norms_and_ssm_parameters_f32(
    kind: str, conversions: dict[str, Path], tmp_path: Path
) -> None:
    tensors = _tensors(_export(conversions["hybrid"], tmp_path / "out", "--gguf-type", kind))
    assert tensors["token_embd.weight"][0] == kind.upper() and tensors["blk.1.attn_q.weight"][0] == kind.upper()
    assert tensors["blk.0.ssm_in.weight"][0] == kind.upper() and tensors["blk.0.ffn_down.weight"][0] == kind.upper()
    for name in ("blk.0.ssm_a", "blk.0.ssm_d", "blk.0.ssm_conv1d.weight", "blk.0.ssm_dt.bias", "blk.0.ssm_norm.weight",
                 "blk.0.attn_norm.weight", "output_norm.weight"):  # fmt: skip
        assert tensors[name][0] == "F32", name
    result = invoke("verify", tmp_path / "out", "--json", tmp_path / "report.json")
    assert result.exit_code == 0, result.output
    checks = {c["name"]: c for c in json.loads((tmp_path / "report.json").read_text())["checks"]}
    assert checks["tensors as exported"]["status"] == "pass" and checks["keys as exported"]["status"] == "pass"
    assert checks["logits = xatl model (llama.cpp)"]["status"] in ("skip", "pass")  # llama_cpp does not import in CI
    if kind == "q8_0":  # within Q8_0's bound: half a step, plus the float16 rounding of each block's step
        assert 0.5 < checks["tensors as exported"]["details"]["q8_0_max_error_over_bound"] <= 1


def test_verify_finds_a_changed_gguf_tensor(conversions: dict[str, Path], tmp_path: Path) -> None:
    reader = _export(conversions["hybrid"], tmp_path / "out", "--gguf-type", "f32")
    target = next(t for t in reader.tensors if t.name == "blk.0.ssm_out.weight")
    offset = int(target.data_offset)
    del reader
    with open(tmp_path / "out" / "model.gguf", "r+b") as file:  # one float, one ulp off
        file.seek(offset)
        value = torch.frombuffer(bytearray(file.read(4)), dtype=torch.int32)
        file.seek(offset)
        file.write((value + 1).numpy().tobytes())
    result = invoke("verify", tmp_path / "out", "--json", tmp_path / "report.json")
    assert result.exit_code == 1
    checks = {c["name"]: c for c in json.loads((tmp_path / "report.json").read_text())["checks"]}
    assert checks["tensors as exported"]["details"]["differ"] == ["blk.0.ssm_out.weight"]


@pytest.mark.parametrize("cut", [0, 200, None], ids=["empty", "header cut", "data cut"])
def test_a_damaged_gguf_is_one_line_naming_it(cut: int | None, conversions: dict[str, Path], tmp_path: Path) -> None:
    _export(conversions["hybrid"], tmp_path / "out", "--gguf-type", "f32")
    path = tmp_path / "out" / "model.gguf"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2 if cut is None else cut])
    line = error_line(invoke("verify", tmp_path / "out"))
    assert str(path) in line and "export again" in line


def test_convert_format_gguf_writes_one_file_with_its_record(conversions: dict[str, Path], tmp_path: Path) -> None:
    result = invoke("convert", conversions["source"], "--to", "mamba2", "--attn-layers", "1", "--format", "gguf",
                    "--gguf-type", "q8_0", "--out", tmp_path / "out")  # fmt: skip
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["README.md", "model.gguf", "xatl_manifest.json"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # the scratch xatl folder is gone
    reader = gguf.GGUFReader(tmp_path / "out" / "model.gguf")
    assert _keys(reader)["general.file_type"] == gguf.LlamaFileType.MOSTLY_Q8_0


def test_what_llama_cpp_cannot_compute_is_refused_in_one_line(conversions: dict[str, Path], tmp_path: Path) -> None:
    gpt2 = save_family(tmp_path / "gpt2", "gpt2")
    convert(gpt2, tmp_path / "mamba", to="mamba")
    line = error_line(invoke("export", tmp_path / "mamba", "--format", "gguf", "--out", tmp_path / "a"))
    assert "Mamba (v1) layers" in line and "norm_type is 'layernorm'" in line
    line = error_line(invoke("convert", conversions["source"], "--to", "mamba2", "--set", "mamba2.norm_eps=1e-6",
                             "--format", "gguf", "--out", tmp_path / "b"))  # fmt: skip
    assert "Mamba2 norm eps 1e-06 differs from norm_eps 1e-05" in line
    bare = save_family(tmp_path / "bare", "llama", TINY)  # no tokenizer.json
    line = error_line(invoke("convert", bare, "--to", "mamba2", "--format", "gguf", "--out", tmp_path / "c"))
    assert "no tokenizer.json" in line
    line = error_line(invoke("export", conversions["mamba2"], "--format", "gguf", "--gguf-type", "q4_k",
                             "--out", tmp_path / "d"))  # fmt: skip
    assert "--gguf-type 'q4_k'" in line and "q8_0" in line
    line = error_line(invoke("export", conversions["mamba2"], "--format", "bamba", "--gguf-type", "f16",
                             "--out", tmp_path / "e"))  # fmt: skip
    assert "--gguf-type is for --format gguf" in line
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bare", "gpt2", "mamba"]  # nothing written


def test_pre_tokenizers_are_named_from_what_tokenizer_json_does() -> None:
    from xatl_convert.export.gguf_vocab import PRE_TOKENIZERS, pre_tokenizer_signature

    byte_level = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True}
    smollm = {"type": "Sequence", "pretokenizers": [{"type": "Digits", "individual_digits": True}, byte_level]}
    assert PRE_TOKENIZERS[pre_tokenizer_signature(byte_level)] == "gpt-2"
    assert PRE_TOKENIZERS[pre_tokenizer_signature(smollm)] == "smollm"
    assert pre_tokenizer_signature({"type": "Metaspace", "replacement": "▁"}) is None
