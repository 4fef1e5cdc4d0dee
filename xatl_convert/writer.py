"""Execute a ConversionPlan: stream tensors into safetensors shards inside a temporary folder, then rename it.

Source tensors are read from the memory map one at a time, transformed and cast; new tensors come from the target
module's own initialisation, seeded per module name so that a rerun is byte-identical. A shard is written as soon
as its last tensor is ready and then released. An error or an interrupt (Ctrl-C, SIGTERM) removes the temporary
folder, so no half-written output is ever left behind.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import json
import os
import shutil
import signal
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from rich.progress import (
    BarColumn,
    DownloadColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TransferSpeedColumn,
)
from safetensors.torch import save_file
from torch import nn

from xatl_convert.errors import OutputExistsError
from xatl_convert.manifest import MANIFEST_NAME, build_manifest
from xatl_convert.model_card import render_model_card
from xatl_convert.models import XatlForCausalLM, init_xatl_weights
from xatl_convert.plan import ConversionPlan, PlannedTensor

SINGLE_SHARD_NAME = "model.safetensors"
SHARD_INDEX_NAME = "model.safetensors.index.json"
DEFAULT_MAX_SHARD_BYTES = 2 * 1024**3
MODELING_FILES = ("configuration_xatl.py", "modeling_xatl.py")
AUTO_MAP = {
    "AutoConfig": "configuration_xatl.XatlConfig",
    "AutoModel": "modeling_xatl.XatlModel",
    "AutoModelForCausalLM": "modeling_xatl.XatlForCausalLM",
}


@dataclass(frozen=True)
class Shard:
    """One output file and the tensors it holds, decided before anything is written."""

    file: str
    tensors: tuple[PlannedTensor, ...]


def plan_shards(plan: ConversionPlan, max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES) -> list[Shard]:
    """Group tensors in plan order into shards of at most max_shard_bytes (a larger tensor gets its own)."""
    groups: list[list[PlannedTensor]] = [[]]
    size = 0
    for tensor in plan.tensors:
        if groups[-1] and size + tensor.nbytes > max_shard_bytes:
            groups.append([])
            size = 0
        groups[-1].append(tensor)
        size += tensor.nbytes
    if len(groups) == 1:
        return [Shard(SINGLE_SHARD_NAME, tuple(groups[0]))]
    count = len(groups)
    return [
        Shard(f"model-{index:05d}-of-{count:05d}.safetensors", tuple(group)) for index, group in enumerate(groups, 1)
    ]


def write_output(
    plan: ConversionPlan,
    out: Path,
    force: bool = False,
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
    command_line: str | None = None,
    show_progress: bool = False,
) -> Path:
    """Write the converted model folder atomically; returns its path."""
    out = Path(out)
    ensure_writable(out, force)
    with _atomic_folder(out) as staging:
        shards = plan_shards(plan, max_shard_bytes)
        producer = TensorProducer(plan)
        with _progress(plan, show_progress) as advance:
            for shard in shards:
                tensors = {}
                for planned in shard.tensors:
                    tensors[planned.name] = producer.produce(planned)
                    advance(planned.nbytes)
                save_file(tensors, staging / shard.file, metadata={"format": "pt"})
                del tensors
        if len(shards) > 1:
            _write_json(staging / SHARD_INDEX_NAME, _shard_index(shards))
        manifest = build_manifest(plan, command_line)
        _write_config(plan, staging)
        for file in plan.source.tokenizer_files():
            shutil.copy2(file, staging / file.name)
        models_dir = Path(__file__).parent / "models"
        for name in MODELING_FILES:
            shutil.copy2(models_dir / name, staging / name)
        _write_json(staging / MANIFEST_NAME, manifest)
        (staging / "README.md").write_text(render_model_card(plan, manifest))
    return out


def ensure_writable(out: Path, force: bool) -> None:
    """Refuse to replace an existing folder unless forced; checked before planning and again before writing."""
    if out.exists() and not force:
        raise OutputExistsError(f"{out}: already exists; pass --force to replace it")


class TensorProducer:
    """Makes each planned tensor: read + transform + cast, or initialise its module once and hand out its tensors."""

    def __init__(self, plan: ConversionPlan) -> None:
        self.plan = plan
        self._skeleton: nn.Module | None = None
        self._unit_name: str | None = None
        self._unit_tensors: dict[str, torch.Tensor] = {}

    def produce(self, planned: PlannedTensor) -> torch.Tensor:
        if planned.status == "transferred":
            assert planned.transform is not None
            tensor = planned.transform.apply([self.plan.source.read(name) for name in planned.sources])
        elif planned.strategy == "zeros":
            tensor = torch.zeros(planned.shape)
        elif planned.strategy == "ones":
            tensor = torch.ones(planned.shape)
        else:
            tensor = self._initialised(planned)
        if planned.parts:
            tensor = tensor.clone()
            for part in planned.parts:
                start, stop = part.rows
                tensor[start:stop] = part.transform.apply([self.plan.source.read(name) for name in part.sources])
        # Source reads are fresh buffers; contiguous() copies only where a transform left a strided view.
        return tensor.to(planned.dtype).contiguous()

    def _initialised(self, planned: PlannedTensor) -> torch.Tensor:
        unit = planned.init_unit
        if unit != self._unit_name:
            self._unit_tensors = initialise_module(self._meta_model(), unit, self.plan.seed)
            self._unit_name = unit
        return self._unit_tensors[planned.name]

    def _meta_model(self) -> nn.Module:
        if self._skeleton is None:
            with torch.device("meta"):
                self._skeleton = XatlForCausalLM(self.plan.target_config)
        return self._skeleton


def initialise_module(skeleton: nn.Module, unit: str, seed: int) -> dict[str, torch.Tensor]:
    """Materialise one submodule of a meta skeleton and run the target family's own init on it, seeded by name."""
    module = copy.deepcopy(skeleton.get_submodule(unit)).to_empty(device="cpu")
    config = skeleton.config
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(unit_seed(seed, unit))
        with torch.no_grad():
            for child in module.modules():
                init_xatl_weights(child, config)
    return {f"{unit}.{name}": tensor for name, tensor in module.state_dict().items()}


def unit_seed(seed: int, unit: str) -> int:
    """A per-module seed, so a tensor's init depends on its name and the run seed, not on plan order."""
    digest = hashlib.sha256(f"{seed}:{unit}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def _write_config(plan: ConversionPlan, folder: Path) -> None:
    config = copy.deepcopy(plan.target_config)
    config.architectures = ["XatlForCausalLM"]
    config.auto_map = dict(AUTO_MAP)
    config.dtype = str(plan.dtype).removeprefix("torch.")
    config.save_pretrained(folder)


def _shard_index(shards: list[Shard]) -> dict[str, Any]:
    total = sum(tensor.nbytes for shard in shards for tensor in shard.tensors)
    weight_map = {tensor.name: shard.file for shard in shards for tensor in shard.tensors}
    return {"metadata": {"total_size": total}, "weight_map": weight_map}


def _write_json(path: Path, data: Any) -> None:
    path.write_text(json.dumps(data, indent=2) + "\n")


@contextlib.contextmanager
def _atomic_folder(out: Path) -> Iterator[Path]:
    """Yield a staging folder beside `out`; move it into place only if the block completes."""
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = out.parent / f".{out.name}.xatl-partial-{os.getpid()}"
    if staging.exists():
        shutil.rmtree(staging)
    staging.mkdir()
    try:
        with _sigterm_as_interrupt():
            yield staging
            if out.exists():
                retired = out.parent / f".{out.name}.xatl-replaced-{os.getpid()}"
                out.rename(retired)
                staging.rename(out)
                shutil.rmtree(retired, ignore_errors=True)
            else:
                staging.rename(out)
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)


@contextlib.contextmanager
def _sigterm_as_interrupt() -> Iterator[None]:
    """Treat SIGTERM like Ctrl-C while writing, so that the cleanup in _atomic_folder runs."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def interrupt(signum: int, frame: object) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


@contextlib.contextmanager
def _progress(plan: ConversionPlan, show: bool) -> Iterator[Any]:
    """A Rich progress bar over bytes written (tensors counted in the description), or a no-op."""
    if not show:
        yield lambda nbytes: None
        return
    total_tensors = len(plan.tensors)
    columns = (
        TextColumn("[bold]writing[/] {task.fields[done]}/{task.fields[count]} tensors"),
        BarColumn(),
        DownloadColumn(),
        TransferSpeedColumn(),
        TextColumn("{task.fields[tensor_rate]:.0f} tensors/s"),
        TimeElapsedColumn(),
    )
    with Progress(*columns, transient=False) as progress:
        task = progress.add_task("write", total=plan.total_bytes(), done=0, count=total_tensors, tensor_rate=0.0)
        done = 0

        def advance(nbytes: int) -> None:
            nonlocal done
            done += 1
            elapsed = progress.tasks[task].elapsed or 0.0
            progress.update(task, advance=nbytes, done=done, tensor_rate=done / elapsed if elapsed > 0 else 0.0)

        yield advance
