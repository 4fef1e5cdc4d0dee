"""Stage kd against a teacher cache: the teacher's top-k log-probabilities, computed once per set of blocks, keyed by
what they depend on, built atomically, and a loss that equals the full KL when k is the whole vocabulary."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM, TrainingArguments

from tests.bad_input import error_line, invoke, leftovers, tree_digest
from tests.conftest import EXAMPLE_CHECKPOINT
from xatl_convert.conversion import convert
from xatl_convert.training.kd import DistillationTrainer, TeacherTopK, distillation_loss
from xatl_convert.training.teacher_cache import (
    IndexedBlocks,
    TeacherCache,
    TeacherCacheError,
    cache_key,
    ensure_teacher_cache,
)

pytest.importorskip("accelerate")

VOCAB = 64


def test_top_k_over_the_whole_vocabulary_is_the_full_kl() -> None:
    torch.manual_seed(0)
    teacher = torch.randn(2, 7, VOCAB) * 3
    student = (torch.randn(2, 7, VOCAB) * 3).requires_grad_(True)
    full, _ = distillation_loss(student, teacher)
    (full_gradient,) = torch.autograd.grad(full, student)
    top, _ = distillation_loss(student, TeacherTopK.from_logits(teacher, VOCAB))
    (top_gradient,) = torch.autograd.grad(top, student)
    assert top.item() == pytest.approx(full.item(), abs=1e-6)
    assert torch.allclose(top_gradient, full_gradient, atol=1e-6)


def test_top_k_with_a_rest_bucket_is_a_kl_below_the_full_one_with_the_full_gradient_on_the_top_k() -> None:
    torch.manual_seed(1)
    teacher = torch.randn(3, 5, VOCAB) * 2
    student = (torch.randn(3, 5, VOCAB) * 2).requires_grad_(True)
    top_k = TeacherTopK.from_logits(teacher, 8)
    assert distillation_loss(teacher, top_k)[0].item() == pytest.approx(0.0, abs=1e-6)  # zero on the teacher itself
    full, _ = distillation_loss(student, teacher)
    (full_gradient,) = torch.autograd.grad(full, student)
    top, _ = distillation_loss(student, top_k)
    (top_gradient,) = torch.autograd.grad(top, student)
    assert 0 < top.item() < full.item()  # merging outcomes can only lower a KL
    ids = top_k.token_ids.long()
    assert torch.allclose(top_gradient.gather(-1, ids), full_gradient.gather(-1, ids), atol=1e-6)  # q − p on the top k
    rest = torch.ones_like(student, dtype=torch.bool).scatter(-1, ids, False)
    # on the rest, the push on the student's rest mass as a whole is the full KL's: q_rest − p_rest
    assert torch.allclose((top_gradient * rest).sum(-1), (full_gradient * rest).sum(-1), atol=1e-6)
    with pytest.raises(ValueError, match="temperature 1 only"):
        distillation_loss(student, top_k, temperature=2.0)


@pytest.fixture(scope="module")
def pair(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, torch.nn.Module, torch.nn.Module]:
    """A tiny random Llama teacher (its folder and model) and its Mamba conversion, in float32."""
    root = tmp_path_factory.mktemp("pair")
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, max_position_embeddings=64)  # fmt: skip
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(root / "teacher")
    convert(root / "teacher", root / "student", dtype=torch.float32)
    teacher = AutoModelForCausalLM.from_pretrained(root / "teacher", dtype=torch.float32).eval()
    student = AutoModelForCausalLM.from_pretrained(root / "student", dtype=torch.float32)
    return root / "teacher", teacher, student


def _blocks(seed: int = 0, count: int = 10) -> torch.Tensor:
    return torch.randint(0, VOCAB, (count, 16), generator=torch.Generator().manual_seed(seed))


class _CountingForwards:
    """Counts the teacher's forward passes, and raises KeyboardInterrupt at pass `interrupt_at` (if given)."""

    def __init__(self, model: torch.nn.Module, interrupt_at: int | None = None) -> None:
        self.calls, self.interrupt_at = 0, interrupt_at
        self.handle = model.register_forward_pre_hook(self)

    def __call__(self, module: torch.nn.Module, arguments: object) -> None:
        self.calls += 1
        if self.calls == self.interrupt_at:
            raise KeyboardInterrupt

    def __enter__(self) -> _CountingForwards:
        return self

    def __exit__(self, *exception: object) -> None:
        self.handle.remove()


def test_a_cached_kd_step_has_the_loss_and_gradients_of_a_live_top_k_step(pair, tmp_path: Path) -> None:
    teacher_folder, teacher, student = pair
    blocks = _blocks()
    key = cache_key(teacher_folder, blocks, held_out=0.05, top_k=8)
    assert ensure_teacher_cache(tmp_path / "cache", teacher, key, blocks, batch_size=3, shard_bytes=4000)
    cache = TeacherCache(tmp_path / "cache", key)
    assert len(cache) == 10 and len(list((tmp_path / "cache").glob("*.safetensors"))) > 2  # rows across shards
    arguments = TrainingArguments(output_dir=str(tmp_path / "run"), use_cpu=True, report_to=[],
                                  remove_unused_columns=False)  # fmt: skip
    trainer = DistillationTrainer(model=student, args=arguments, teacher_cache=cache)
    dataset = IndexedBlocks(blocks)
    batch = trainer.data_collator([dataset[index] for index in (7, 2, 9)])  # the Trainer's own collator
    student.zero_grad()
    cached = trainer.compute_loss(student, batch)
    cached.backward()
    cached_gradients = {name: p.grad.clone() for name, p in student.named_parameters() if p.grad is not None}
    student.zero_grad()
    with torch.no_grad():
        live_teacher = TeacherTopK.from_logits(teacher(input_ids=batch["input_ids"]).logits, 8)
    live, _ = distillation_loss(student(input_ids=batch["input_ids"]).logits, live_teacher)
    live.backward()
    assert cached.item() == pytest.approx(live.item(), rel=1e-3)  # float16 log-probabilities: 5e-4 relative
    assert cached_gradients.keys() == {name for name, p in student.named_parameters() if p.grad is not None}
    for name, parameter in student.named_parameters():
        if parameter.grad is not None:
            assert torch.allclose(cached_gradients[name], parameter.grad, rtol=1e-2, atol=1e-5), name
    with pytest.raises(TeacherCacheError, match="hold other tokens than the batch"):
        cache.rows(batch["block_index"], batch["input_ids"].flip(0))


def test_building_twice_reuses_the_cache_without_a_teacher_forward(pair, tmp_path: Path) -> None:
    teacher_folder, teacher, _ = pair
    blocks = _blocks()
    key = cache_key(teacher_folder, blocks, held_out=0.05, top_k=8)
    with _CountingForwards(teacher) as forwards:
        assert ensure_teacher_cache(tmp_path / "cache", teacher, key, blocks, batch_size=4)
        assert forwards.calls == 3  # 10 blocks, 4 at a time
        before = tree_digest(tmp_path / "cache")
        assert not ensure_teacher_cache(tmp_path / "cache", teacher, key, blocks, batch_size=4)
        assert forwards.calls == 3 and tree_digest(tmp_path / "cache") == before
    record = json.loads((tmp_path / "cache" / "xatl_teacher_cache.json").read_text())
    assert record["key"] == json.loads(json.dumps(key)) and record["key"]["teacher"]["weights"]


def test_a_cache_of_other_blocks_or_another_top_k_is_refused_naming_what_differs(pair, tmp_path: Path) -> None:
    teacher_folder, teacher, _ = pair
    blocks = _blocks()
    ensure_teacher_cache(tmp_path / "cache", teacher, cache_key(teacher_folder, blocks, 0.05, 8), blocks, 4)
    before = tree_digest(tmp_path)
    cases = [(blocks.flip(0), 8, "kd's training blocks (10 blocks"),  # the same data, reordered
             (_blocks(seed=1), 8, "kd's training blocks"), (blocks, 4, "top-k 8 (this run: 4)")]  # fmt: skip
    for other, top_k, named in cases:
        key = cache_key(teacher_folder, other, 0.05, top_k)
        with _CountingForwards(teacher) as forwards, pytest.raises(TeacherCacheError, match="another run") as error:
            ensure_teacher_cache(tmp_path / "cache", teacher, key, other, 4)
        assert named in str(error.value) and "remove it to rebuild it" in str(error.value)
        assert forwards.calls == 0
        with pytest.raises(TeacherCacheError, match="another run"):
            TeacherCache(tmp_path / "cache", key)
    assert tree_digest(tmp_path) == before


def test_an_interrupted_build_leaves_no_cache(pair, tmp_path: Path) -> None:
    teacher_folder, teacher, _ = pair
    blocks = _blocks()
    key = cache_key(teacher_folder, blocks, 0.05, 8)
    (tmp_path / "runs").mkdir()
    with _CountingForwards(teacher, interrupt_at=3), pytest.raises(KeyboardInterrupt):
        ensure_teacher_cache(tmp_path / "runs" / "cache", teacher, key, blocks, batch_size=2, shard_bytes=4000)
    assert list((tmp_path / "runs").iterdir()) == []  # no cache, no staging folder, no lock file
    assert leftovers(tmp_path / "runs") == []
    assert ensure_teacher_cache(tmp_path / "runs" / "cache", teacher, key, blocks, batch_size=2)  # built afresh


def _distill(student: Path, text: Path, out: Path, cache: Path, *extra: str):
    return invoke("distill", student, "--teacher", EXAMPLE_CHECKPOINT, "--data", text, "--out", out, "--stage", "kd",
                  "--kd-steps", "2", "--block-size", "32", "--teacher-cache", cache, "--teacher-top-k", "8",
                  *extra)  # fmt: skip


def test_distill_builds_the_cache_once_and_records_it_in_the_kd_stage(
    distill_student: Path, distill_text: Path, tmp_path: Path
) -> None:
    cache = tmp_path / "cache"
    first = _distill(distill_student, distill_text, tmp_path / "a", cache)
    assert first.exit_code == 0, first.output
    kd = json.loads((tmp_path / "a" / "xatl_manifest.json").read_text())["distillation"]["stages"][0]
    assert kd["stage"] == "kd" and kd["teacher_cache"]["path"] == str(cache.resolve())
    assert kd["teacher_cache"]["top_k"] == 8 and kd["teacher_cache"]["blocks"] == 2 * 4 and kd["teacher_cache"]["built"]
    assert kd["final_loss"] > 0
    before = tree_digest(cache)
    second = _distill(distill_student, distill_text, tmp_path / "b", cache)
    assert second.exit_code == 0, second.output
    kd = json.loads((tmp_path / "b" / "xatl_manifest.json").read_text())["distillation"]["stages"][0]
    assert not kd["teacher_cache"]["built"] and tree_digest(cache) == before  # reused as it was
    line = error_line(_distill(distill_student, distill_text, tmp_path / "c", cache, "--seed", "1"))
    assert f"--teacher-cache {cache}: a cache of another run, it differs in kd's training blocks" in line
    assert not (tmp_path / "c").exists() and tree_digest(cache) == before
    line = error_line(_distill(distill_student, distill_text, tmp_path / "c", cache, "--temperature", "2"))
    assert (
        "--temperature 2.0 with --teacher-cache: the cache holds the teacher's log-probabilities at temperature 1"
        in line
    )
    line = error_line(_distill(distill_student, distill_text, tmp_path / "c", cache, "--stage", "ce"))
    assert "--teacher-cache with --stage ce: only stage kd reads the teacher" in line
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "mine.txt").write_text("the user's")
    line = error_line(_distill(distill_student, distill_text, tmp_path / "c", tmp_path / "notes", "--force"))
    assert "is not an xatl teacher cache" in line
    assert not (tmp_path / "c").exists() and tree_digest(cache) == before
