"""`xatl distill`: align then kd from a conversion to a folder that verify and eval accept, with every stage
recorded; nothing written on bad input."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.bad_input import error_line, invoke, tree_digest
from tests.conftest import EXAMPLE_CHECKPOINT
from xatl_convert.verify import verify

pytest.importorskip("datasets")
pytest.importorskip("accelerate")

ROOT = Path(__file__).resolve().parents[1]


def _distill(distill_student: Path, distill_text: Path, out: Path, *extra: str):
    return invoke("distill", distill_student, "--teacher", EXAMPLE_CHECKPOINT, "--data", distill_text, "--out", out,
                  "--align-steps", "4", "--kd-steps", "3", "--block-size", "32", *extra)  # fmt: skip


def test_distill_writes_a_verifiable_folder_with_each_stage_recorded(
    distill_student: Path, distill_text: Path, tmp_path: Path
) -> None:
    before = tree_digest(distill_student)
    out = tmp_path / "out"
    result = _distill(distill_student, distill_text, out)
    assert result.exit_code == 0, result.output
    assert f"wrote {out}: held-out loss" in result.stdout and "stages: align, kd" in result.stdout
    assert tree_digest(distill_student) == before  # the student folder is read, never written
    kept = {p.name for p in distill_student.iterdir()}
    assert kept | {"distill_align.csv", "distill_kd.csv", "distill_curve.csv"} == {p.name for p in out.iterdir()}
    record = json.loads((out / "xatl_manifest.json").read_text())["distillation"]
    assert [stage["stage"] for stage in record["stages"]] == ["align", "kd"]
    assert record["stages"][0]["tokens"] == 4 * 4 * 32 and record["stages"][1]["steps"] == 3
    assert record["data"]["held_out_blocks"] > 0
    assert all(0 < record[key] < 9 for key in ("teacher_loss", "start_loss", "end_loss"))  # below uniform (8.3)
    with (out / "distill_align.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == 4 and {"mean", "layer_0", "layer_2", "layer_3"} <= set(rows[0])  # layer 1 kept attention
    old, new = load_file(distill_student / "model.safetensors"), load_file(out / "model.safetensors")
    assert not torch.equal(old["model.layers.0.mixer.in_proj.weight"], new["model.layers.0.mixer.in_proj.weight"])
    if record["stages"][1]["lit_unfrozen_at"] is None:  # frozen throughout: the transferred weights are the source's
        assert torch.equal(old["model.layers.2.mlp.fc1.weight"], new["model.layers.2.mlp.fc1.weight"])
    assert torch.equal(old["model.layers.1.mixer.q_proj.weight"], new["model.layers.1.mixer.q_proj.weight"])
    report = verify(out)
    assert report.passed
    transfers = report.check("transfers exact")
    assert transfers.status == "skip" and "trained after conversion by xatl distill (align, kd)" in transfers.value
    assert report.check("source twin = source").status == "pass"  # the mapping is still checked
    eval_json = tmp_path / "eval.json"
    args = [
        "eval",
        out,
        "--data",
        distill_text,
        "--teacher",
        EXAMPLE_CHECKPOINT,
        "--block-size",
        "32",
        "--json",
        eval_json,
    ]
    assert invoke(*args).exit_code == 0
    evaluation = json.loads(eval_json.read_text())
    assert evaluation["start"] == record["start_loss"]  # eval reads where distill started
    assert (evaluation["gap_recovered"] is not None) == (record["start_loss"] > record["teacher_loss"])


def test_distill_refuses_bad_input_and_writes_nothing(
    distill_student: Path, distill_text: Path, tmp_path: Path
) -> None:
    before = tree_digest(tmp_path)
    assert "--stage 'both': expected all, align, kd or ce" in error_line(
        _distill(distill_student, distill_text, tmp_path / "o", "--stage", "both")
    )
    assert "the student folder" in error_line(_distill(distill_student, distill_text, distill_student))
    assert "no such file or folder" in error_line(_distill(distill_student, tmp_path / "missing.txt", tmp_path / "o"))
    missing_with_checkpoints = _distill(distill_student, tmp_path / "missing.txt", tmp_path / "o", "--save-every", "2")
    assert "no such file or folder" in error_line(missing_with_checkpoints)  # and no empty o.checkpoints left
    uneven = _distill(distill_student, distill_text, tmp_path / "o", "--batch-size", "3", "--grad-accum", "2")
    assert "--grad-accum 2 does not divide --batch-size 3" in error_line(uneven)
    assert "--grad-accum 0: input should be greater than or equal to 1" in error_line(
        _distill(distill_student, distill_text, tmp_path / "o", "--grad-accum", "0")
    )
    assert tree_digest(tmp_path) == before
    (tmp_path / "taken").mkdir()
    assert "already exists; pass --force" in error_line(_distill(distill_student, distill_text, tmp_path / "taken"))


def test_stage_ce_is_the_papers_recipe_next_token_loss_with_lit(
    distill_student: Path, distill_text: Path, tmp_path: Path
) -> None:
    out = tmp_path / "out"
    result = _distill(distill_student, distill_text, out, "--stage", "ce")
    assert result.exit_code == 0, result.output
    record = json.loads((out / "xatl_manifest.json").read_text())["distillation"]
    assert [stage["stage"] for stage in record["stages"]] == ["ce"]
    with (out / "distill_ce.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == 3 and all(float(row["loss"]) > 0 for row in rows)
    assert record["stages"][0]["final_loss"] == pytest.approx(float(rows[-1]["loss"]))
