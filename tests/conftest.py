"""Fixtures: tiny GPT-NeoX checkpoints built with transformers, saved in each on-disk layout."""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from transformers import GPTNeoXConfig, GPTNeoXForCausalLM
from transformers.utils import logging as transformers_logging

import xatl_convert  # (registers the xatl Auto classes)

REPO_ROOT = Path(__file__).resolve().parents[1]
if os.environ.get("XATL_TEST_INSTALLED") and Path(xatl_convert.__file__).resolve().is_relative_to(REPO_ROOT):
    raise pytest.UsageError(
        f"XATL_TEST_INSTALLED is set but xatl_convert comes from the checkout ({xatl_convert.__file__}); install the "
        "wheel (pip install .) and run the tests from tests/ (see .ci/run)"
    )

transformers_logging.disable_progress_bar()
transformers_logging.set_verbosity_error()

EXAMPLE_CHECKPOINT = REPO_ROOT / "examples" / "pythia-tiny"

NeoxFactory = Callable[..., Path]

# The checks `xatl verify` runs on CPU, in report order (CUDA adds the kernel checks).
VERIFY_CHECK_NAMES = [
    "tensors as planned",
    "transfers exact",
    "logits finite",
    "sample losses finite",
    "source twin = source",
    "incremental decoding = full forward",
    "mamba kernel call sites = reference",
]


def tiny_neox_config(**overrides: object) -> GPTNeoXConfig:
    values: dict[str, object] = {
        "vocab_size": 96,
        "hidden_size": 32,
        "num_hidden_layers": 4,
        "num_attention_heads": 4,
        "intermediate_size": 64,
        "max_position_embeddings": 128,
        "rotary_pct": 0.25,
        "use_parallel_residual": True,
    }
    values.update(overrides)
    return GPTNeoXConfig(**values)


def save_neox(folder: Path, layout: str = "safetensors", seed: int = 0, **overrides: object) -> Path:
    """Save a random tiny GPTNeoXForCausalLM in one of the layouts users have: safetensors, sharded, or .bin."""
    torch.manual_seed(seed)
    model = GPTNeoXForCausalLM(tiny_neox_config(**overrides)).eval()
    model.save_pretrained(folder)
    if layout == "safetensors":
        return folder
    on_disk = _read_safetensors(folder / "model.safetensors")
    (folder / "model.safetensors").unlink()
    if layout == "sharded":
        names = sorted(on_disk)
        halves = {"model-00001-of-00002.safetensors": names[::2], "model-00002-of-00002.safetensors": names[1::2]}
        weight_map = {}
        for file, members in halves.items():
            save_file({name: on_disk[name] for name in members}, folder / file, metadata={"format": "pt"})
            weight_map.update(dict.fromkeys(members, file))
        index = {"metadata": {"total_size": 0}, "weight_map": weight_map}
        (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    elif layout == "bin":
        torch.save(on_disk, folder / "pytorch_model.bin")
    else:
        raise ValueError(layout)
    return folder


def _read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(path)


@pytest.fixture
def make_neox(tmp_path: Path) -> NeoxFactory:
    """Build a tiny GPT-NeoX checkpoint folder; keyword arguments override its config."""
    counter = iter(range(1000))

    def factory(layout: str = "safetensors", **overrides: object) -> Path:
        return save_neox(tmp_path / f"neox-{next(counter)}", layout, **overrides)

    return factory


@pytest.fixture(scope="session")
def neox_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One shared tiny GPT-NeoX checkpoint (parallel residual, partial rotary) for read-only tests."""
    return save_neox(tmp_path_factory.mktemp("neox") / "source")


DISTILL_TEXT = "\n\n".join(
    path.read_text() for path in [REPO_ROOT / "README.md", *sorted((REPO_ROOT / "docs").glob("*.md"))]
)


@pytest.fixture(scope="module")
def distill_student(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The example converted to Mamba with layer 1 kept as attention: a hybrid student for distillation tests."""
    from xatl_convert.conversion import convert

    out = tmp_path_factory.mktemp("distill") / "student"
    convert(EXAMPLE_CHECKPOINT, out, attn_layers="1")
    return out


@pytest.fixture
def distill_text(tmp_path: Path) -> Path:
    """README and docs as one text file: English technical text that the example never trained on."""
    (tmp_path / "text.txt").write_text(DISTILL_TEXT)
    return tmp_path / "text.txt"
