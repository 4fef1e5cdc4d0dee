"""Where a streamed model's tensors come from: a checkpoint's files, a plan, or the target family's own init.

Each reader maps a full parameter name to a tensor, one call per tensor, so nothing holds a whole model.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from xatl_convert.errors import SourceError
from xatl_convert.models import XatlConfig, XatlForCausalLM
from xatl_convert.plan import ConversionPlan, PlannedTensor, init_unit
from xatl_convert.sources import SourceCheckpoint
from xatl_convert.verify.streaming import StreamingError, tensor_names
from xatl_convert.writer import TensorProducer, initialise_module


class CheckpointTensors:
    """A checkpoint's tensors under the parameter names of the model that reads them.

    With a transformers `model`, checkpoint names are renamed as `from_pretrained` renames them (transformers'
    own conversion mapping, e.g. GPT-NeoX's embed_out → lm_head, and the base-model prefix), and a tied parameter
    absent from the file reads the tensor it is tied to.
    """

    def __init__(self, checkpoint: SourceCheckpoint, model: nn.Module | None = None) -> None:
        self.checkpoint = checkpoint
        self.aliases: dict[str, str] = {}
        if model is not None:
            self._learn_aliases(model)

    def _learn_aliases(self, model: nn.Module) -> None:
        needed = tensor_names(model)
        renamed = _transformers_names(model, list(self.checkpoint.tensors), set(needed))
        self.aliases = {new: old for old, new in renamed.items() if new != old}
        present = set(renamed.values())
        tied = getattr(model, "all_tied_weights_keys", None) or {}
        for name in needed:
            if name in present:
                continue
            target = tied.get(name) if isinstance(tied, dict) else None
            if target in present:
                self.aliases[name] = self.aliases.get(target, target)
                continue
            raise StreamingError(
                f"{self.checkpoint.path}: has no tensor for {name!r}, which transformers' {type(model).__name__} needs"
            )

    def __call__(self, name: str) -> torch.Tensor:
        return self.checkpoint.read(self.aliases.get(name, name))

    def prefetch(self, names: Iterable[str]) -> None:
        self.checkpoint.prefetch(self.aliases.get(name, name) for name in names)


def _transformers_names(model: nn.Module, keys: list[str], needed: set[str]) -> dict[str, str]:
    """Checkpoint key → the model's parameter name, as `from_pretrained` renames it. A key that transformers
    converts (fuses, splits) rather than renames cannot be streamed tensor by tensor: StreamingError."""
    try:
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import WeightConverter, WeightRenaming, rename_source_key
    except ImportError:  # an older transformers: names are the checkpoint's own
        return {key: key for key in keys}
    prefix = getattr(model, "base_model_prefix", None) or None
    meta = dict.fromkeys(needed, True)
    renamed = {}
    try:  # transformers' loading internals: a version that changed them must not crash verify
        transforms = get_model_conversion_mapping(model)
        renamings = [t for t in transforms if isinstance(t, WeightRenaming)]
        converters = [t for t in transforms if isinstance(t, WeightConverter)]
        for key in keys:
            new, converted = rename_source_key(key, renamings, converters, prefix, meta)
            if converted is not None:
                raise StreamingError(
                    f"transformers converts {key!r} on load ({converted}); verify reads tensors as stored"
                )
            renamed[key] = new
    except (TypeError, AttributeError, ValueError) as error:
        raise StreamingError(f"this transformers' checkpoint renaming is not one verify knows ({error})") from None
    return renamed


class PlannedTensors:
    """A plan's tensors, made on demand exactly as `xatl convert` makes them (read, transform, cast)."""

    def __init__(self, plan: ConversionPlan) -> None:
        self.planned: dict[str, PlannedTensor] = {tensor.name: tensor for tensor in plan.tensors}
        self.producer = TensorProducer(plan)

    def __call__(self, name: str) -> torch.Tensor:
        planned = self.planned.get(name)
        if planned is None:
            raise SourceError(f"the plan has no tensor {name!r}")
        return self.producer.produce(planned)

    def prefetch(self, names: Iterable[str]) -> None:
        """Start reading the source tensors that these planned tensors are made from."""
        planned = [self.planned[name] for name in names if name in self.planned]
        self.producer.plan.source.prefetch(source for tensor in planned for source in _sources(tensor))


def _sources(tensor: PlannedTensor) -> list[str]:
    return [*tensor.sources, *(name for part in tensor.parts for name in part.sources)]


class InitialisedTensors:
    """Every tensor of a from-scratch model, as `xatl convert` initialises one: per module, seeded by its name."""

    def __init__(self, config: XatlConfig, seed: int) -> None:
        with torch.device("meta"):
            self.skeleton = XatlForCausalLM(config)
        self.seed = seed
        self._unit: str | None = None
        self._tensors: dict[str, torch.Tensor] = {}

    def __call__(self, name: str) -> torch.Tensor:
        unit = init_unit(name)
        if unit != self._unit:
            self._tensors = {}  # free the previous module's tensors before making the next
            self._tensors = initialise_module(self.skeleton, unit, self.seed)
            self._unit = unit
        return self._tensors[name]
