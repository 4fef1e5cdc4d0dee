"""Short names for well-known source checkpoints, so `xatl convert pythia-410m` works."""

from __future__ import annotations

PYTHIA_SIZES = ("70m", "160m", "410m", "1b", "1.4b", "2.8b", "6.9b", "12b")

ALIASES: dict[str, str] = {
    **{f"pythia-{size}": f"EleutherAI/pythia-{size}" for size in PYTHIA_SIZES},
    **{f"pythia-{size}-deduped": f"EleutherAI/pythia-{size}-deduped" for size in PYTHIA_SIZES},
}


def expand_alias(reference: str) -> str:
    """The Hub id for an alias; any other reference is returned unchanged."""
    return ALIASES.get(reference, reference)
