"""Training helpers: freezing by manifest group, the LIT trigger, the unfrozen param group, and the Trainer adapter."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from tests.conftest import save_neox
from xatl_convert.conversion import convert
from xatl_convert.manifest import read_manifest
from xatl_convert.training import (
    LIT_PRESETS,
    LITCallback,
    LITController,
    LossImprovementThreshold,
    freeze_transferred,
    transferred_parameters,
)
from xatl_convert.training.groups import GROUP_KEY


@pytest.fixture(scope="module")
def converted(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny GPT-NeoX (hidden 32, 2 layers) converted to Mamba."""
    root = tmp_path_factory.mktemp("train")
    source = save_neox(root / "neox", num_hidden_layers=2)
    convert(source, root / "mamba", to="mamba")
    return root / "mamba"


def load(folder: Path) -> torch.nn.Module:
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_pretrained(folder)


def manifest_names(folder: Path, groups: set[str] | None = None) -> set[str]:
    tensors = read_manifest(folder)["tensors"]
    return {n for n, e in tensors.items() if e["status"] == "transferred" and (groups is None or e["group"] in groups)}


# ---------------------------------------------------------------------------------------------------------------
# freeze_transferred
# ---------------------------------------------------------------------------------------------------------------


def test_freeze_all_transferred_groups(converted: Path) -> None:
    model = load(converted)
    frozen = freeze_transferred(model, converted)
    assert set(frozen) == manifest_names(converted)
    for name, param in model.named_parameters():
        assert param.requires_grad == (name not in frozen), name
    assert any(".mixer.in_proj" in n for n, p in model.named_parameters() if p.requires_grad)
    assert "model.layers.0.mixer.out_proj.weight" in frozen  # W_O is transferred (group w_o)


def test_freeze_selected_groups(converted: Path) -> None:
    model = load(converted)
    frozen = freeze_transferred(model, read_manifest(converted), groups=["mlp", "norms"])
    assert set(frozen) == manifest_names(converted, {"mlp", "norms"})
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert "model.embed_tokens.weight" in trainable and "lm_head.weight" in trainable
    assert "model.layers.1.mlp.fc1.weight" not in trainable
    with pytest.raises(ValueError, match="unknown transfer group"):
        freeze_transferred(model, converted, groups=["mixer"])


def test_tied_lm_head_is_the_embedding(converted: Path) -> None:
    model = load(converted)
    model.lm_head.weight = model.model.embed_tokens.weight  # tie by hand: one parameter, two names
    manifest = read_manifest(converted)
    params = transferred_parameters(model, manifest, groups=["lm_head"])
    assert list(params) == ["model.embed_tokens.weight"]  # reported once, under the model's own name


def test_initialised_tensors_with_parts_stay_trainable(converted: Path) -> None:
    model = load(converted)
    manifest = read_manifest(converted)
    entry = manifest["tensors"]["model.layers.0.mixer.in_proj.weight"]
    manifest["tensors"]["model.layers.0.mixer.in_proj.weight"] = {**entry, "parts": [{"part": "x", "rows": [0, 32]}]}
    freeze_transferred(model, manifest)
    assert model.model.layers[0].mixer.in_proj.weight.requires_grad


# ---------------------------------------------------------------------------------------------------------------
# The LIT trigger on synthetic losses
# ---------------------------------------------------------------------------------------------------------------


def feed(trigger: LossImprovementThreshold, window_means: list[float]) -> list[int]:
    fired = []
    for mean in window_means:
        for _ in range(trigger.window):
            if trigger.observe(mean):
                fired.append(trigger.steps)
    return fired


def test_plateau_fires_at_the_window_that_completes_it() -> None:
    trigger = LossImprovementThreshold(window=3, threshold=0.01, patience=1)
    # improvements: 20%, 10%, 0.5% (< 1%): fires at the end of the 4th window, step 12, and only once
    assert feed(trigger, [10.0, 8.0, 7.2, 7.164, 7.16, 7.15]) == [12]
    assert trigger.fired_at == 12 and trigger.window_means[:4] == pytest.approx([10.0, 8.0, 7.2, 7.164])


def test_steady_improvement_never_fires() -> None:
    trigger = LossImprovementThreshold(window=2, threshold=0.01, patience=1)
    assert feed(trigger, [10.0 * 0.95**k for k in range(30)]) == []
    assert trigger.fired_at is None


def test_patience_two_needs_two_windows_in_a_row() -> None:
    trigger = LossImprovementThreshold.preset("paper-0.5pct", window=2)
    assert (trigger.threshold, trigger.patience) == (0.005, 2)
    # windows: 10, 9 (10%), 8.99 (0.1%: one below), 8 (11%: reset), 7.99 (below), 7.985 (below again → fire)
    assert feed(trigger, [10.0, 9.0, 8.99, 8.0, 7.99, 7.985, 7.98]) == [12]


def test_presets_are_the_papers() -> None:
    assert LIT_PRESETS == {
        "paper-1pct": {"threshold": 0.01, "patience": 1},
        "paper-0.5pct": {"threshold": 0.005, "patience": 2},
    }
    with pytest.raises(ValueError):
        LossImprovementThreshold.preset("nope")


# ---------------------------------------------------------------------------------------------------------------
# The unfrozen parameters' own param group (plain PyTorch loop)
# ---------------------------------------------------------------------------------------------------------------


def always_fires(window: int = 1) -> LossImprovementThreshold:
    return LossImprovementThreshold(window=window, threshold=float("inf"), patience=1)  # fires at window 2


def test_new_group_with_its_own_lr_and_warmup(converted: Path) -> None:
    model = load(converted)
    frozen = transferred_parameters(model, converted)
    freeze_transferred(model, converted)
    trainable = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(trainable, lr=1e-3)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5)  # main schedule: a constant half
    lit = LITController(frozen, lr=4e-4, warmup_steps=4, trigger=always_fires(), weight_decay=0.0)
    fired = [lit.step(1.0, opt, sched) for _ in range(2)]
    assert fired == [False, True] and lit.unfrozen_at == 2
    assert len(opt.param_groups) == 2
    group = opt.param_groups[1]
    assert group[GROUP_KEY] and group["weight_decay"] == 0.0
    assert {id(p) for p in group["params"]} == {id(p) for p in frozen.values()}
    assert all(p.requires_grad for p in frozen.values())
    lrs = [group["lr"]]
    for _ in range(5):
        opt.step()
        sched.step()  # torch 2.13 zips groups strictly: this raises unless the group was registered
        lit.step(1.0, opt, sched)
        lrs.append(group["lr"])
    # warmup 1/4 .. 4/4 of 4e-4, times the main schedule's factor 0.5, then flat
    assert lrs == pytest.approx([4e-4 * 0.5 * k / 4 for k in (1, 2, 3, 4, 4, 4)])
    assert opt.param_groups[0]["lr"] == pytest.approx(5e-4)


def test_optimizer_already_holding_frozen_params_is_refused(converted: Path) -> None:
    model = load(converted)
    frozen = transferred_parameters(model, converted)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    lit = LITController(frozen, lr=1e-3, trigger=always_fires())
    lit.step(1.0, opt)
    with pytest.raises(ValueError, match="already in the optimizer"):
        lit.step(1.0, opt)


# ---------------------------------------------------------------------------------------------------------------
# HF Trainer
# ---------------------------------------------------------------------------------------------------------------


class Blocks(torch.utils.data.Dataset):
    def __init__(self, vocab: int, n: int = 16, length: int = 12) -> None:
        self.ids = torch.randint(0, vocab, (n, length), generator=torch.Generator().manual_seed(0))

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


def test_trainer_frozen_until_trigger_then_trained(converted: Path, tmp_path: Path) -> None:
    pytest.importorskip("accelerate")
    from transformers import Trainer, TrainerCallback, TrainingArguments

    model = load(converted)
    frozen = transferred_parameters(model, converted)
    freeze_transferred(model, converted)
    watched = frozen["model.layers.0.mlp.fc1.weight"]
    controller = LITController(frozen, lr=2e-3, warmup_steps=3, trigger=always_fires(window=2))
    lit = LITCallback(controller)
    snapshots: list[torch.Tensor] = []
    group_lrs: dict[int, float] = {}

    class Recorder(TrainerCallback):
        def on_step_end(self, args, state, control, optimizer=None, **kwargs):
            snapshots.append(watched.detach().clone())
            if optimizer.param_groups[-1].get(GROUP_KEY):
                group_lrs[state.global_step] = optimizer.param_groups[-1]["lr"]

    args = TrainingArguments(
        output_dir=str(tmp_path / "out"),
        max_steps=8,
        per_device_train_batch_size=4,
        learning_rate=1e-3,
        lr_scheduler_type="linear",
        warmup_steps=2,
        report_to=[],
        use_cpu=True,
        save_strategy="no",
        logging_steps=1,
        disable_tqdm=True,
        seed=0,
    )
    before = watched.detach().clone()
    data = Blocks(model.config.vocab_size)
    trainer = Trainer(model=model, args=args, train_dataset=data, callbacks=[lit, Recorder()])
    trainer.train()
    # window 2, patience 1: the trigger fires at the end of the second window, step 4; params move from step 5
    assert lit.unfrozen_at == 4
    assert all(torch.equal(s, before) for s in snapshots[:4])
    assert not torch.equal(snapshots[4], before) and not torch.equal(snapshots[-1], snapshots[4])
    # the group's LR: own warmup (3 steps) times the main linear decay, set for each next step
    sched = trainer.lr_scheduler
    main = getattr(sched, "scheduler", sched).lr_lambdas[0]
    for step, lr in group_lrs.items():
        assert lr == pytest.approx(2e-3 * min(1.0, (step - 4 + 1) / 3) * main(step)), step
    assert any(entry.get("lit/unfrozen_at") == 4 for entry in trainer.state.log_history)
