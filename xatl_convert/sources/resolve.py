"""Turn what the user typed into an opened SourceCheckpoint: a local folder, a Hub id (`org/name[@revision]`) or an
alias (`pythia-410m`).

Hub downloads go through `huggingface_hub.snapshot_download`, so HF_HOME, HF_HUB_CACHE, HF_TOKEN and
HF_HUB_OFFLINE behave as in transformers. Only the config, tokenizer files and weights are fetched; `.bin` weights
only where the repo has no safetensors. Remote code is never fetched or run.
"""

from __future__ import annotations

import re
from pathlib import Path

from xatl_convert.errors import SourceError
from xatl_convert.sources.aliases import expand_alias
from xatl_convert.sources.checkpoint import TOKENIZER_FILES, SourceCheckpoint, open_checkpoint

HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
CONFIG_PATTERNS = ["config.json", *TOKENIZER_FILES]
SAFETENSORS_PATTERNS = ["*.safetensors", "model.safetensors.index.json"]
TORCH_PATTERNS = ["pytorch_model*.bin", "pytorch_model.bin.index.json"]


def resolve_source(
    reference: str | Path, revision: str | None = None, cache_dir: str | Path | None = None
) -> SourceCheckpoint:
    """Open a source given as a local folder, a Hub id with an optional `@revision`, or an alias."""
    path = Path(reference).expanduser()
    if path.exists():
        return open_checkpoint(path, reference=str(reference))
    text = str(reference)
    repo_id, _, inline_revision = expand_alias(text).partition("@")
    repo_id = expand_alias(repo_id)
    if inline_revision and revision and inline_revision != revision:
        raise SourceError(f"{text}: revision {inline_revision!r} conflicts with --revision {revision!r}")
    if not HUB_ID.match(repo_id):
        raise SourceError(f"{text}: no such local folder, and not a Hub id (org/name) or a known alias")
    folder, commit = download_from_hub(repo_id, inline_revision or revision, cache_dir)
    return open_checkpoint(folder, reference=repo_id, revision=commit)


def download_from_hub(
    repo_id: str, revision: str | None = None, cache_dir: str | Path | None = None
) -> tuple[Path, str | None]:
    """Fetch config, tokenizer and weights of a Hub model into the HF cache; returns (folder, commit sha)."""
    try:
        folder: Path | None = _snapshot(repo_id, revision, cache_dir, CONFIG_PATTERNS + SAFETENSORS_PATTERNS)
    except _IncompleteCache:
        folder = None  # offline, and the cache holds this repo's .bin weights rather than safetensors
    if folder is None or not any(folder.glob("*.safetensors")):
        folder = _snapshot(repo_id, revision, cache_dir, CONFIG_PATTERNS + TORCH_PATTERNS)
    return folder, _commit_of(folder)


class _IncompleteCache(SourceError):
    """Offline, and the cached snapshot lacks files that the requested patterns would fetch."""


def _snapshot(repo_id: str, revision: str | None, cache_dir: str | Path | None, patterns: list[str]) -> Path:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import (
        GatedRepoError,
        HfHubHTTPError,
        IncompleteSnapshotError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    where = f"{repo_id}@{revision}" if revision else repo_id
    try:
        return Path(snapshot_download(repo_id, revision=revision, cache_dir=cache_dir, allow_patterns=patterns))
    except GatedRepoError:
        raise SourceError(
            f"{where}: the repo is gated; accept its terms on the Hub, then log in (hf auth login) or set HF_TOKEN"
        ) from None
    except RevisionNotFoundError:
        raise SourceError(
            f"{where}: revision {revision!r} not found on the Hub; check the branch, tag or commit"
        ) from None
    except RepositoryNotFoundError:
        raise SourceError(
            f"{where}: repository not found on the Hub, or private and not accessible with your token "
            "(log in with hf auth login or set HF_TOKEN)"
        ) from None
    except IncompleteSnapshotError:
        raise _IncompleteCache(
            f"{where}: the cached copy is incomplete and the Hub cannot be reached (offline mode or no network); "
            "connect once, or unset HF_HUB_OFFLINE"
        ) from None
    except LocalEntryNotFoundError:
        raise SourceError(
            f"{where}: not in the local cache and the Hub cannot be reached (offline mode or no network); "
            "connect once, or unset HF_HUB_OFFLINE"
        ) from None
    except HfHubHTTPError as error:
        status = error.response.status_code if error.response is not None else "?"
        if status in (401, 403):
            raise SourceError(f"{where}: access denied by the Hub (HTTP {status}); check HF_TOKEN") from None
        raise SourceError(f"{where}: the Hub answered HTTP {status}") from None


def _commit_of(folder: Path) -> str | None:
    """The commit sha of a snapshot folder in the HF cache layout (…/snapshots/<sha>)."""
    return folder.name if re.fullmatch(r"[0-9a-f]{40}", folder.name) else None
