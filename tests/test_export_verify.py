"""`xatl verify` on an export: transformers' own class against the xatl model, both streamed one block at a time,
in float32 or float64, against the bound measured by benchmarks/export_verify_bound.py."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch import nn

from tests.bad_input import invoke
from tests.test_export import HYBRID_READY, LLAMA
from tests.test_families import save_family
from xatl_convert.conversion import convert
from xatl_convert.export import export_folder
from xatl_convert.verify import verify
from xatl_convert.verify.export_logits import check_name
from xatl_convert.verify.passes import BOUNDS
from xatl_convert.verify.streaming import StreamedModel


@pytest.fixture(scope="module")
def hybrid_export(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A Granite-shaped source converted with layer 1 kept as attention, exported to GraniteMoeHybrid."""
    folder = tmp_path_factory.mktemp("hybrid")
    source = save_family(folder / "source", "granite", HYBRID_READY)
    convert(source, folder / "xatl", to="mamba2", attn_layers="1")
    export_folder(folder / "xatl", folder / "granite", "granitemoehybrid")
    return folder / "granite"


@pytest.mark.parametrize("precision", ["float32", "float64"])
def test_an_export_verifies_against_its_xatl_model_in_either_precision(
    hybrid_export: Path, precision: str, tmp_path: Path
) -> None:
    dtype = getattr(torch, precision)
    result = invoke("verify", hybrid_export, "--precision", precision, "--json", tmp_path / "report.json")
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "report.json").read_text())
    logits = {c["name"]: c for c in report["checks"]}[check_name("granitemoehybrid")]
    details = logits["details"]
    assert logits["status"] == "pass" and details["precision"] == precision
    # no tokenizer: fixed random ids, as many as the default export length allows (1024, capped by the positions)
    assert report["sample"]["tokens"] == details["tokens"] == 128
    assert details["relative_error"] <= details["bound"] == BOUNDS[dtype].export
    assert len(details["per_layer"]) == 2


def test_an_export_that_drops_a_multiplier_fails_with_the_measured_error_and_the_bound(
    hybrid_export: Path, tmp_path: Path
) -> None:
    """A config bug an exporter could write (Granite's residual_multiplier left at its default): the tensors are all
    right, the logits are not, and the report says by how much, against which bound, and from which block."""
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(hybrid_export, broken)
    config = json.loads((broken / "config.json").read_text())
    config["residual_multiplier"] = 1.0
    (broken / "config.json").write_text(json.dumps(config))
    report = verify(broken)
    assert report.check("tensors as exported").status == "pass"
    logits = report.check(check_name("granitemoehybrid"))
    error, bound = logits.details["relative_error"], logits.details["bound"]
    assert logits.status == "fail" and error > 100 * bound, logits
    assert logits.value.startswith(f"{error:.1e}") and f"{bound:.1e}" in logits.bound
    assert logits.details["first_block_over_bound"]["where"] == "layer 0"


def test_export_verify_streams_one_block_of_each_model_at_a_time(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Neither model is ever loaded whole: each is built on the meta device and holds at most one block's tensors."""
    from transformers import AutoModelForCausalLM

    source = save_family(tmp_path / "source", "llama", LLAMA)
    convert(source, tmp_path / "xatl", to="mamba2")
    export_folder(tmp_path / "xatl", tmp_path / "bamba", "bamba")

    def whole(*args: object, **kwargs: object) -> None:
        raise AssertionError("verify loaded a whole model")

    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", whole)
    streamed: dict[str, int] = {}  # model class → the most blocks it held at once
    load = StreamedModel._load

    def counting_load(self: StreamedModel, module: nn.Module, prefix: str, recurse: bool = True) -> None:
        load(self, module, prefix, recurse)
        held = sum(any(not p.is_meta for p in block.parameters()) for block in self.blocks)
        name = type(self.model).__name__
        streamed[name] = max(streamed.get(name, 0), held)

    monkeypatch.setattr(StreamedModel, "_load", counting_load)
    report = verify(tmp_path / "bamba", max_tokens=64)
    assert report.passed, report
    assert streamed == {"XatlForCausalLM": 1, "BambaForCausalLM": 1}
