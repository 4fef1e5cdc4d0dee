"""Stage `kd`: the student learns the teacher's distribution end to end; LIT unfreezes the transferred weights."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM, TrainingArguments

from xatl_convert.conversion import convert
from xatl_convert.manifest import read_manifest
from xatl_convert.training import LITCallback, LITController, LossImprovementThreshold, freeze_transferred
from xatl_convert.training.freeze import transferred_parameters
from xatl_convert.training.kd import DistillationTrainer, distillation_loss

pytest.importorskip("accelerate")


def test_distillation_loss_is_zero_on_the_teacher_and_scales_with_temperature() -> None:
    torch.manual_seed(0)
    teacher, student = torch.randn(2, 5, 11), torch.randn(2, 5, 11)
    assert distillation_loss(teacher, teacher)[0].item() == pytest.approx(0.0, abs=1e-6)
    kl, parts = distillation_loss(student, teacher)
    assert kl.item() > 0 and set(parts) == {"kl"}
    hot = distillation_loss(student, teacher, temperature=100.0)[0].item()
    # Hinton's limit: at a high temperature T²·KL tends to half the variance of the logits' difference per token
    limit = 0.5 * (teacher - student).var(dim=-1, unbiased=False).mean().item()
    assert hot == pytest.approx(limit, rel=0.02)
    labels = torch.randint(0, 11, (2, 5))
    mixed, parts = distillation_loss(student, teacher, labels, ce_weight=0.5)
    assert mixed.item() == pytest.approx(parts["kl"] + 0.5 * parts["ce"], rel=1e-5)
    with pytest.raises(ValueError, match="temperature must be positive"):
        distillation_loss(student, teacher, temperature=0)


class _Blocks(torch.utils.data.Dataset):
    def __init__(self, blocks: torch.Tensor) -> None:
        self.blocks = blocks

    def __len__(self) -> int:
        return len(self.blocks)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.blocks[index], "labels": self.blocks[index]}


def test_kd_trainer_lowers_kl_and_lit_unfreezes_the_transferred_weights(tmp_path: Path) -> None:
    config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, max_position_embeddings=64)  # fmt: skip
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(tmp_path / "teacher")
    convert(tmp_path / "teacher", tmp_path / "student", dtype=torch.float32)
    teacher = AutoModelForCausalLM.from_pretrained(tmp_path / "teacher", dtype=torch.float32)
    student = AutoModelForCausalLM.from_pretrained(tmp_path / "student", dtype=torch.float32)
    manifest = read_manifest(tmp_path / "student")
    frozen = transferred_parameters(student, manifest)
    freeze_transferred(student, manifest)
    before = {name: parameter.detach().clone() for name, parameter in frozen.items()}
    trigger = LossImprovementThreshold(window=4, threshold=0.5, patience=1)  # fires early, as soon as KL slows
    lit = LITCallback(LITController(frozen, lr=1e-3, warmup_steps=2, trigger=trigger, weight_decay=0.0))
    generator = torch.Generator().manual_seed(0)
    held_out = torch.randint(0, 64, (8, 32), generator=generator)
    data = _Blocks(torch.randint(0, 64, (96, 32), generator=generator))

    def held_out_kl() -> float:
        with torch.no_grad():
            return distillation_loss(student(held_out).logits, teacher(held_out).logits)[0].item()

    start = held_out_kl()
    arguments = TrainingArguments(output_dir=str(tmp_path / "run"), max_steps=24, per_device_train_batch_size=4,
                                  learning_rate=3e-3, save_strategy="no", report_to=[], logging_steps=8,
                                  use_cpu=True, seed=0)  # fmt: skip
    trainer = DistillationTrainer(model=student, args=arguments, train_dataset=data, teacher=teacher, callbacks=[lit])
    trainer.train()
    assert held_out_kl() < 0.7 * start
    assert lit.unfrozen_at is not None and lit.unfrozen_at < 24
    assert all(not torch.equal(parameter, before[name]) for name, parameter in frozen.items())  # moved after LIT
    logged = [entry for entry in trainer.state.log_history if "kd/kl" in entry]
    assert logged and all(entry["kd/kl"] > 0 for entry in logged)
