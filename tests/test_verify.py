"""`xatl verify`: each check passes on a good conversion and fails on a damaged one."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from xatl_convert.cli import app
from xatl_convert.conversion import convert
from xatl_convert.verify import verify


@pytest.mark.parametrize("parallel_residual", [True, False])
@pytest.mark.parametrize("rotary_pct", [1.0, 0.25])
def test_all_attention_conversion_reproduces_source_logits(
    make_neox, tmp_path: Path, parallel_residual: bool, rotary_pct: float
) -> None:
    source = make_neox(use_parallel_residual=parallel_residual, rotary_pct=rotary_pct)
    out = tmp_path / "out"
    convert(source, out, attn_layers="all")
    report = verify(out, source)
    exactness = report.check("source twin = source")
    assert exactness.status == "pass"
    assert exactness.details["output_logits"] <= 1e-5  # the written all-attention model itself
    assert exactness.details["logits"] <= 1e-5 and max(exactness.details["per_layer"]) <= 1e-5
    losses = report.check("sample losses finite").details["losses"]
    assert math.isclose(losses["converted"], losses["source"], rel_tol=1e-5)
    assert report.passed


def test_pure_mamba_reports_losses_and_skips_exactness(neox_checkpoint: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    convert(neox_checkpoint, out)
    report = verify(out)  # the source path recorded in the manifest is used
    assert report.source == str(neox_checkpoint)
    twin = report.check("source twin = source")  # the twin runs for every conversion, LCI layers or not
    assert twin.status == "pass" and len(twin.details["per_layer"]) == 4 and "output_logits" not in twin.details
    losses = report.check("sample losses finite").details["losses"]
    assert set(losses) == {"converted", "from_scratch", "source"}
    assert all(math.isfinite(value) for value in losses.values())
    assert report.check("transfers exact").value == "44/44 equal"
    assert report.passed


def _damage(out: Path, name: str, value: float) -> None:
    state = load_file(out / "model.safetensors")
    state[name] = state[name].clone()
    state[name].view(-1)[0] = value
    save_file(state, out / "model.safetensors", metadata={"format": "pt"})


def test_a_changed_transferred_tensor_fails_verify_with_exit_1(neox_checkpoint: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    convert(neox_checkpoint, out)
    _damage(out, "model.layers.1.mlp.fc1.weight", 0.123)
    report_path = tmp_path / "report.json"
    result = CliRunner().invoke(app, ["verify", str(out), "--json", str(report_path)])
    assert result.exit_code == 1
    report = json.loads(report_path.read_text())
    assert report["passed"] is False
    transfers = next(check for check in report["checks"] if check["name"] == "transfers exact")
    assert transfers["status"] == "fail"
    assert transfers["details"]["mismatched"] == ["model.layers.1.mlp.fc1.weight"]


def test_a_non_finite_tensor_fails_the_tensor_check(neox_checkpoint: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    convert(neox_checkpoint, out)
    _damage(out, "model.layers.0.mixer.D", float("nan"))
    report = verify(out)
    tensors = report.check("tensors as planned")
    assert tensors.status == "fail"
    assert tensors.details["problems"] == ["model.layers.0.mixer.D: non-finite values"]
    assert not report.passed


def test_hybrid_attention_layer_computes_what_the_source_layer_computed(make_neox, tmp_path: Path) -> None:
    """Fed the same input, a kept attention layer's mixer gives the source layer's attention output."""
    from transformers import GPTNeoXForCausalLM

    from xatl_convert.models import XatlForCausalLM, rotary_tables

    source = make_neox()
    out = tmp_path / "out"
    convert(source, out, attn_layers="2")
    ours = XatlForCausalLM.from_pretrained(out).eval()
    theirs = GPTNeoXForCausalLM.from_pretrained(source).eval()
    captured: dict[str, torch.Tensor] = {}

    def capture(module: torch.nn.Module, args: tuple, kwargs: dict, output: object) -> None:
        captured["input"] = kwargs.get("hidden_states", args[0] if args else None)
        captured["output"] = output[0] if isinstance(output, tuple) else output

    theirs.gpt_neox.layers[2].attention.register_forward_hook(capture, with_kwargs=True)
    ids = torch.arange(3, 15).unsqueeze(0)
    with torch.no_grad():
        theirs(ids)
        position_embeddings = rotary_tables(ours.config, torch.arange(12).unsqueeze(0), torch.float32)
        actual = ours.model.layers[2].mixer(captured["input"], position_embeddings)
    assert (actual - captured["output"]).abs().max() <= 1e-5


def test_real_pythia_config_keys_convert_exactly(make_neox, tmp_path: Path) -> None:
    """Pythia's config.json on the Hub uses the old names rotary_pct and rotary_emb_base."""
    source = make_neox(rotary_pct=0.25)
    config = json.loads((source / "config.json").read_text())
    rope = config.pop("rope_parameters")
    config.update(rotary_pct=rope["partial_rotary_factor"], rotary_emb_base=20000, architectures=["GPTNeoXForCausalLM"])
    (source / "config.json").write_text(json.dumps(config))
    out = tmp_path / "out"
    plan = convert(source, out, attn_layers="all")
    assert plan.target_config.rope_parameters["partial_rotary_factor"] == 0.25
    assert plan.target_config.rope_parameters["rope_theta"] == 20000
    assert verify(out, source).check("source twin = source").details["output_logits"] <= 1e-5
