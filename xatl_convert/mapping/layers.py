"""Which layers keep attention: explicit indices or a named hybrid preset.

Presets:
- ``none``: every layer gets the LCI mixer (the default);
- ``all``: every layer stays attention (the converted model then reproduces the source exactly);
- ``paper``: layers 1 and N/2 - 1, as kept in the XATL paper;
- ``every-K``: every K-th layer (K-1, 2K-1, ...), e.g. every-2 for 50% Mamba, every-8 for 87.5%.

``auto:K`` is no preset: the K layers are measured on text (`xatl_convert.layer_selection`), and the result is then
passed on as indices.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

from xatl_convert.mapping.schema import MIXERS

LCI_MIXERS: tuple[str, ...] = tuple(MIXERS)  # the mixers a converted layer can get: the registry's


def mixer_named(text: str) -> str:
    """The layer type that `--to` names: `gated-deltanet` as the CLI spells it is `gated_deltanet` (the layer
    type); an unknown name is returned as given, for the caller to refuse with the known ones."""
    spelled = text.replace("-", "_")
    return spelled if spelled in LCI_MIXERS else text


def mixer_spelling(mixer: str) -> str:
    """How a mixer is spelt in names and on the command line: `gated-deltanet`."""
    return mixer.replace("_", "-")


LCI = "lci"  # a rule's `where: lci` selects every layer that gets an LCI mixer, whichever it is


def layer_selected(where: str | None, layer_type: str) -> bool:
    """Whether a rule's `where` (None: every layer) selects a layer of this type."""
    return where is None or where == layer_type or (where == LCI and layer_type in LCI_MIXERS)


PRESETS = {
    "none": "no attention layers (pure LCI model)",
    "all": "every layer kept as attention (reproduces the source exactly)",
    "paper": "layers 1 and N/2-1, as in the XATL paper",
    "every-K": "every K-th layer kept as attention (every-2: 50% LCI, every-4: 75%, every-8: 87.5%)",
}
AUTO_HELP = "auto:K: the K layers that a short measurement on --data ranks highest"

_EVERY = re.compile(r"every-(\d+)")
_AUTO = re.compile(r"\s*auto(?::(.*))?\s*")


class AutoSpecError(ValueError):
    """`--attn-layers auto:K` with a K that is not a whole number of at least 1."""


def auto_keep(spec: str | None) -> int | None:
    """K of an `auto:K` spec, None for any other spec; a malformed or non-positive K raises AutoSpecError."""
    match = _AUTO.fullmatch(spec) if spec is not None else None
    if spec is None or match is None:
        return None
    text = (match.group(1) or "").strip()
    if not text.lstrip("+-").isdigit():
        raise AutoSpecError(f"{spec.strip()}: expected auto:K with K the number of layers to keep, e.g. auto:2")
    keep = int(text)
    if keep < 1:
        raise AutoSpecError(f"{spec.strip()}: K is the number of layers kept as attention; keep at least 1")
    return keep


def attention_layer_indices(spec: str | Sequence[int], num_layers: int) -> list[int]:
    """Resolve a preset name, a comma list ("1,11") or a list of ints to sorted, checked indices."""
    if isinstance(spec, str):
        indices = _preset_or_list(spec.strip(), num_layers)
    else:
        indices = [int(index) for index in spec]
    for index in indices:
        if not 0 <= index < num_layers:
            raise ValueError(f"attention layer {index} is out of range: the model has layers 0..{num_layers - 1}")
    return sorted(set(indices))


def layer_types(attention_layers: Sequence[int], num_layers: int, mixer: str) -> list[str]:
    """One mixer name per layer: 'attention' where kept, the LCI mixer elsewhere."""
    kept = set(attention_layers)
    return ["attention" if index in kept else mixer for index in range(num_layers)]


def _preset_or_list(spec: str, num_layers: int) -> list[int]:
    if spec in ("", "none"):
        return []
    if _AUTO.fullmatch(spec):
        raise ValueError(
            f"{spec!r} is chosen by measurement, not a preset: give text to measure on (xatl convert --data TEXT), "
            "or pass xatl_convert.layer_selection.select.select_layers(...)'s result as the layers"
        )
    if spec == "all":
        return list(range(num_layers))
    if spec == "paper":
        return [1, num_layers // 2 - 1] if num_layers >= 4 else [min(1, num_layers - 1)]
    every = _EVERY.fullmatch(spec)
    if every:
        step = int(every.group(1))
        if step < 1:
            raise ValueError("every-K needs K >= 1")
        return [index for index in range(num_layers) if index % step == step - 1]
    try:
        return [int(part) for part in spec.split(",") if part.strip()]
    except ValueError:
        raise ValueError(
            f"{spec!r} is neither a comma-separated list of layer indices nor a preset ({', '.join(PRESETS)})"
        ) from None
