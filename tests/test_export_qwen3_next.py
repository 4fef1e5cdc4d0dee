"""`xatl export --format qwen3_next`: a Gated DeltaNet conversion (pure, or a Qwen3 hybrid whose attention keeps its
q/k norms) in transformers' own Qwen3-Next, which loads without remote code, holds every tensor it expects and
computes what the xatl model computes; or one line that names every reason it cannot."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

from tests.bad_input import error_line, invoke
from tests.test_export import LLAMA
from tests.test_families import save_family
from xatl_convert.conversion import convert
from xatl_convert.export import export_folder, qwen3_next
from xatl_convert.models import XatlForCausalLM

# Qwen3-0.6B's shape scaled down, without the family test's sliding window: heads × head_dim (4 × 32) twice
# hidden_size, GQA 2:1, per-head q/k norms, tied
QWEN3 = ("Qwen3ForCausalLM", "Qwen3Config", {
    "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 3, "num_attention_heads": 4,
    "num_key_value_heads": 2, "head_dim": 32, "rms_norm_eps": 1e-6, "rope_theta": 1e6,
    "tie_word_embeddings": True})  # fmt: skip
IDS = torch.randint(0, 256, (2, 72), generator=torch.Generator().manual_seed(0))  # two delta-rule chunks of 64
ROPE = {"partial_rotary_factor": 0.5, "rope_type": "linear", "factor": 2.0}  # half of each head, positions / 2
# case: (source, attn_layers, overrides); llama-grouped has two value heads per key head
CASES: dict[str, tuple[str, str | None, dict[str, Any] | None]] = {
    "qwen3-pure": ("qwen3", None, None),
    "qwen3-hybrid": ("qwen3", "1", None),
    "qwen3-hybrid-rope": ("qwen3", "1", {f"rope_parameters.{key}": value for key, value in ROPE.items()}),
    "llama-pure": ("llama", None, None),
    "llama-grouped": ("llama", None, {"gated_deltanet.num_v_heads": 8}),
}

Export = Callable[[str], tuple[Path, Path]]


@pytest.fixture(scope="module")
def sources(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("sources")
    return {"qwen3": save_family(root / "qwen3", "qwen3", QWEN3), "llama": save_family(root / "llama", "llama", LLAMA)}


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory, sources: dict[str, Path]) -> Export:
    """(xatl folder, its qwen3_next export) of a case, converted and exported once per module."""
    done: dict[str, tuple[Path, Path]] = {}

    def make(case: str) -> tuple[Path, Path]:
        if case not in done:
            source, attn_layers, overrides = CASES[case]
            root = tmp_path_factory.mktemp(case)
            convert(sources[source], root / "xatl", to="gated_deltanet", attn_layers=attn_layers, overrides=overrides)
            _randomise_gated_norms(root / "xatl")
            export_folder(root / "xatl", root / "qwen3-next", format="qwen3_next")
            done[case] = (root / "xatl", root / "qwen3-next")
        return done[case]

    return make


def _randomise_gated_norms(folder: Path) -> None:
    """The Gated DeltaNet's output norm starts at ones: random weights show that it is copied, not zero-centred."""
    weights = load_file(folder / "model.safetensors")
    generator = torch.Generator().manual_seed(1)
    for name, value in weights.items():
        if name.endswith(".mixer.norm.weight"):
            weights[name] = 1 + 0.2 * torch.randn(value.shape, generator=generator)
    save_file(weights, folder / "model.safetensors", metadata={"format": "pt"})


def _models(xatl: Path, export: Path) -> tuple[torch.nn.Module, torch.nn.Module]:
    ours = XatlForCausalLM.from_pretrained(xatl, dtype=torch.float32).eval()
    theirs, info = AutoModelForCausalLM.from_pretrained(export, dtype=torch.float32, output_loading_info=True)
    assert type(theirs).__name__ == "Qwen3NextForCausalLM"
    assert not any(info.values()), info  # no missing, unexpected or mismatched tensor: nothing left at its init
    return ours, theirs.eval()


def _relative_error(ours: torch.nn.Module, theirs: torch.nn.Module) -> float:
    with torch.no_grad():
        reference, logits = ours(IDS, use_cache=False).logits, theirs(IDS, use_cache=False).logits
    return ((logits - reference).norm() / reference.norm()).item()


@pytest.mark.parametrize("case", list(CASES))
def test_export_loads_natively_and_computes_the_same(case: str, exported: Export) -> None:
    xatl, export = exported(case)
    config = json.loads((export / "config.json").read_text())
    assert config["model_type"] == "qwen3_next" and "auto_map" not in config and config["num_experts"] == 0
    rope = json.loads((xatl / "config.json").read_text())["rope_parameters"]
    assert config["rope_parameters"] == {"partial_rotary_factor": 1.0, **rope}  # absent, Qwen3-Next rotates a quarter
    assert config["partial_rotary_factor"] == config["rope_parameters"]["partial_rotary_factor"]
    kept = CASES[case][1]
    expected = ["full_attention" if str(i) == kept else "linear_attention" for i in range(config["num_hidden_layers"])]
    assert config["layer_types"] == expected
    ours, theirs = _models(xatl, export)
    assert all(type(layer.mlp).__name__ == "Qwen3NextMLP" for layer in theirs.model.layers)
    error = _relative_error(ours, theirs)
    print(f"{case}: relative logit error {error:.2e}")
    assert error <= 1e-5


def test_hybrid_attention_gets_zero_gates_a_doubled_o_proj_and_decodes_with_its_cache(exported: Export) -> None:
    xatl, export = exported("qwen3-hybrid")
    weights = load_file(export / "model.safetensors")
    q_proj = weights["model.layers.1.self_attn.q_proj.weight"].view(4, 2, 32, 64)  # per head [query; gate]
    ours = load_file(xatl / "model.safetensors")
    assert torch.equal(q_proj[:, 0].reshape(128, 64), ours["model.layers.1.mixer.q_proj.weight"])
    assert not q_proj[:, 1].any()
    assert torch.equal(
        weights["model.layers.1.self_attn.o_proj.weight"], 2 * ours["model.layers.1.mixer.out_proj.weight"]
    )
    _, theirs = _models(xatl, export)
    with torch.no_grad():  # the export's own cache: a prefix, then one token at a time, against the full forward
        full = theirs(IDS[:1, :12], use_cache=False).logits
        out = theirs(IDS[:1, :8], use_cache=True)
        steps = [out.logits]
        for t in range(8, 12):
            out = theirs(IDS[:1, t : t + 1], cache=out.cache, use_cache=True)
            steps.append(out.logits)
    assert ((torch.cat(steps, dim=1) - full).norm() / full.norm()).item() <= 1e-5
    report = invoke("verify", export, "--json", export.parent / "report.json")
    assert report.exit_code == 0, report.output
    checks = {c["name"]: c for c in json.loads((export.parent / "report.json").read_text())["checks"]}
    assert checks["tensors as exported"]["status"] == "pass"
    assert checks["logits = xatl model (qwen3_next, no remote code)"]["details"]["relative_error"] <= 1e-5


@pytest.mark.parametrize("case", ["qwen3-hybrid", "llama-pure"])
def test_generation_matches_the_xatl_model(case: str, exported: Export) -> None:
    """A pure Gated DeltaNet export generates without a cache (transformers 5's asks an attention layer for the
    length), which its generation_config says; a hybrid with one."""
    xatl, export = exported(case)
    use_cache = json.loads((export / "config.json").read_text())["use_cache"]
    assert use_cache == (case == "qwen3-hybrid")
    if not use_cache:
        assert json.loads((export / "generation_config.json").read_text())["use_cache"] is False
    ours, theirs = _models(xatl, export)
    generated = [model.generate(IDS[:1, :8], max_new_tokens=6, do_sample=False) for model in (ours, theirs)]
    assert torch.equal(generated[0], generated[1])


def test_attention_biases_are_carried_and_a_missing_one_is_zero(sources: dict[str, Path], tmp_path: Path) -> None:
    """Qwen3-Next's one attention_bias covers q, k, v and o: a Qwen3 with biases, all attention, exports exactly
    (the gate's bias is zero too); a projection the xatl layer gives no bias gets zeros."""
    source = save_family(tmp_path / "source", "qwen3", (QWEN3[0], QWEN3[1], {**QWEN3[2], "attention_bias": True}))
    convert(source, tmp_path / "xatl", to="gated_deltanet", attn_layers="all")
    export_folder(tmp_path / "xatl", tmp_path / "qwen3-next", format="qwen3_next")
    assert json.loads((tmp_path / "qwen3-next" / "config.json").read_text())["attention_bias"] is True
    assert _relative_error(*_models(tmp_path / "xatl", tmp_path / "qwen3-next")) <= 1e-5
    config = {**json.loads((tmp_path / "xatl" / "config.json").read_text()), "attention_out_bias": False}
    renamed = dict(qwen3_next.tensors("model.layers.0.mixer.out_proj.weight", torch.ones(64, 128), config))
    assert torch.equal(renamed["model.layers.0.self_attn.o_proj.weight"], torch.full((64, 128), 2.0))
    assert torch.equal(renamed["model.layers.0.self_attn.o_proj.bias"], torch.zeros(64))


def test_a_llama_hybrid_and_a_mamba2_conversion_are_refused_before_writing(
    sources: dict[str, Path], tmp_path: Path
) -> None:
    out = tmp_path / "out"
    line = error_line(invoke("convert", sources["llama"], "--to", "gated-deltanet", "--attn-layers", "1",
                             "--format", "qwen3_next", "--out", out))  # fmt: skip
    assert "cannot be exported as qwen3_next without changing what it computes" in line
    assert "its attention layers have no q/k norm (qk_norm null" in line
    line = error_line(invoke("convert", sources["llama"], "--to", "mamba2", "--format", "qwen3_next", "--out", out))
    assert "it has Mamba2 layers, which qwen3_next cannot hold (formats that can: granitemoehybrid" in line
    assert not out.exists() and sorted(path.name for path in tmp_path.iterdir()) == []


def test_a_folder_with_several_problems_is_refused_with_every_reason(exported: Export, tmp_path: Path) -> None:
    xatl, _ = exported("llama-pure")
    shutil.copytree(xatl, tmp_path / "xatl")
    config = json.loads((tmp_path / "xatl" / "config.json").read_text())
    config.update({
        "layer_types": ["gated_deltanet", "attention", "mamba2"], "hidden_act": "gelu", "residual_multiplier": 0.5,
        "final_logit_softcapping": 30.0, "sliding_window": 4, "rope_interleaved": True, "attention_multiplier": 0.1,
        "gated_deltanet": {**config["gated_deltanet"], "conv_bias": True, "norm_eps": 1e-3},
    })  # fmt: skip
    (tmp_path / "xatl" / "config.json").write_text(json.dumps(config))
    line = error_line(invoke("export", tmp_path / "xatl", "--format", "qwen3_next", "--out", tmp_path / "out"))
    for reason in (
        "it has Mamba2 layers, which qwen3_next cannot hold",
        "residual_multiplier is 0.5; Qwen3-Next needs 1.0",
        "final_logit_softcapping is 30.0; Qwen3-Next needs None",
        "hidden_act 'gelu'",
        "no q/k norm",
        "RoPE on interleaved pairs (rope_interleaved True)",
        "a softmax scale of 0.1 (attention_multiplier)",
        "attention layers [1] attend within a window of 4",
        "gated_deltanet.conv_bias: its conv1d has a bias",
        "gated_deltanet.norm_eps 0.001 is not norm_eps 1e-05",
    ):
        assert reason in line, reason
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("case", ["qwen3-hybrid", "llama-pure"])
def test_verify_judges_an_export_over_the_fixed_bound_by_the_models_own_float32_rounding(
    case: str, exported: Export, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A deep real model's float32 rounding can exceed the fixed bound (SmolLM2-135M's Gated DeltaNet export:
    4.3e-4 against 3e-4, as far from float64 as the xatl model itself): verify then measures the xatl model in
    float64 and passes the export only if it is as close to that as the xatl model's own float32 pass. With the
    fixed bound at 1e-12, every export takes that path: the exact export passes on it, a wrong decay fails on it."""
    from xatl_convert.verify import passes

    monkeypatch.setitem(passes.BOUNDS, torch.float32, passes.Bounds(twin=1e-4, decode=1e-4, export=1e-12))
    _, export = exported(case)
    broken = tmp_path / "broken"
    shutil.copytree(export, broken)
    weights = load_file(broken / "model.safetensors")
    weights["model.layers.0.linear_attn.A_log"] += 0.1
    save_file(weights, broken / "model.safetensors", metadata={"format": "pt"})
    rows = {}
    for folder in (export, broken):
        report = invoke("verify", folder, "--json", tmp_path / f"{folder.name}.json")
        assert (tmp_path / f"{folder.name}.json").is_file(), report.output
        checks = {c["name"]: c for c in json.loads((tmp_path / f"{folder.name}.json").read_text())["checks"]}
        rows[folder.name] = (report.exit_code, checks["logits = xatl model (qwen3_next, no remote code)"])
    code, row = rows[export.name]
    floor = row["details"]["rounding_floor"]
    print(f"{case}: export {floor['export_vs_float64']:.1e}, xatl float32 {floor['xatl_float32_vs_float64']:.1e}")
    assert code == 0 and row["status"] == "pass" and "within the model's own float32 rounding" in row["value"]
    assert floor["xatl_float32_vs_float64"] > 0 and floor["ratio"] <= floor["margin"]
    code, row = rows[broken.name]
    assert code != 0 and row["status"] == "fail" and "beyond the model's own float32 rounding" in row["value"]
    assert row["details"]["rounding_floor"]["ratio"] > 1000
