"""Verify on deep bf16 models with large activations, block by block: real conversions pass every check in bf16
and fp32, and an injected bug or a wrong mapping fails, naming the first layer that diverges.

The deep model is a 24-layer random Llama whose residual branches are scaled up, so that its hidden states grow
into the hundreds through depth, as real checkpoints' do; bf16 weights, as real checkpoints ship.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM
from typer.testing import CliRunner

from xatl_convert.cli import app
from xatl_convert.conversion import convert
from xatl_convert.mapping import builtin_mappings
from xatl_convert.models import modeling_xatl
from xatl_convert.verify import verify
from xatl_convert.verify.readers import PlannedTensors
from xatl_convert.verify.streaming import LayerCall, StreamedModel

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "pythia-tiny"
DEEP_LAYERS = 24
TWIN, DECODING = "source twin = source", "incremental decoding = full forward"


@pytest.fixture(scope="module")
def deep_llama(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 24-layer bf16 Llama (GQA, untied head) whose activations grow to hundreds through depth."""
    folder = tmp_path_factory.mktemp("deep") / "llama"
    config = LlamaConfig(
        vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=DEEP_LAYERS, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=256, tie_word_embeddings=False,
    )  # fmt: skip
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).eval()
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "norm" in name:
                parameter.normal_(1.0, 0.2)  # norms that a wrong rule would visibly misplace
            elif "embed" in name:
                parameter.normal_(0.0, 1.0)
            else:  # trained-network scale, and residual branches that add up through depth
                parameter.normal_(0.0, parameter.shape[1] ** -0.5)
                if name.endswith(("down_proj.weight", "o_proj.weight")):
                    parameter.mul_(4.0)
        model.model.layers[1].mlp.down_proj.weight[3] *= 30  # a massive-activation channel, as in real LLMs
        hidden = model(torch.randint(0, 256, (1, 64)), output_hidden_states=True).hidden_states
    assert hidden[12].abs().max() > 20 * hidden[12].abs().median() > 100, "the fixture needs large activations"
    model.to(torch.bfloat16).save_pretrained(folder)
    return folder


@pytest.mark.parametrize(("target", "dtype"), [("mamba", None), ("mamba2", torch.float32)])
def test_deep_bf16_conversion_passes_every_check(deep_llama: Path, tmp_path: Path, target: str, dtype) -> None:
    out = tmp_path / "out"
    convert(deep_llama, out, to=target, attn_layers="paper", dtype=dtype)
    report = verify(out)
    assert report.passed, [check for check in report.checks if check.status != "pass"]
    assert all(check.status == "pass" for check in report.checks)
    twin, decoding = report.check(TWIN), report.check(DECODING)
    assert len(twin.details["per_layer"]) == DEEP_LAYERS and len(decoding.details["per_layer"]) == DEEP_LAYERS
    # rounding only: far below the bound, which a bug exceeds by orders of magnitude (tests below)
    assert twin.details["worst"]["error"] <= 1e-5 and decoding.details["worst"]["error"] <= 1e-5


def test_float64_separates_logic_from_rounding(deep_llama: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    convert(deep_llama, out, to="mamba2", attn_layers="paper")
    decoding = verify(out, precision="float64", layers=6).check(DECODING)
    assert decoding.status == "pass" and decoding.bound == "per layer, relative ≤ 1e-10"
    assert max(decoding.details["per_layer"]) <= 1e-12  # cache paths and full scan agree to float64 rounding


def test_a_wrong_cache_update_fails_decoding_at_the_first_lci_layer(
    neox_checkpoint: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = tmp_path / "out"
    convert(neox_checkpoint, out, attn_layers="0")
    forgetful = modeling_xatl._causal_conv_silu
    monkeypatch.setattr(  # the conv window from the cache is dropped: decoding restarts the convolution
        modeling_xatl, "_causal_conv_silu", lambda x, conv, previous: forgetful(x, conv, None)
    )
    report = verify(out, precision="float64")
    decoding = report.check(DECODING)
    assert decoding.status == "fail" and not report.passed
    assert decoding.details["first_divergence"]["where"] == "layer 1"  # layer 0 is attention: its cache is right
    assert decoding.details["first_divergence"]["error"] > 1e-3
    assert decoding.value.startswith("diverges at layer 1 (mamba)")


@pytest.mark.parametrize(
    ("layer", "damage"),
    [
        (5, lambda name, tensor: tensor.t().contiguous() if name.endswith("5.mlp.fc2.weight") else tensor),
        (3, lambda name, tensor: tensor - 1 if name.endswith("3.mlp_norm.weight") else tensor),  # offset lost
    ],
    ids=["transposed-transfer", "missing-norm-offset"],
)
def test_an_injected_twin_bug_names_the_layer_it_is_in(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, layer: int, damage
) -> None:
    source = _square_llama(tmp_path / "source")
    out = tmp_path / "out"
    convert(source, out)
    produce = PlannedTensors.__call__
    monkeypatch.setattr(PlannedTensors, "__call__", lambda self, name: damage(name, produce(self, name)))
    twin = verify(out).check(TWIN)
    assert twin.status == "fail"
    assert twin.details["first_divergence"]["where"] == f"layer {layer}"
    assert twin.details["first_divergence"]["error"] > 1e-3
    assert max(twin.details["per_layer"][:layer]) <= 1e-5  # the layers before it are still exact


def _square_llama(folder: Path) -> Path:
    """A small Llama whose MLP is square (intermediate = hidden), so that a transposed down_proj still fits."""
    config = LlamaConfig(vocab_size=128, hidden_size=32, intermediate_size=32, num_hidden_layers=6,
                         num_attention_heads=4, max_position_embeddings=128)  # fmt: skip
    torch.manual_seed(1)
    model = LlamaForCausalLM(config)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "norm" in name:
                parameter.normal_(1.0, 0.2)
    model.save_pretrained(folder)
    return folder


def test_a_mapping_that_forgets_parallel_residual_fails_a_pure_mamba_conversion(tmp_path: Path, make_neox) -> None:
    """The issue's case: such a mapping used to pass verify whenever the output had LCI layers."""
    source = make_neox(use_parallel_residual=True)
    text = builtin_mappings()["gpt-neox-to-mamba"].read_text()
    wrong = tmp_path / "forgetful.yaml"
    wrong.write_text(text.replace("parallel_residual: ${source.use_parallel_residual}", "parallel_residual: false"))
    out = tmp_path / "out"
    convert(source, out, mapping=wrong)
    report = verify(out)
    assert report.check("transfers exact").status == "pass"  # every tensor is right: only the skeleton is wrong
    twin = report.check(TWIN)
    assert twin.status == "fail" and twin.details["first_divergence"]["where"] == "layer 0"
    assert twin.value.startswith("diverges at layer 0")


def test_a_mapping_changed_since_conversion_skips_the_twin_with_the_reason(tmp_path: Path, make_neox) -> None:
    source = make_neox()
    mapping = tmp_path / "mine.yaml"
    mapping.write_text(builtin_mappings()["gpt-neox-to-mamba"].read_text().replace("name: gpt-neox", "name: mine"))
    out = tmp_path / "out"
    convert(source, out, mapping=mapping)
    mapping.write_text(mapping.read_text() + "\n# edited\n")
    twin = verify(out).check(TWIN)
    assert twin.status == "skip" and "has changed since" in twin.value and str(mapping) in twin.value


def test_streaming_holds_one_block_at_a_time(deep_llama: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    convert(deep_llama, out)
    from xatl_convert.sources.checkpoint import open_checkpoint
    from xatl_convert.verify.passes import Run
    from xatl_convert.verify.readers import CheckpointTensors

    tensors = open_checkpoint(out)
    run = Run(verify.__globals__["read_output_config"](out), torch.randint(0, 256, (1, 32)), torch.float32,
              torch.device("cpu"), None)  # fmt: skip
    stream = StreamedModel(run.xatl_skeleton(), CheckpointTensors(tensors), DEEP_LAYERS)
    loaded_blocks: list[int] = []

    def count(call: LayerCall) -> None:
        loaded = [i for i, block in enumerate(stream.blocks) if next(block.parameters()).device.type != "meta"]
        loaded_blocks.append(len(loaded))
        assert loaded == [call.index]
        assert stream.model.lm_head.weight.device.type == "meta"  # the head is loaded only when it runs

    logits = stream.forward(run.input_ids, on_layer=count)
    assert logits is not None and loaded_blocks == [1] * DEEP_LAYERS
    assert all(parameter.device.type == "meta" for block in stream.blocks for parameter in block.parameters())
    block_bytes = sum(p.numel() * 4 for p in stream.blocks[0].parameters())
    head_bytes = stream.model.lm_head.weight.numel() * 4
    assert stream.peak_unit_bytes == max(block_bytes, head_bytes)


def test_cli_layers_and_text_options(tmp_path: Path) -> None:
    out = tmp_path / "out"
    convert(EXAMPLE, out)
    text = tmp_path / "mine.txt"
    text.write_text("The quick brown fox jumps over the lazy dog. " * 8)
    runner = CliRunner()
    args = ["verify", str(out), "--layers", "2", "--text", str(text), "--json", str(tmp_path / "r.json")]
    result = runner.invoke(app, args, prog_name="xatl")
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["sample"] == {"tokens": 161, "text": str(text)}  # every token of the text, not the sample
    checks = {check["name"]: check for check in report["checks"]}
    assert len(checks[TWIN]["details"]["per_layer"]) == 2 and len(checks[DECODING]["details"]["per_layer"]) == 2
    assert checks["logits finite"]["status"] == "skip" and "--layers 2" in checks["logits finite"]["value"]
    bad = tmp_path / "latin1.txt"
    bad.write_bytes(b"caf\xe9")
    result = runner.invoke(app, ["verify", str(out), "--text", str(bad)], prog_name="xatl")
    assert result.exit_code == 2 and f"--text {bad}: not UTF-8 text" in result.stderr
    result = runner.invoke(app, ["verify", str(out), "--layers", "0"], prog_name="xatl")
    assert result.exit_code == 2 and "--layers 0: expected a number of blocks from 1 to 4" in result.stderr


def test_a_mapping_that_drops_a_tensor_the_source_uses_has_no_twin(neox_checkpoint: Path) -> None:
    from dataclasses import replace

    from xatl_convert.conversion import plan_conversion
    from xatl_convert.verify.twin import NoTwin, source_skeleton, unusable_reason

    plan = plan_conversion(neox_checkpoint, attn_layers="all")
    model, layers, _ = source_skeleton(plan.source, torch.float32)
    unusable_reason(plan, model, layers)  # the built-in mapping uses every source parameter
    dropping = replace(plan, dropped={**plan.dropped, "gpt_neox.layers.2.attention.dense.bias": "no bias in xatl"})
    with pytest.raises(NoTwin, match=r"no place for source tensor gpt_neox\.layers\.2\.attention\.dense\.bias"):
        unusable_reason(dropping, model, layers)
    initialising = replace(plan, tensors=[replace(plan.tensors[3], status="initialised", strategy="default")])
    with pytest.raises(NoTwin, match=r"initialises .* even with every layer kept as attention"):
        unusable_reason(initialising, model, layers)


def test_a_source_transformers_cannot_build_skips_the_twin_with_the_reason(
    neox_checkpoint: Path, tmp_path: Path
) -> None:
    import shutil

    out = tmp_path / "out"
    convert(neox_checkpoint, out)
    source = Path(shutil.copytree(neox_checkpoint, tmp_path / "source"))
    config = json.loads((source / "config.json").read_text())
    (source / "config.json").write_text(json.dumps({**config, "model_type": "frobnicator"}))
    report = verify(out, source)
    twin = report.check(TWIN)
    assert twin.status == "skip" and "transformers has no model class for the source" in twin.value
    assert report.check("transfers exact").status == "pass" and report.passed


def test_prefetch_is_a_hint_that_never_fails(neox_checkpoint: Path, tmp_path: Path) -> None:
    from xatl_convert.sources import resolve_source

    checkpoint = resolve_source(neox_checkpoint)
    names = list(checkpoint.tensors)
    checkpoint.prefetch([*names, "no.such.tensor"])  # unknown names are the read's to report, not the hint's
    moved = tmp_path / "moved"
    checkpoint.path.rename(moved)
    try:
        checkpoint.prefetch(names)  # files gone: nothing to hint, no error
    finally:
        moved.rename(checkpoint.path)


def test_progress_reports_each_pass_block_by_block(neox_checkpoint: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    convert(neox_checkpoint, out)
    seen: list[tuple[str, int, int]] = []
    verify(out, layers=3, progress=lambda label, block, total: seen.append((label, block, total)))
    by_pass: dict[str, list[int]] = {}
    for label, block, total in seen:
        assert total == 3  # --layers 3: the bars end where the passes stop
        by_pass.setdefault(label, []).append(block)
    assert by_pass == {"converted model": [1, 2, 3], "source": [1, 2, 3], "source twin": [1, 2, 3]}
