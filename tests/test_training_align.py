"""Stage `align`: each new mixer learns its layer's attention output from the teacher's own input; nothing else
moves."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

from xatl_convert.conversion import convert
from xatl_convert.manifest import read_manifest
from xatl_convert.training.align import Aligner, AlignError, mixer_parameters, normalised_mse, teacher_attention
from xatl_convert.training.freeze import transferred_parameters


@pytest.fixture(scope="module")
def teacher_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("align") / "llama"
    config = LlamaConfig(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=4,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)  # fmt: skip
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    with torch.no_grad():  # trained-network scale, so that attention outputs carry a function worth learning
        for parameter in model.parameters():
            if parameter.dim() == 2:
                parameter.normal_(0.0, parameter.shape[1] ** -0.5)
    model.save_pretrained(folder)
    return folder


@pytest.mark.parametrize("target", ["mamba", "mamba2"])
def test_align_trains_only_the_new_mixers_and_their_loss_falls(
    teacher_folder: Path, tmp_path: Path, target: str
) -> None:
    out = tmp_path / "student"
    init = {"options.attention_init": True} if target == "mamba2" else None  # Mamba2 starts from V, K, Q
    convert(teacher_folder, out, to=target, attn_layers="1", dtype=torch.float32, overrides=init)
    student = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    teacher = AutoModelForCausalLM.from_pretrained(teacher_folder, dtype=torch.float32)
    aligner = Aligner(student, teacher, read_manifest(out))
    assert aligner.layers == [0, 2, 3]  # the kept attention layer is not aligned
    before = {name: p.detach().clone() for name, p in student.named_parameters()}
    teacher_before = {name: p.detach().clone() for name, p in teacher.named_parameters()}
    optimizer = torch.optim.AdamW(aligner.trainable(), lr=1e-2)
    generator = torch.Generator().manual_seed(0)
    held_out = torch.randint(0, 128, (4, 32), generator=generator)
    start = aligner.evaluate(held_out)
    for _ in range(60):
        losses = aligner.step(torch.randint(0, 128, (4, 32), generator=generator), optimizer)
        assert set(losses) == {0, 2, 3}  # the kept attention layer is not aligned
    end = aligner.evaluate(held_out)
    assert all(end[index] < 0.9 * start[index] for index in start), (start, end)  # every layer learns
    trained = set(mixer_parameters(student, read_manifest(out)))
    for name, parameter in student.named_parameters():
        moved = not torch.equal(parameter, before[name])
        assert moved == (name in trained), name  # every trained mixer moved; nothing else did
    assert all(
        name.startswith(("model.layers.0.mixer", "model.layers.2.mixer", "model.layers.3.mixer")) for name in trained
    )
    assert all(torch.equal(p, teacher_before[n]) for n, p in teacher.named_parameters())
    assert "model.layers.0.mixer.out_proj.weight" in trained  # W_O (if transferred) fits with the rest of the mixer
    manifest = read_manifest(out)
    without_w_o = set(mixer_parameters(student, manifest, train_w_o=False))
    assert without_w_o == trained - set(transferred_parameters(student, manifest))
    if target == "mamba2":  # W_O fits Mamba2's out_proj (expand 1 here), so it was transferred
        assert "model.layers.0.mixer.out_proj.weight" not in without_w_o


def test_normalised_mse_is_one_for_a_silent_mixer_at_any_scale() -> None:
    target = torch.randn(2, 8, 16)
    for scale in (1e-3, 1.0, 1e3):
        assert normalised_mse(torch.zeros_like(target), target * scale).item() == pytest.approx(1.0)
    assert normalised_mse(target, target).item() == 0.0


def test_a_teacher_of_another_depth_is_refused(teacher_folder: Path) -> None:
    teacher = AutoModelForCausalLM.from_pretrained(teacher_folder)
    with pytest.raises(AlignError, match="cannot find its 6 decoder blocks"):
        teacher_attention(teacher, 6)
