"""Checkpoints of `xatl distill`: a run interrupted in align, or in kd after LIT unfroze the transferred weights,
resumes to exactly the weights of a run that was never interrupted, for every mixer kind; checkpoints of another run
are refused."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
from transformers import PreTrainedConfig

from tests.bad_input import error_line, invoke, tree_digest
from tests.conftest import DISTILL_TEXT, EXAMPLE_CHECKPOINT
from xatl_convert.conversion import convert, parse_overrides
from xatl_convert.mapping.layers import LCI_MIXERS
from xatl_convert.training import distill as distill_module
from xatl_convert.training.lit import LossImprovementThreshold

pytest.importorskip("datasets")
pytest.importorskip("accelerate")

ROOT = Path(__file__).resolve().parents[1]
STEPS = ["--align-steps", "4", "--kd-steps", "6", "--block-size", "32", "--eval-every", "2"]


def _lit_fires_at_step_two(monkeypatch: pytest.MonkeyPatch) -> None:
    """A trigger that always finds the loss flat: LIT unfreezes after kd step 2, before the checkpoints that follow."""
    monkeypatch.setattr(
        distill_module.LossImprovementThreshold,
        "preset",
        classmethod(lambda cls, name, window=50: LossImprovementThreshold(window=1, threshold=10.0)),
    )


@pytest.fixture(autouse=True)
def lit_fires_at_step_two(monkeypatch: pytest.MonkeyPatch) -> None:
    _lit_fires_at_step_two(monkeypatch)


@pytest.fixture(scope="module")
def whole(distill_student: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A run never interrupted: what every resumed run must equal, byte for byte."""
    text = tmp_path_factory.mktemp("text") / "text.txt"
    text.write_text(DISTILL_TEXT)
    out = tmp_path_factory.mktemp("whole") / "whole"
    with pytest.MonkeyPatch.context() as patch:
        _lit_fires_at_step_two(patch)
        assert _distill(distill_student, text, out).exit_code == 0
    return out


def _distill(distill_student: Path, distill_text: Path, out: Path, *extra: str | Path):
    return invoke(
        "distill",
        distill_student,
        "--teacher",
        EXAMPLE_CHECKPOINT,
        "--data",
        distill_text,
        "--out",
        out,
        *STEPS,
        *extra,
    )


def _rows(out: Path, name: str) -> list[dict[str, str]]:
    with (out / name).open() as handle:
        return list(csv.DictReader(handle))


@pytest.mark.parametrize(("stage", "step"), [("align", 3), ("kd", 5)])
def test_an_interrupted_run_resumes_bit_for_bit(
    distill_student: Path,
    distill_text: Path,
    whole: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    stage: str,
    step: int,
) -> None:
    record = json.loads((whole / "xatl_manifest.json").read_text())["distillation"]
    assert record["stages"][1]["lit_unfrozen_at"] == 2  # so kd's checkpoint at step 4 is after the unfreeze

    original_show = distill_module._Run._show

    def interrupt(run, shown_stage, shown_step, *args, **kwargs):
        if (shown_stage, shown_step) == (stage, step):
            raise KeyboardInterrupt
        return original_show(run, shown_stage, shown_step, *args, **kwargs)

    monkeypatch.setattr(distill_module._Run, "_show", interrupt)
    out, checkpoints = tmp_path / "out", tmp_path / "out.checkpoints"
    interrupted = _distill(distill_student, distill_text, out, "--save-every", "2")
    assert interrupted.exit_code == 130 and "interrupted" in interrupted.stderr
    assert not out.exists() and (checkpoints / "xatl_distill.json").is_file()

    monkeypatch.setattr(distill_module._Run, "_show", original_show)
    resumed = _distill(distill_student, distill_text, out, "--save-every", "2", "--resume")
    assert resumed.exit_code == 0, resumed.output
    assert (out / "model.safetensors").read_bytes() == (whole / "model.safetensors").read_bytes()
    assert not checkpoints.exists()  # served their purpose once OUT is written
    for name in ("distill_align.csv", "distill_kd.csv"):
        assert [row["step"] for row in _rows(out, name)] == [row["step"] for row in _rows(whole, name)]
        keys = ("mean",) if "align" in name else ("loss", "kd/kl")
        for mine, theirs in zip(_rows(out, name), _rows(whole, name), strict=True):
            assert [mine[key] for key in keys] == [theirs[key] for key in keys]
    curve = [(row["stage"], row["step"], row["held_out_loss"]) for row in _rows(out, "distill_curve.csv")]
    assert curve == [(row["stage"], row["step"], row["held_out_loss"]) for row in _rows(whole, "distill_curve.csv")]
    resumed_record = json.loads((out / "xatl_manifest.json").read_text())["distillation"]
    assert resumed_record["end_loss"] == record["end_loss"]
    assert resumed_record["stages"][1]["lit_unfrozen_at"] == 2


def test_checkpoints_of_another_run_are_refused(
    distill_student: Path, distill_text: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    original_show = distill_module._Run._show

    def interrupt(run, stage, step, *args, **kwargs):
        if (stage, step) == ("align", 3):
            raise KeyboardInterrupt
        return original_show(run, stage, step, *args, **kwargs)

    monkeypatch.setattr(distill_module._Run, "_show", interrupt)
    out, checkpoints = tmp_path / "out", tmp_path / "out.checkpoints"
    assert _distill(distill_student, distill_text, out, "--save-every", "2").exit_code == 130
    before = tree_digest(checkpoints)
    line = error_line(_distill(distill_student, distill_text, out, "--save-every", "2", "--resume", "--kd-lr", "5e-4"))
    assert f"{checkpoints}: its checkpoints are of another run (differs in settings)" in line
    line = error_line(_distill(distill_student, distill_text, out, "--save-every", "2"))
    assert f"{checkpoints}: holds checkpoints of an earlier xatl distill run; pass --resume to continue it" in line
    assert "remove" not in line
    assert tree_digest(checkpoints) == before and not out.exists()


@pytest.mark.parametrize("mixer", LCI_MIXERS)
def test_kd_resumes_for_every_mixer_kind(mixer: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The Trainer re-reads a checkpoint's config.json as a plain PreTrainedConfig, whose validator once refused
    `mamba2`: every mixer, beside a kept attention layer, resumes kd to the uninterrupted run's weights."""
    student = tmp_path / "student"
    overrides = parse_overrides(["mamba2.chunk_size=16"]) if mixer == "mamba2" else None  # 16-token blocks: quick
    convert(EXAMPLE_CHECKPOINT, student, to=mixer, attn_layers="1", overrides=overrides)
    config = json.loads((student / "config.json").read_text())
    assert config["layer_types"] == [mixer, "attention", mixer, mixer]
    PreTrainedConfig.from_json_file(student / "config.json")  # what the Trainer does with a checkpoint's config
    text = tmp_path / "text.txt"
    text.write_text(DISTILL_TEXT[:6000])  # 3 held-out blocks of 16 tokens: quick to score
    steps = ["--stage", "kd", "--kd-steps", "3", "--block-size", "16", "--batch-size", "2", "--save-every", "2"]

    def run(out: Path, *extra: str):
        return invoke("distill", student, "--teacher", EXAMPLE_CHECKPOINT, "--data", text, "--out", out, *steps, *extra)

    assert run(tmp_path / "whole").exit_code == 0
    original_show = distill_module._Run._show

    def interrupt(run_, stage, step, *args, **kwargs):
        if (stage, step) == ("kd", 3):
            raise KeyboardInterrupt
        return original_show(run_, stage, step, *args, **kwargs)

    monkeypatch.setattr(distill_module._Run, "_show", interrupt)
    out = tmp_path / "out"
    assert run(out).exit_code == 130
    assert (tmp_path / "out.checkpoints" / "kd" / "checkpoint-2" / "config.json").is_file()
    monkeypatch.setattr(distill_module._Run, "_show", original_show)
    resumed = run(out, "--resume")
    assert resumed.exit_code == 0, resumed.output
    assert (out / "model.safetensors").read_bytes() == (tmp_path / "whole" / "model.safetensors").read_bytes()
    assert not (tmp_path / "out.checkpoints").exists()
