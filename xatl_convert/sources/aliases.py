"""Short names for well-known source checkpoints, so `xatl convert pythia-410m` and `xatl convert smollm2-135m`
work."""

from __future__ import annotations

PYTHIA_SIZES = ("70m", "160m", "410m", "1b", "1.4b", "2.8b", "6.9b", "12b")
SMOLLM2_SIZES = {"135m": "135M", "360m": "360M", "1.7b": "1.7B"}  # alias spelling → the Hub's

ALIASES: dict[str, str] = {
    **{f"pythia-{size}": f"EleutherAI/pythia-{size}" for size in PYTHIA_SIZES},
    **{f"pythia-{size}-deduped": f"EleutherAI/pythia-{size}-deduped" for size in PYTHIA_SIZES},
    **{f"smollm2-{size}": f"HuggingFaceTB/SmolLM2-{hub}" for size, hub in SMOLLM2_SIZES.items()},
    **{f"smollm2-{size}-instruct": f"HuggingFaceTB/SmolLM2-{hub}-Instruct" for size, hub in SMOLLM2_SIZES.items()},
}


def expand_alias(reference: str) -> str:
    """The Hub id for an alias; any other reference is returned unchanged."""
    return ALIASES.get(reference, reference)
