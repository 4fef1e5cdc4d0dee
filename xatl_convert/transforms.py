"""The closed set of tensor transforms that a mapping rule may apply.

Each transform knows the output shape it will produce from its input shapes, so the plan checks every shape before
a byte is read, and on a mismatch says which dimension must agree. A rule's ``transform`` is a name (``copy``), a
one-key mapping (``{split_heads: {parts: 3, take: 0, heads: 16}}``) or a list of those, applied in order.
"""

from __future__ import annotations

import difflib
import math
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, ValidationError

if TYPE_CHECKING:  # torch is imported where a transform is applied: mapping commands run without it
    import torch

Shape = tuple[int, ...]


class TransformShapeError(ValueError):
    """The input shapes do not fit the transform; the message names the dimension that must agree."""


class Transform(BaseModel):
    """Base of every transform: frozen, no unknown keys, one source tensor unless it says otherwise."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    name: ClassVar[str]
    inputs: ClassVar[str] = "one"  # "one" or "many"

    def output_shape(self, shapes: Sequence[Shape]) -> Shape:
        raise NotImplementedError

    def apply(self, tensors: Sequence[torch.Tensor]) -> torch.Tensor:
        raise NotImplementedError

    def describe(self) -> str:
        arguments = ", ".join(f"{key}={value}" for key, value in self.model_dump().items())
        return f"{self.name}({arguments})" if arguments else self.name

    def spec(self) -> dict[str, Any]:
        return {self.name: self.model_dump()}


class Copy(Transform):
    """Take the source tensor as it is."""

    name: ClassVar[str] = "copy"

    def output_shape(self, shapes: Sequence[Shape]) -> Shape:
        return shapes[0]

    def apply(self, tensors: Sequence[torch.Tensor]) -> torch.Tensor:
        return tensors[0]


class Transpose(Transform):
    """Swap two dimensions (by default the two of a matrix), e.g. Conv1D-style (in, out) weights."""

    name: ClassVar[str] = "transpose"
    dims: tuple[int, int] = (0, 1)

    def output_shape(self, shapes: Sequence[Shape]) -> Shape:
        shape = list(shapes[0])
        first, second = (_check_dim(dim, len(shape), self.name) for dim in self.dims)
        shape[first], shape[second] = shape[second], shape[first]
        return tuple(shape)

    def apply(self, tensors: Sequence[torch.Tensor]) -> torch.Tensor:
        return tensors[0].transpose(*self.dims)


class SplitHeads(Transform):
    """Take one part of a fused projection such as QKV, whose rows hold `parts` blocks per head or per tensor.

    ``interleaved`` (GPT-NeoX) stores rows as (heads, parts, head_dim); ``blocked`` stores (parts, heads, head_dim):
    all queries, then all keys, then all values.
    """

    name: ClassVar[str] = "split_heads"
    parts: int
    take: int
    heads: int
    layout: Literal["interleaved", "blocked"] = "interleaved"

    def output_shape(self, shapes: Sequence[Shape]) -> Shape:
        shape = shapes[0]
        if not 0 <= self.take < self.parts:
            raise TransformShapeError(f"split_heads: take={self.take} is outside 0..{self.parts - 1}")
        if not shape or shape[0] % (self.parts * self.heads):
            raise TransformShapeError(
                f"split_heads: dimension 0 of {list(shape)} must be a multiple of parts × heads "
                f"= {self.parts} × {self.heads} = {self.parts * self.heads}"
            )
        return (shape[0] // self.parts, *shape[1:])

    def apply(self, tensors: Sequence[torch.Tensor]) -> torch.Tensor:
        tensor = tensors[0]
        rest = tensor.shape[1:]
        head_dim = tensor.shape[0] // (self.parts * self.heads)
        if self.layout == "interleaved":
            part = tensor.reshape(self.heads, self.parts, head_dim, *rest)[:, self.take]
        else:
            part = tensor.reshape(self.parts, self.heads, head_dim, *rest)[self.take]
        return part.reshape(self.heads * head_dim, *rest)


class Concat(Transform):
    """Join several source tensors along one dimension, e.g. up and gate projections into one fc1."""

    name: ClassVar[str] = "concat"
    inputs: ClassVar[str] = "many"
    dim: int = 0

    def output_shape(self, shapes: Sequence[Shape]) -> Shape:
        first = shapes[0]
        dim = _check_dim(self.dim, len(first), self.name)
        for index, shape in enumerate(shapes[1:], start=1):
            if len(shape) != len(first) or any(
                a != b for axis, (a, b) in enumerate(zip(shape, first, strict=True)) if axis != dim
            ):
                raise TransformShapeError(
                    f"concat: source {index} has shape {list(shape)}, source 0 has {list(first)}; "
                    f"every dimension except {dim} must agree"
                )
        total = sum(shape[dim] for shape in shapes)
        return (*first[:dim], total, *first[dim + 1 :])

    def apply(self, tensors: Sequence[torch.Tensor]) -> torch.Tensor:
        import torch

        return torch.cat(list(tensors), dim=self.dim)


class Slice(Transform):
    """Keep rows start..stop (exclusive) of one dimension."""

    name: ClassVar[str] = "slice"
    dim: int = 0
    start: int = 0
    stop: int

    def output_shape(self, shapes: Sequence[Shape]) -> Shape:
        shape = list(shapes[0])
        dim = _check_dim(self.dim, len(shape), self.name)
        if not 0 <= self.start < self.stop <= shape[dim]:
            raise TransformShapeError(
                f"slice: {self.start}:{self.stop} does not fit dimension {dim} of size {shape[dim]}"
            )
        shape[dim] = self.stop - self.start
        return tuple(shape)

    def apply(self, tensors: Sequence[torch.Tensor]) -> torch.Tensor:
        return tensors[0].narrow(self.dim, self.start, self.stop - self.start)


class Reshape(Transform):
    """Give the tensor a new shape with the same number of elements (-1 infers one dimension)."""

    name: ClassVar[str] = "reshape"
    shape: tuple[int, ...]

    def output_shape(self, shapes: Sequence[Shape]) -> Shape:
        count = math.prod(shapes[0])
        known = math.prod(dim for dim in self.shape if dim != -1)
        if list(self.shape).count(-1) > 1 or known == 0 or count % known:
            raise TransformShapeError(f"reshape: {list(shapes[0])} ({count} elements) cannot become {self.shape}")
        shape = tuple(count // known if dim == -1 else dim for dim in self.shape)
        if math.prod(shape) != count:
            raise TransformShapeError(
                f"reshape: {list(shapes[0])} has {count} elements, {list(shape)} needs {math.prod(shape)}"
            )
        return shape

    def apply(self, tensors: Sequence[torch.Tensor]) -> torch.Tensor:
        return tensors[0].reshape(self.shape)


class Repeat(Transform):
    """Repeat each of `heads` row blocks `times` times, as grouped-query attention shares kv heads."""

    name: ClassVar[str] = "repeat"
    heads: int
    times: int

    def output_shape(self, shapes: Sequence[Shape]) -> Shape:
        shape = shapes[0]
        if not shape or shape[0] % self.heads:
            raise TransformShapeError(f"repeat: dimension 0 of {list(shape)} must be a multiple of heads={self.heads}")
        return (shape[0] * self.times, *shape[1:])

    def apply(self, tensors: Sequence[torch.Tensor]) -> torch.Tensor:
        tensor = tensors[0]
        grouped = tensor.reshape(self.heads, tensor.shape[0] // self.heads, *tensor.shape[1:])
        return grouped.repeat_interleave(self.times, dim=0).reshape(-1, *tensor.shape[1:])


class Cast(Transform):
    """Change the dtype of this tensor alone (the output dtype of the whole model is a convert option)."""

    name: ClassVar[str] = "cast"
    dtype: Literal["float32", "float16", "bfloat16", "float64"]

    def output_shape(self, shapes: Sequence[Shape]) -> Shape:
        return shapes[0]

    def apply(self, tensors: Sequence[torch.Tensor]) -> torch.Tensor:
        import torch

        return tensors[0].to(getattr(torch, self.dtype))


class Split(Transform):
    """Cut one dimension into parts of the given sizes and keep one part, or several joined in the order given.

    Phi-3's fused q/k/v has unequal parts (`sizes: [H·d, KV·d, KV·d], names: [q, k, v], take: k`); its gate_up is
    [gate; up] while xatl's gated fc1 is [up; gate] (`names: [gate, up], take: [up, gate]`).
    """

    name: ClassVar[str] = "split"
    sizes: tuple[int, ...]
    take: int | str | tuple[int | str, ...]
    names: tuple[str, ...] | None = None
    dim: int = 0

    def _indexes(self) -> list[int]:
        wanted = self.take if isinstance(self.take, tuple) else (self.take,)
        if self.names is not None and len(self.names) != len(self.sizes):
            raise TransformShapeError(f"split: {len(self.names)} names for {len(self.sizes)} sizes")
        indexes = []
        for item in wanted:
            if isinstance(item, str):
                if self.names is None or item not in self.names:
                    known = f"names {list(self.names)}" if self.names else "no names; give names or an index"
                    raise TransformShapeError(f"split: take {item!r} is not a part ({known})")
                indexes.append(self.names.index(item))
            elif not 0 <= item < len(self.sizes):
                raise TransformShapeError(f"split: take {item} is outside 0..{len(self.sizes) - 1}")
            else:
                indexes.append(item)
        return indexes

    def output_shape(self, shapes: Sequence[Shape]) -> Shape:
        shape = list(shapes[0])
        dim = _check_dim(self.dim, len(shape), self.name)
        if any(size <= 0 for size in self.sizes) or sum(self.sizes) != shape[dim]:
            raise TransformShapeError(
                f"split: sizes {list(self.sizes)} add up to {sum(self.sizes)}, but dimension {dim} of "
                f"{list(shapes[0])} is {shape[dim]}"
            )
        shape[dim] = sum(self.sizes[index] for index in self._indexes())
        return tuple(shape)

    def apply(self, tensors: Sequence[torch.Tensor]) -> torch.Tensor:
        import torch

        parts = torch.split(tensors[0], list(self.sizes), dim=self.dim)
        chosen = [parts[index] for index in self._indexes()]
        return chosen[0] if len(chosen) == 1 else torch.cat(chosen, dim=self.dim)


class _Constant(Transform):
    """A transform by one constant, which must be finite; the shape is unchanged."""

    def output_shape(self, shapes: Sequence[Shape]) -> Shape:
        (argument, value), *_ = self.model_dump().items()
        if not math.isfinite(value):
            raise TransformShapeError(f"{self.name}: {argument} {value} is not a finite number")
        return shapes[0]


class Scale(_Constant):
    """Multiply every element by a constant: folds a constant multiplier into a weight where that is exact."""

    name: ClassVar[str] = "scale"
    factor: float

    def apply(self, tensors: Sequence[torch.Tensor]) -> torch.Tensor:
        return tensors[0] * self.factor


class Add(_Constant):
    """Add a constant to every element, e.g. a norm weight stored as an offset (Gemma's w, applied as 1 + w)."""

    name: ClassVar[str] = "add"
    value: float

    def apply(self, tensors: Sequence[torch.Tensor]) -> torch.Tensor:
        return tensors[0] + self.value


class PermuteRotary(Transform):
    """Reorder the rows of each head of a q or k projection between RoPE layouts, on its first `rotary_dim` rows:
    `interleaved` (GPT-J, Meta's original Llama: pairs (2k, 2k+1)) and `halves` (transformers' Llama: pairs
    (k, k + r/2)). Applied to q and k alike, it leaves every q·k, and so the attention, unchanged."""

    name: ClassVar[str] = "permute_rotary"
    heads: int
    rotary_dim: int | None = None  # None: the whole head
    to: Literal["halves", "interleaved"] = "halves"

    def output_shape(self, shapes: Sequence[Shape]) -> Shape:
        shape = shapes[0]
        if not shape or self.heads <= 0 or shape[0] % self.heads:
            raise TransformShapeError(
                f"permute_rotary: dimension 0 of {list(shape)} must be a multiple of heads={self.heads}"
            )
        head_dim = shape[0] // self.heads
        rotary = head_dim if self.rotary_dim is None else self.rotary_dim
        if not 0 < rotary <= head_dim or rotary % 2:
            raise TransformShapeError(
                f"permute_rotary: rotary_dim {rotary} must be even and within the head's {head_dim} rows"
            )
        return shape

    def apply(self, tensors: Sequence[torch.Tensor]) -> torch.Tensor:
        import torch

        tensor = tensors[0]
        head_dim = tensor.shape[0] // self.heads
        rotary = head_dim if self.rotary_dim is None else self.rotary_dim
        to_halves = torch.cat([torch.arange(0, rotary, 2), torch.arange(1, rotary, 2)])  # halves[i] = interleaved[o[i]]
        order = to_halves if self.to == "halves" else torch.argsort(to_halves)
        order = torch.cat([order, torch.arange(rotary, head_dim)])
        heads = tensor.reshape(self.heads, head_dim, *tensor.shape[1:])
        return heads[:, order].reshape(tensor.shape)


TRANSFORMS: dict[str, type[Transform]] = {
    cls.name: cls
    for cls in (Copy, Transpose, SplitHeads, Concat, Slice, Reshape, Repeat, Cast, Split, Scale, Add, PermuteRotary)
}


class TransformChain(BaseModel):
    """Transforms applied in order; the first may take several sources, the rest take one tensor."""

    model_config = ConfigDict(frozen=True)
    steps: tuple[Transform, ...]

    def output_shape(self, shapes: Sequence[Shape]) -> Shape:
        if self.steps[0].inputs == "one" and len(shapes) != 1:
            raise TransformShapeError(f"{self.steps[0].name} takes one source tensor, got {len(shapes)}")
        shape = self.steps[0].output_shape(shapes)
        for step in self.steps[1:]:
            shape = step.output_shape([shape])
        return shape

    def apply(self, tensors: Sequence[torch.Tensor]) -> torch.Tensor:
        result = self.steps[0].apply(tensors)
        for step in self.steps[1:]:
            result = step.apply([result])
        return result

    def describe(self) -> str:
        return " → ".join(step.describe() for step in self.steps)

    def spec(self) -> list[dict[str, Any]]:
        return [step.spec() for step in self.steps]


def parse_transform(spec: Any) -> TransformChain:
    """Validate a rule's ``transform`` value; errors name the nearest known transform or argument."""
    items = spec if isinstance(spec, list) else [spec]
    if not items:
        raise ValueError("transform list is empty")
    steps: list[Transform] = []
    for item in items:
        if isinstance(item, str):
            name, arguments = item, {}
        elif isinstance(item, dict) and len(item) == 1:
            name, arguments = next(iter(item.items()))
            arguments = arguments or {}
        else:
            raise ValueError(f"a transform is a name or a one-key mapping {{name: {{args}}}}, got {item!r}")
        cls = TRANSFORMS.get(name)
        if cls is None:
            near = difflib.get_close_matches(str(name), TRANSFORMS, n=1)
            hint = f"; did you mean {near[0]!r}?" if near else ""
            raise ValueError(f"unknown transform {name!r}{hint} (known: {', '.join(TRANSFORMS)})")
        if not isinstance(arguments, dict):
            raise ValueError(f"arguments of {name!r} must be a mapping, got {arguments!r}")
        try:
            steps.append(cls.model_validate(arguments))
        except ValidationError as error:
            raise ValueError(f"{name}: {_first_problem(error, cls)}") from None
    return TransformChain(steps=tuple(steps))


def _first_problem(error: ValidationError, cls: type[Transform]) -> str:
    # an unknown key usually explains the missing one next to it (a typo), so report it first
    problem = sorted(error.errors(), key=lambda item: item["type"] != "extra_forbidden")[0]
    key = ".".join(str(part) for part in problem["loc"])
    if problem["type"] == "extra_forbidden":
        near = difflib.get_close_matches(key, cls.model_fields, n=1)
        hint = f"; did you mean {near[0]!r}?" if near else ""
        return f"unknown argument {key!r}{hint}"
    return f"{key}: {problem['msg']}"


def _check_dim(dim: int, rank: int, name: str) -> int:
    if not -rank <= dim < rank:
        raise TransformShapeError(f"{name}: dimension {dim} does not exist in a tensor of rank {rank}")
    return dim % rank
