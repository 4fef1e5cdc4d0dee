"""`xatl eval`: held-out loss and perplexity of a model and its teacher on the user's text, and the gap recovered."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from tests.bad_input import error_line, invoke
from tests.conftest import EXAMPLE_CHECKPOINT
from xatl_convert.conversion import convert
from xatl_convert.training.evaluate import gap_recovered

pytest.importorskip("datasets")

TEXT = "\n\n".join(
    f"Section {i}: the parser reads the file, checks each field and reports line {i}." for i in range(300)
)


@pytest.fixture(scope="module")
def converted(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("eval") / "out"
    convert(EXAMPLE_CHECKPOINT, out)
    return out


def test_eval_scores_model_and_teacher_on_the_held_out_split(converted: Path, tmp_path: Path) -> None:
    (tmp_path / "text.txt").write_text(TEXT)
    report = tmp_path / "eval.json"
    args = ["eval", str(converted), "--data", str(tmp_path / "text.txt"), "--teacher", str(EXAMPLE_CHECKPOINT),
            "--block-size", "32", "--json", str(report)]  # fmt: skip
    result = invoke(*args)
    assert result.exit_code == 0, result.output
    assert "teacher" in result.stdout and "no starting loss in the manifest" in result.stdout
    data = json.loads(report.read_text())
    model, teacher = data["losses"]["model"], data["losses"]["teacher"]
    assert model["tokens"] == teacher["tokens"] > 0  # the same held-out tokens for both
    assert math.isclose(model["perplexity"], math.exp(model["loss"]), rel_tol=1e-9)
    assert all(0 < scored["loss"] < math.log(4096) for scored in (model, teacher))  # better than uniform
    assert data["gap_recovered"] is None


def test_split_all_scores_every_document_of_a_text_that_never_trained(converted: Path, tmp_path: Path) -> None:
    (tmp_path / "text.txt").write_text(TEXT)
    scored = {}
    for split in ("held-out", "all"):
        report = tmp_path / f"{split}.json"
        args = ["eval", str(converted), "--data", str(tmp_path / "text.txt"), "--block-size", "32",
                "--max-blocks", "100000", "--split", split, "--json", str(report)]  # fmt: skip
        result = invoke(*args)
        assert result.exit_code == 0, result.output
        scored[split] = json.loads(report.read_text())
    assert scored["all"]["split"] == "all" and scored["held-out"]["split"] == "held_out"
    # about 5% of the documents are held out; all of them is the whole text, about twenty times more tokens
    held_out, everything = (scored[s]["losses"]["model"]["tokens"] for s in ("held-out", "all"))
    assert 10 * held_out < everything
    line = error_line(invoke("eval", converted, "--data", tmp_path / "text.txt", "--split", "train"))
    assert line == "error: --split train: input should be 'held-out' or 'all'"


def test_gap_recovered_reads_the_start_from_the_manifest(converted: Path, tmp_path: Path) -> None:
    import shutil

    folder = Path(shutil.copytree(converted, tmp_path / "student"))
    manifest = json.loads((folder / "xatl_manifest.json").read_text())
    (tmp_path / "text.txt").write_text(TEXT)
    measured = {"start_loss": 9.0, "data": {"source": str(tmp_path / "text.txt")},
                "settings": {"block_size": 32, "eval_blocks": 32}}  # fmt: skip
    (folder / "xatl_manifest.json").write_text(json.dumps({**manifest, "distillation": measured}))
    (tmp_path / "text.txt").write_text(TEXT)
    report = tmp_path / "eval.json"
    args = ["eval", str(folder), "--data", str(tmp_path / "text.txt"), "--teacher", str(EXAMPLE_CHECKPOINT),
            "--block-size", "32", "--json", str(report)]  # fmt: skip
    assert invoke(*args).exit_code == 0
    data = json.loads(report.read_text())
    now, teacher = data["losses"]["model"]["loss"], data["losses"]["teacher"]["loss"]
    assert data["gap_recovered"] == pytest.approx((9.0 - now) / (9.0 - teacher))
    args[args.index("--block-size") + 1] = "64"  # other blocks than the start's: no gap, and why
    result = invoke(*args)
    assert "gap recovered: n/a (the start was measured on other blocks" in result.stdout
    assert gap_recovered(9.0, 9.0, 3.0) == 0.0 and gap_recovered(9.0, 3.0, 3.0) == 1.0
    assert gap_recovered(3.0, 5.0, 4.0) is None  # a start not above the teacher has no gap to recover


def test_eval_errors_are_one_line(converted: Path, tmp_path: Path) -> None:
    line = error_line(invoke("eval", converted, "--data", tmp_path / "missing.txt"))
    assert f"{tmp_path / 'missing.txt'}: no such file or folder" in line
    (tmp_path / "tiny.txt").write_text("too short")
    line = error_line(invoke("eval", converted, "--data", tmp_path / "tiny.txt"))
    assert "less than one block of 256" in line
