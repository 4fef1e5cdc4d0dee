"""A conversion's model built in memory from its plan, tensor for tensor as `xatl convert` would write it.

Layer selection measures candidate hybrids before anything is written. Building them with the writer's own
`TensorProducer` means the model it measures is the model a conversion writes (same transfers, same seeded init),
without a folder on disk.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from xatl_convert.models import XatlForCausalLM
from xatl_convert.plan import ConversionPlan
from xatl_convert.writer import TensorProducer


def model_from_plan(plan: ConversionPlan, dtype: torch.dtype = torch.float32) -> XatlForCausalLM:
    """The planned model in `dtype`, every tensor made as the writer makes it (a tied head tied again)."""
    with torch.device("meta"):
        model = XatlForCausalLM(plan.target_config)
    model.load_state_dict(planned_tensors(plan, dtype), strict=False, assign=True)
    model.tie_weights()
    still_empty = [name for name, parameter in model.named_parameters() if parameter.is_meta]
    if still_empty:  # a plan covers every target tensor (plan.py checks it); this would be a bug
        raise RuntimeError(f"the plan made no tensor for {', '.join(still_empty[:3])}")
    return model.eval()


def planned_tensors(
    plan: ConversionPlan, dtype: torch.dtype = torch.float32, keep: Callable[[str], bool] | None = None
) -> dict[str, torch.Tensor]:
    """The plan's tensors (those whose name `keep` accepts), made as the writer makes them, cast to `dtype`: always
    copies, since a source tensor read from safetensors is a read-only view of its file (training one in place would
    write to the mapping)."""
    producer = TensorProducer(plan)
    wanted = [tensor for tensor in plan.tensors if keep is None or keep(tensor.name)]
    return {tensor.name: producer.produce(tensor).to(dtype, copy=True) for tensor in wanted}


def planned_modules(plan: ConversionPlan, names: list[str], dtype: torch.dtype = torch.float32) -> dict[str, nn.Module]:
    """Submodules of the planned model (e.g. `model.layers.3.mixer`), each built with just its planned tensors."""
    with torch.device("meta"):
        skeleton = XatlForCausalLM(plan.target_config)
    prefixes = tuple(f"{name}." for name in names)
    tensors = planned_tensors(plan, dtype, lambda tensor: tensor.startswith(prefixes))
    modules = {}
    for name in names:
        module, prefix = skeleton.get_submodule(name), f"{name}."
        own = {key.removeprefix(prefix): value for key, value in tensors.items() if key.startswith(prefix)}
        module.load_state_dict(own, assign=True)
        modules[name] = module.eval()
    return modules
