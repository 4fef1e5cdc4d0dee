"""`--attn-layers auto:K` and `xatl select-layers`: layers ranked by measurement, deterministic, recorded.

The source is a tiny random Llama whose layer LOUD has an attention output eight times louder than the others: a
brief align cannot make a new mixer say all of it, so giving that layer back its attention closes the most of the
student's KL to the teacher, and it must rank first. Mamba2 with 16-token chunks keeps every run to about a second.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from tests.bad_input import error_line, invoke, tree_digest
from tests.conftest import EXAMPLE_CHECKPOINT
from xatl_convert.conversion import plan_conversion
from xatl_convert.in_memory import model_from_plan, planned_modules
from xatl_convert.layer_selection.restoration import RestorationKL, kl_sum, restored
from xatl_convert.layer_selection.select import select_layers, teacher_log_probs
from xatl_convert.manifest import read_manifest
from xatl_convert.settings import LayerSelectionSettings

LOUD = 2  # the layer whose attention matters most: not 0 or 1, which matter most in a random 4-layer model anyway
LAYERS = 4
SMALL_CHUNKS = {"mamba2.chunk_size": 16}
SETTINGS = LayerSelectionSettings(keep=2, select_tokens=1024, block_size=64)


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny Llama (the example's tokenizer) with one loud attention layer, and text to measure on."""
    root = tmp_path_factory.mktemp("layer-selection")
    config = LlamaConfig(vocab_size=4096, hidden_size=32, intermediate_size=64, num_hidden_layers=LAYERS,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                         tie_word_embeddings=False)  # fmt: skip
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    with torch.no_grad():  # trained-network scale, so that every attention output carries a function
        for parameter in model.parameters():
            if parameter.dim() == 2:
                parameter.normal_(0.0, parameter.shape[1] ** -0.5)
        model.model.layers[LOUD].self_attn.o_proj.weight.mul_(16.0)
    model.save_pretrained(root / "source")
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(EXAMPLE_CHECKPOINT / name, root / "source" / name)
    # a fixed text (README and docs as of one commit), so that the docs changing cannot move the scores
    shutil.copy(Path(__file__).parent / "fixtures" / "layer_selection_text.txt", root / "text.txt")
    return root


@pytest.fixture(scope="module")
def selection(world: Path):
    return select_layers(world / "source", str(world / "text.txt"), SETTINGS, to="mamba2", overrides=SMALL_CHUNKS)


def test_the_layer_whose_restoration_matters_most_ranks_first_and_is_picked_first(selection) -> None:
    assert [entry.layer for entry in selection.scores] == list(range(LAYERS))  # every layer measured
    ranking = selection.ranking()
    assert ranking[0].layer == LOUD and ranking[0].score > 1.5 * ranking[1].score > 0, ranking
    for entry in selection.scores:  # a score is the measured KL drop from the all-LCI student
        assert entry.score == pytest.approx(selection.baseline_kl - entry.kl)
    assert selection.picks[0].layer == LOUD and len(selection.chosen) == 2
    assert selection.picks[1].kl < selection.picks[0].kl < selection.baseline_kl  # each pick lowers the KL
    budget = selection.budget
    assert budget.tokens == budget.align_tokens + budget.score_tokens <= SETTINGS.select_tokens
    assert (budget.align_tokens, budget.score_tokens, budget.align_steps) == (896, 128, 14)


def test_a_selection_is_deterministic_and_auto_k_is_the_start_of_auto_k_plus_one(world: Path, selection) -> None:
    again = select_layers(world / "source", str(world / "text.txt"), SETTINGS.model_copy(update={"keep": 3}),
                          to="mamba2", overrides=SMALL_CHUNKS)  # fmt: skip
    assert again.scores == selection.scores and again.baseline_kl == selection.baseline_kl
    assert again.picks[:2] == selection.picks


def test_restoring_every_layer_gives_the_teacher_back_and_a_pass_from_a_block_equals_a_whole_pass(
    world: Path,
) -> None:
    """The measurement's two shortcuts are exact: a restored layer is the source's attention, and a candidate that
    runs only from its own block (on the input one whole pass gave it) gets the whole pass's KL."""
    options = {"to": "mamba2", "overrides": SMALL_CHUNKS, "dtype": torch.float32}
    student = model_from_plan(plan_conversion(world / "source", attn_layers="none", **options))
    twin = plan_conversion(world / "source", attn_layers="all", **options)
    modules = planned_modules(twin, [f"model.layers.{index}.mixer" for index in range(LAYERS)])
    attention = {index: modules[f"model.layers.{index}.mixer"] for index in range(LAYERS)}
    teacher = LlamaForCausalLM.from_pretrained(world / "source", dtype=torch.float32).eval()
    ids = torch.randint(0, 4096, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad(), restored(student, attention, range(LAYERS)):
        logits = student(input_ids=ids, use_cache=False).logits
    assert torch.allclose(logits, teacher(input_ids=ids).logits, atol=1e-5)
    assert student.config.layer_types == ["mamba2"] * LAYERS  # and the student is put back as it was
    measure = RestorationKL(student, attention, teacher_log_probs(teacher, ids))
    _, measured = measure.measure([0], [1, 2, 3])
    for candidate in (1, 2, 3):
        with torch.no_grad(), restored(student, attention, [0, candidate]):
            whole = kl_sum(student(input_ids=ids, use_cache=False).logits, teacher_log_probs(teacher, ids)[0][1])
        assert measured[candidate] == pytest.approx(whole / ids.numel(), rel=1e-5)


def _convert_auto(world: Path, out: Path, *extra: str) -> list[str | Path]:
    return ["convert", world / "source", "--to", "mamba2", "--attn-layers", "auto:2", "--data", world / "text.txt",
            "--select-tokens", "1024", "--set", "mamba2.chunk_size=16", "--out", out, *extra]  # fmt: skip


def test_convert_auto_keeps_the_ranked_layers_and_records_the_ranking(world: Path, tmp_path: Path) -> None:
    report = tmp_path / "ranking.json"
    result = invoke("select-layers", world / "source", "--to", "mamba2", "--keep", "2", "--data", world / "text.txt",
                    "--select-tokens", "1024", "--set", "mamba2.chunk_size=16", "--json", report)  # fmt: skip
    assert result.exit_code == 0, result.output
    assert "layers ranked for auto:2" in result.stdout
    ranked = json.loads(report.read_text())
    assert ranked["xatl_report"] == "select-layers" and len(ranked["layers"]) == LAYERS
    result = invoke(*_convert_auto(world, tmp_path / "out"))
    assert result.exit_code == 0, result.output
    manifest = read_manifest(tmp_path / "out")
    recorded = manifest["layer_selection"]
    assert manifest["target"]["attention_layers"] == recorded["chosen"] == ranked["chosen"]
    assert [recorded[key] for key in ("layers", "greedy", "budget")] == [
        ranked[key] for key in ("layers", "greedy", "budget")
    ]  # the same measurement, to the bit
    assert recorded["budget"]["tokens"] <= 1024 and recorded["method"] == "restore-kl-greedy"
    kinds = ["attention" if index in recorded["chosen"] else "mamba2" for index in range(LAYERS)]
    assert json.loads((tmp_path / "out" / "config.json").read_text())["layer_types"] == kinds
    card = (tmp_path / "out" / "README.md").read_text()
    assert "## Layer selection" in card and "`--attn-layers auto:2`" in card
    assert sum(line.startswith(f"| {rank} | ") for line in card.splitlines() for rank in range(1, LAYERS + 1)) == LAYERS


def test_a_recorded_choice_that_is_not_what_was_kept_is_a_damaged_manifest(world: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    assert invoke(*_convert_auto(world, out)).exit_code == 0
    manifest = json.loads((out / "xatl_manifest.json").read_text())
    manifest["layer_selection"]["chosen"] = [0, 3] if manifest["target"]["attention_layers"] != [0, 3] else [1, 2]
    (out / "xatl_manifest.json").write_text(json.dumps(manifest))
    line = error_line(invoke("eval", out, "--data", world / "text.txt"))
    assert "layer_selection.chosen" in line and "differs from target.attention_layers" in line


def test_dry_run_prints_the_ranking_and_the_plan_and_writes_nothing(world: Path, tmp_path: Path) -> None:
    before = tree_digest(world)
    result = invoke(*_convert_auto(world, tmp_path / "out", "--dry-run"))
    assert result.exit_code == 0, result.output
    assert "layers ranked for auto:2" in result.stdout and "target tensor" in result.stdout
    assert not (tmp_path / "out").exists() and tree_digest(world) == before
    assert not [path for path in tmp_path.iterdir()]
