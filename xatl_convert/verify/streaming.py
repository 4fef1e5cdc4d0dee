"""Layer-streamed forward passes: a model built on the meta device whose big parts are loaded one at a time.

Verify never holds a whole model. The embeddings, each decoder block and the LM head are "streamed units": a
forward pre-hook reads the unit's tensors (upcast to the compute dtype) just before it runs, and a forward hook
frees them just after. Everything else (final norm, rotary tables, position embeddings) is small and loaded once.
The model's own `forward` runs unchanged, so masks, rotary positions and embedding scales are transformers' (or
xatl's) own, for any model class. Peak memory is one unit in the compute dtype plus the activations.
"""

from __future__ import annotations

import ctypes
import functools
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from xatl_convert.errors import XatlError

TensorReader = Callable[[str], torch.Tensor]  # a full parameter name → its tensor (any dtype, read-only is fine)


class StreamingError(XatlError):
    """A model cannot be streamed: its decoder blocks cannot be found, or a tensor is missing or misshapen."""


class _Stop(Exception):
    """Raised by a pre-hook to end a forward pass after the first N blocks (`verify --layers N`)."""


@dataclass
class LayerCall:
    """One decoder block's call in a streamed forward: the block (loaded), its arguments and its output."""

    index: int
    block: nn.Module
    args: tuple[Any, ...]
    kwargs: dict[str, Any]
    output: torch.Tensor

    @property
    def hidden_states(self) -> torch.Tensor:
        """The block's input hidden states (first positional argument, or the `hidden_states` keyword)."""
        return self.args[0] if self.args else self.kwargs["hidden_states"]


LayerCallback = Callable[[LayerCall], None]
InputOverride = Callable[[int, torch.Tensor], torch.Tensor | None]  # (block index, its own input) → replacement


_M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter (malloc.h)


@functools.cache
def return_freed_blocks_to_the_os() -> bool:
    """Make freed block-sized tensors leave the process, not glibc's heap. Called once by verify.

    glibc maps allocations above a threshold and unmaps them on free, but raises that threshold (up to 32 MB) each
    time such a block is freed; streamed blocks then land in the heap, which does not shrink, and RSS grows by
    tens of megabytes per layer (measured on a pythia-1.4b-shaped model: 3.3 GB peak instead of 1.35 GB, and 10%
    slower). Fixing the threshold at 1 MB keeps it. No-op where the C library has no mallopt (macOS, musl).
    """
    try:
        return bool(ctypes.CDLL(None).mallopt(_M_MMAP_THRESHOLD, 1 << 20))
    except (OSError, AttributeError):
        return False


def decoder_blocks(model: nn.Module, num_layers: int) -> tuple[str, nn.ModuleList]:
    """The ModuleList of the model's `num_layers` decoder blocks and its name (model.layers, transformer.h, ...)."""
    found = [
        (name, module)
        for name, module in model.named_modules()
        if isinstance(module, nn.ModuleList) and len(module) == num_layers and num_layers > 0
    ]
    if len(found) != 1:
        names = ", ".join(name for name, _ in found) or "none"
        raise StreamingError(
            f"{type(model).__name__}: cannot tell its {num_layers} decoder blocks apart (lists of that length: {names})"
        )
    return found[0]


def hidden_output(output: Any) -> torch.Tensor:
    """A block's output hidden states: the tensor itself, or the first item of a tuple (older transformers)."""
    return output[0] if isinstance(output, (tuple, list)) else output


class StreamedModel:
    """A meta-device model, built in its compute dtype (float32, or float64 for exactness), run one unit at a time
    from `read` on `device`.

    `forward(input_ids)` returns the logits; `on_layer` sees each block while it is loaded; `replace_input(i, own)` may
    hand block i other input hidden states (teacher forcing, for the twin check); `layers=N` stops after N blocks.
    """

    def __init__(
        self,
        model: nn.Module,
        read: TensorReader,
        num_layers: int,
        device: torch.device | str = "cpu",
        on_block: Callable[[int], None] | None = None,
    ) -> None:
        self.model = model.eval()
        self.on_block = on_block  # told each block's index as it starts (a progress display)
        self.read = read
        self.device = torch.device(device)
        blocks_name, self.blocks = decoder_blocks(model, num_layers)
        embedding, head = model.get_input_embeddings(), model.get_output_embeddings()
        names = {module: name for name, module in model.named_modules()}
        self.aliases: dict[str, str] = {}  # a tied head reads its embedding's tensor, into its own copy
        if head is not None and embedding is not None and head.weight is embedding.weight:
            head.weight = nn.Parameter(torch.empty_like(head.weight, device="meta"), requires_grad=False)
            self.aliases[f"{names[head]}.weight"] = f"{names[embedding]}.weight"
        # in the order they run: the reader can then prefetch the next one while one computes
        self.units: dict[str, nn.Module] = {names[embedding]: embedding} if embedding is not None else {}
        self.units.update({f"{blocks_name}.{i}": block for i, block in enumerate(self.blocks)})
        if head is not None:
            self.units[names[head]] = head
        self._load_resident(names)
        self.peak_unit_bytes = 0

    # -- loading and freeing ---------------------------------------------------------------------------------

    def _load_resident(self, names: dict[nn.Module, str]) -> None:
        """Load every tensor outside the streamed units once: final norm, rotary tables, position embeddings."""
        inside = {id(sub) for unit in self.units.values() for sub in unit.modules()}
        for module, name in names.items():
            if id(module) in inside:
                continue
            owned = list(module.named_parameters(recurse=False)) + list(module.named_buffers(recurse=False))
            if owned:
                self._load(module, name, recurse=False)

    def _load(self, module: nn.Module, prefix: str, recurse: bool = True) -> None:
        """Give the module (and, with recurse, its children) real tensors: persistent ones from `read`,
        non-persistent buffers (rotary tables) recomputed the way transformers does when it loads a model."""
        modules = list(module.named_modules(prefix=prefix)) if recurse else [(prefix, module)]
        with torch.no_grad():
            for module_name, sub in modules:
                for name, parameter in list(sub.named_parameters(recurse=False)):
                    value = self._tensor(f"{module_name}.{name}" if module_name else name, parameter)
                    loaded = nn.Parameter(value, requires_grad=False)
                    # a new tensor object: mark it too, or the _init_weights below (for a module that also has a
                    # non-persistent buffer, such as Gemma's scaled embedding) would re-initialise the weight
                    loaded._is_hf_initialized = True  # type: ignore[attr-defined]
                    sub._parameters[name] = loaded
                for name, buffer in list(sub.named_buffers(recurse=False)):
                    if name in sub._non_persistent_buffers_set:
                        sub._buffers[name] = torch.empty_like(buffer, device=self.device)
                    else:
                        sub._buffers[name] = self._tensor(f"{module_name}.{name}" if module_name else name, buffer)
                if sub._non_persistent_buffers_set and hasattr(self.model, "_init_weights"):
                    self.model._init_weights(sub)  # transformers recomputes these (rotary tables) the same way

    def _tensor(self, name: str, like: torch.Tensor) -> torch.Tensor:
        """`read(name)` in `like`'s dtype on the device. A fresh tensor that already fits (a plan's or an init's)
        is used as it is; anything else (a read-only map of a file, another dtype) is copied into new memory, so
        a module never holds two copies of a tensor, nor a file's pages."""
        value = self.read(self.aliases.get(name, name))
        if tuple(value.shape) != tuple(like.shape):
            raise StreamingError(
                f"{name}: {list(value.shape)} where {type(self.model).__name__} needs {list(like.shape)}"
            )
        if not _owned(value, like.dtype, self.device):
            value = torch.empty(like.shape, dtype=like.dtype, device=self.device).copy_(value)
        value._is_hf_initialized = True  # type: ignore[attr-defined]  # transformers' init leaves it alone
        return value

    def _free(self, module: nn.Module) -> None:
        module.to("meta")

    @contextmanager
    def loaded(self, name: str) -> Iterator[nn.Module]:
        """A streamed unit (by module name, e.g. model.layers.3) with its tensors loaded, freed on exit."""
        module = self.units[name]
        self._load(module, name)
        self.peak_unit_bytes = max(self.peak_unit_bytes, _bytes(module))
        try:
            yield module
        finally:
            self._free(module)

    # -- running ---------------------------------------------------------------------------------------------

    def forward(
        self,
        input_ids: torch.Tensor,
        on_layer: LayerCallback | None = None,
        replace_input: InputOverride | None = None,
        layers: int | None = None,
    ) -> torch.Tensor | None:
        """Logits of a full forward pass (None when stopped after `layers` blocks)."""
        handles = []
        names = {module: name for name, module in self.units.items()}
        for module, name in names.items():
            index = next((i for i, block in enumerate(self.blocks) if block is module), None)
            handles.append(module.register_forward_pre_hook(self._pre_hook(name, index, replace_input, layers),
                                                            with_kwargs=True))  # fmt: skip
            handles.append(module.register_forward_hook(self._post_hook(index, on_layer), with_kwargs=True))
        try:
            with torch.no_grad():
                output = self.model(input_ids=input_ids, use_cache=False)
        except _Stop:
            return None
        finally:
            for handle in handles:
                handle.remove()
            for module in names:
                self._free(module)
        return output.logits

    def _pre_hook(
        self, name: str, index: int | None, replace_input: InputOverride | None, layers: int | None
    ) -> Callable[..., Any]:
        def hook(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
            if index is not None and layers is not None and index >= layers:
                raise _Stop
            if index is not None and self.on_block is not None:
                self.on_block(index)
            self._load(module, name)
            self.peak_unit_bytes = max(self.peak_unit_bytes, _bytes(module))
            self._prefetch_after(name)
            if replace_input is None or index is None:
                return None
            replacement = replace_input(index, args[0] if args else kwargs["hidden_states"])
            if replacement is None:
                return None
            if args:
                return (replacement, *args[1:]), kwargs
            return args, {**kwargs, "hidden_states": replacement}

        return hook

    def _prefetch_after(self, name: str) -> None:
        """Let the reader start on the unit that runs next (embedding → blocks → head) while this one computes."""
        prefetch = getattr(self.read, "prefetch", None)
        order = list(self.units)
        position = order.index(name)
        if prefetch is None or position + 1 >= len(order):
            return
        following = order[position + 1]
        prefetch(self.aliases.get(tensor, tensor) for tensor in tensor_names(self.units[following], following))

    def _post_hook(self, index: int | None, on_layer: LayerCallback | None) -> Callable[..., Any]:
        def hook(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], output: Any) -> Any:
            if index is not None and on_layer is not None:
                on_layer(LayerCall(index, module, args, kwargs, hidden_output(output)))
            self._free(module)
            return None

        return hook


def tensor_names(module: nn.Module, prefix: str = "") -> list[str]:
    """The full names of a module's parameters and persistent buffers, as a state dict holds them (tied ones
    under each name): what `read` is asked for."""
    names = []
    for module_name, sub in module.named_modules(prefix=prefix):
        own = [name for name, _ in sub.named_parameters(recurse=False)]
        own += [name for name, _ in sub.named_buffers(recurse=False) if name not in sub._non_persistent_buffers_set]
        names += [f"{module_name}.{name}" if module_name else name for name in own]
    return names


def _owned(tensor: torch.Tensor, dtype: torch.dtype, device: torch.device) -> bool:
    """Whether a tensor can become a parameter as it is: right dtype and device, and the sole, whole, growable
    (so not file-mapped) owner of its memory."""
    storage = tensor.untyped_storage()
    return (
        tensor.dtype == dtype
        and tensor.device == device
        and tensor.is_contiguous()
        and tensor.storage_offset() == 0
        and storage.nbytes() == tensor.numel() * tensor.element_size()
        and storage.resizable()
    )


def _bytes(module: nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in (*module.parameters(), *module.buffers()))


def relative_error(actual: torch.Tensor, reference: torch.Tensor) -> float:
    """max |actual - reference| / max |reference|: one number per layer that means the same at every scale.

    Real checkpoints carry activations in the hundreds; an absolute bound either fails them or misses real bugs.
    """
    difference = (actual.to(reference.dtype) - reference).abs().max().item()
    scale = reference.abs().max().item()
    return difference / scale if scale > 0 else difference
