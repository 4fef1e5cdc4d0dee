"""The levers of a distillation recipe that issue 25 measured: whole-block alignment (MOHAWK's stage 2), LIT at a
fixed step, and other text mixed into the training blocks. Each does what it says and is recorded in the
manifest, so a run says how it was trained."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

from tests.bad_input import error_line, invoke, tree_digest
from tests.conftest import DISTILL_TEXT, EXAMPLE_CHECKPOINT
from xatl_convert.conversion import convert
from xatl_convert.manifest import read_manifest
from xatl_convert.training.align import Aligner, attention_taps, mixer_parameters
from xatl_convert.training.data import PackedBlocks, mix_blocks
from xatl_convert.training.lit import LossImprovementThreshold

pytest.importorskip("datasets")
pytest.importorskip("accelerate")


@pytest.fixture(scope="module")
def pair(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A trained-scale tiny Llama teacher and its Mamba2 student with layer 1 kept as attention."""
    root = tmp_path_factory.mktemp("levers")
    config = LlamaConfig(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)  # fmt: skip
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    with torch.no_grad():
        for parameter in model.parameters():
            if parameter.dim() == 2:
                parameter.normal_(0.0, parameter.shape[1] ** -0.5)
    model.save_pretrained(root / "teacher")
    convert(root / "teacher", root / "student", to="mamba2", attn_layers="1", dtype=torch.float32,
            overrides={"options.attention_init": True})  # fmt: skip
    return root / "teacher", root / "student"


def test_block_alignment_fits_each_blocks_residual_update_and_moves_only_the_mixers(pair: tuple[Path, Path]) -> None:
    teacher_folder, student_folder = pair
    student = AutoModelForCausalLM.from_pretrained(student_folder, dtype=torch.float32)
    teacher = AutoModelForCausalLM.from_pretrained(teacher_folder, dtype=torch.float32)
    aligner = Aligner(student, teacher, read_manifest(student_folder), target="block")
    generator = torch.Generator().manual_seed(0)
    held_out = torch.randint(0, 128, (4, 32), generator=generator)
    # The pair of layer 0 is the stream into and out of the teacher's block 0.
    with torch.no_grad(), attention_taps(aligner.teacher_blocks) as pairs:
        states = teacher(input_ids=held_out, output_hidden_states=True).hidden_states
    assert torch.equal(pairs[0][0], states[0]) and torch.equal(pairs[0][1], states[1])
    start = aligner.evaluate(held_out)
    assert set(start) == {0, 2} and all(0.1 < value < 10 for value in start.values()), start
    before = {name: p.detach().clone() for name, p in student.named_parameters()}
    optimizer = torch.optim.AdamW(aligner.trainable(), lr=1e-2)
    for _ in range(40):
        aligner.step(torch.randint(0, 128, (4, 32), generator=generator), optimizer)
    end = aligner.evaluate(held_out)
    assert all(end[index] < 0.8 * start[index] for index in start), (start, end)
    trained = set(mixer_parameters(student, read_manifest(student_folder)))
    for name, parameter in student.named_parameters():  # the MLPs and norms the loss runs through stay put
        assert (not torch.equal(parameter, before[name])) == (name in trained), name
    aligner.target = "mixer"  # the two targets measure different things on the same weights
    assert aligner.evaluate(held_out) != end


def test_lit_after_n_fires_exactly_at_step_n_whatever_the_loss() -> None:
    trigger = LossImprovementThreshold.preset("after-3", window=2)
    assert [trigger.observe(10.0 / step) for step in range(1, 7)] == [False, False, True, False, False, False]
    assert trigger.fired_at == 3
    with pytest.raises(ValueError, match="after-N"):
        LossImprovementThreshold.preset("after-0")


def test_mixed_blocks_keep_every_main_block_in_order_and_spread_the_share_evenly() -> None:
    main = PackedBlocks(torch.arange(30).view(30, 1).expand(30, 4).clone(), documents=5)
    other = PackedBlocks(1000 + torch.arange(4).view(4, 1).expand(4, 4).clone(), documents=2)
    mixed = mix_blocks(main, other, 0.25)
    firsts = mixed.blocks[:, 0].tolist()
    assert [v for v in firsts if v < 1000] == list(range(30))  # every main block, in its order
    assert len(firsts) == 40 and mixed.mixed == 10  # a quarter, the other text cycled
    assert [v for v in firsts if v >= 1000] == [1000 + i % 4 for i in range(10)]
    for start in range(0, 40, 8):  # no run of one source: each window of 8 has its 2 other blocks
        assert sum(v >= 1000 for v in firsts[start : start + 8]) == 2


def test_distill_runs_each_lever_and_records_it(tmp_path: Path, distill_student: Path) -> None:
    (tmp_path / "text.txt").write_text(DISTILL_TEXT)
    (tmp_path / "other.txt").write_text("\n\n".join(f"Paragraph {i} of other text, about {i * 7} apples." * 9
                                                    for i in range(40)))  # fmt: skip
    out = tmp_path / "out"
    result = invoke("distill", distill_student, "--teacher", EXAMPLE_CHECKPOINT, "--data", tmp_path / "text.txt",
                    "--out", out, "--align-steps", "4", "--kd-steps", "3", "--block-size", "32",
                    "--align-block-share", "0.5", "--lit-preset", "after-1", "--mix-data", tmp_path / "other.txt",
                    "--mix-share", "0.5")  # fmt: skip
    assert result.exit_code == 0, result.output
    record = json.loads((out / "xatl_manifest.json").read_text())["distillation"]
    align, kd = record["stages"]
    assert align["block_steps"] == 2 and kd["lit_unfrozen_at"] == 1  # the transferred weights moved from step 2
    settings = record["settings"]
    assert settings["mix_data"] == str(tmp_path / "other.txt") and settings["lit_preset"] == "after-1"
    data = record["data"]
    assert data["mixed_blocks"] == data["train_blocks"] // 2  # half the training blocks; held-out untouched
    plain = json.loads((distill_student / "xatl_manifest.json").read_text())
    assert "distillation" not in plain  # the student folder itself is never written
    before = tree_digest(tmp_path)
    missing = invoke("distill", distill_student, "--teacher", EXAMPLE_CHECKPOINT, "--data", tmp_path / "text.txt",
                     "--out", tmp_path / "out2", "--mix-data", tmp_path / "missing.txt")  # fmt: skip
    line = error_line(missing)
    assert "missing.txt: no such file or folder" in line
    assert tree_digest(tmp_path) == before
