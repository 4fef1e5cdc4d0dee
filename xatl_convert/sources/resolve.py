"""Turn what the user typed into an opened SourceCheckpoint: a local folder, a Hub id (`org/name[@revision]`) or an
alias (`pythia-410m`).

Hub downloads go through `huggingface_hub.snapshot_download`, so HF_HOME, HF_HUB_CACHE, HF_TOKEN and
HF_HUB_OFFLINE behave as in transformers. Only the config, tokenizer files and weights are fetched; `.bin` weights
only where the repo has no safetensors. Remote code is never fetched or run.

Every way a download can fail (an invalid id, a Hub that does not answer or answers 5xx, a cache folder that cannot
be written) ends in one SourceError line that names the repo and says what to do.
"""

from __future__ import annotations

import errno
import importlib
import logging
import re
import sys
import warnings
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any

from xatl_convert.errors import SourceError, first_line
from xatl_convert.sources.aliases import expand_alias
from xatl_convert.sources.checkpoint import (
    CHAT_TEMPLATES_FOLDER,
    TOKENIZER_FILES,
    SourceCheckpoint,
    open_checkpoint,
)

HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
CONFIG_PATTERNS = ["config.json", *TOKENIZER_FILES, f"{CHAT_TEMPLATES_FOLDER}/*.jinja"]
SAFETENSORS_PATTERNS = ["*.safetensors", "model.safetensors.index.json"]
TORCH_PATTERNS = ["pytorch_model*.bin", "pytorch_model.bin.index.json"]

_VALID_ID = (
    "a Hub id is ORG/NAME (e.g. EleutherAI/pythia-70m): letters, digits, '-', '_' and '.', "
    "without '--' or '..', at most 96 characters"
)
_CACHE_FIXES = {
    errno.ENOSPC: "free some disk space",
    errno.EDQUOT: "free some disk space (your quota is full)",
    errno.EACCES: "make it writable",
    errno.EPERM: "make it writable",
    errno.EROFS: "make it writable (its file system is read-only)",
    errno.ENOTDIR: "move away the file that stands where a folder should be",
    errno.EEXIST: "move away the file that stands where a folder should be",
}
_NETWORK_HINT = "check your network or HF_ENDPOINT, or set HF_HUB_OFFLINE=1 to use the cache"


def resolve_source(
    reference: str | Path, revision: str | None = None, cache_dir: str | Path | None = None
) -> SourceCheckpoint:
    """Open a source given as a local folder, a Hub id with an optional `@revision`, or an alias."""
    text = str(reference)
    path = _existing_path(text)
    if path is not None:
        return open_checkpoint(path, reference=text)
    repo_id, _, inline_revision = expand_alias(text).partition("@")
    repo_id = expand_alias(repo_id)
    if inline_revision and revision and inline_revision != revision:
        raise SourceError(f"{text}: revision {inline_revision!r} conflicts with --revision {revision!r}")
    if not HUB_ID.match(repo_id):
        raise SourceError(
            f"{text}: no such local folder, and not a Hub id (org/name) or a known alias (xatl sources lists them)"
        )
    _validate_repo_id(text, repo_id)
    folder, commit = download_from_hub(repo_id, inline_revision or revision, cache_dir)
    return open_checkpoint(folder, reference=repo_id, revision=commit)


def _existing_path(text: str) -> Path | None:
    """The local path the user named, if it exists; None when the text can only be a Hub id or an alias."""
    try:
        path = Path(text).expanduser()
    except RuntimeError:  # `~someone/…` for an unknown user: not a path we can open
        return None
    try:
        return path if path.exists() else None
    except OSError as error:
        if error.errno == errno.ENAMETOOLONG:
            return None
        raise SourceError(f"{path}: cannot look at it ({error.strerror}); check its permissions") from None


def _validate_repo_id(text: str, repo_id: str) -> None:
    """Refuse an id the Hub would refuse, before any request, with what a valid id looks like."""
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(repo_id)
    except HFValidationError as error:
        raise SourceError(f"{text}: not a valid Hub id ({first_line(error)}); {_VALID_ID}") from None


def download_from_hub(
    repo_id: str, revision: str | None = None, cache_dir: str | Path | None = None
) -> tuple[Path, str | None]:
    """Fetch config, tokenizer and weights of a Hub model into the HF cache; returns (folder, commit sha)."""
    with _quiet_hub(), _bounded_waits():
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
    from huggingface_hub import constants, snapshot_download
    from huggingface_hub.errors import (
        GatedRepoError,
        HfHubHTTPError,
        HFValidationError,
        IncompleteSnapshotError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    where = f"{repo_id}@{revision}" if revision else repo_id
    try:
        return Path(
            snapshot_download(
                repo_id,
                revision=revision,
                cache_dir=cache_dir,
                allow_patterns=patterns,
                etag_timeout=constants.HF_HUB_ETAG_TIMEOUT,
            )
        )
    except HFValidationError as error:
        raise SourceError(f"{where}: not a valid Hub id or revision ({first_line(error)}); {_VALID_ID}") from None
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
    except IncompleteSnapshotError as error:
        raise _IncompleteCache(_unreachable(where, error, "the cached copy is incomplete")) from None
    except LocalEntryNotFoundError as error:
        raise SourceError(_unreachable(where, error, "not in the local cache")) from None
    except HfHubHTTPError as error:
        raise SourceError(_http_status_message(where, error)) from None
    except _network_errors() as error:
        raise SourceError(_unreachable(where, error, "not downloaded")) from None
    except OSError as error:
        raise SourceError(_os_message(where, error, cache_dir or constants.HF_HUB_CACHE)) from None


def _unreachable(where: str, error: BaseException, state: str) -> str:
    """Why the Hub gave no files, read from the exception chain: a 5xx, offline mode, a timeout or no network."""
    from huggingface_hub import constants

    chain = list(_chain(error))
    status = next((code for code in map(_status_of, chain) if code is not None and code >= 500), None)
    if status is not None:
        return f"{where}: the Hub answered HTTP {status} (server error); try again later"
    if constants.HF_HUB_OFFLINE:
        return (
            f"{where}: {state} and the Hub cannot be reached (offline mode or no network); "
            "connect once, or unset HF_HUB_OFFLINE"
        )
    if any(_is_timeout(link) for link in chain):
        return f"{where}: the Hub at {constants.ENDPOINT} did not answer (timeout); {_NETWORK_HINT}"
    network = next((link for link in chain if isinstance(link, _network_errors())), None)
    if network is not None:
        return f"{where}: cannot reach the Hub at {constants.ENDPOINT} ({first_line(network)}); {_NETWORK_HINT}"
    return f"{where}: {state} and the Hub at {constants.ENDPOINT} cannot be reached; {_NETWORK_HINT}"


def _http_status_message(where: str, error: Any) -> str:
    """One line for an HTTP error the Hub answered with, by status."""
    status = _status_of(error)
    if status in (401, 403):
        return f"{where}: access denied by the Hub (HTTP {status}); check HF_TOKEN"
    if status is not None and status >= 500:
        return f"{where}: the Hub answered HTTP {status} (server error); try again later"
    if status == 429:
        return f"{where}: the Hub answered HTTP 429 (too many requests); wait a while and try again"
    return f"{where}: the Hub answered HTTP {status or '?'} ({first_line(error)}); try again later"


def _os_message(where: str, error: OSError, cache: str | Path) -> str:
    """One line for a failure of the local cache (read-only, full disk, a file where a folder should be)."""
    if error.errno is None:  # huggingface_hub's own OSErrors (metadata it could not read) carry no errno
        return f"{where}: the download failed ({first_line(error)}); try again later"
    file = f" at {error.filename}" if error.filename else ""
    fix = _CACHE_FIXES.get(error.errno, "check the folder")
    return (
        f"{where}: cannot use the Hugging Face cache {cache} ({error.strerror}{file}); {fix}, "
        "or choose another cache folder with --cache-dir or HF_HUB_CACHE"
    )


def _chain(error: BaseException) -> Iterator[BaseException]:
    """The error and every error it was raised from or while handling, once each."""
    seen: set[int] = set()
    link: BaseException | None = error
    while link is not None and id(link) not in seen:
        seen.add(id(link))
        yield link
        link = link.__cause__ or link.__context__


def _status_of(error: BaseException) -> int | None:
    """The HTTP status of an error that carries a response, else None."""
    response = getattr(error, "response", None)
    status = getattr(response, "status_code", None)
    return status if isinstance(status, int) else None


def _is_timeout(error: BaseException) -> bool:
    """Whether an error is a timeout of any HTTP client (httpx2, httpx, requests) or of the socket itself."""
    return isinstance(error, TimeoutError) or "Timeout" in type(error).__name__


def _network_errors() -> tuple[type[BaseException], ...]:
    """The transport errors of whichever HTTP client this huggingface_hub uses (httpx2 today; httpx or requests)."""
    found: list[type[BaseException]] = []
    for module, name in (("httpx2", "HTTPError"), ("httpx", "HTTPError"), ("requests", "RequestException")):
        if module not in sys.modules:  # only a client that huggingface_hub has already imported can have raised
            continue
        with suppress(AttributeError):
            found.append(getattr(importlib.import_module(module), name))
    return tuple(found)


@contextmanager
def _quiet_hub() -> Iterator[None]:
    """Hide the Hub's progress bars and retry warnings when stderr is not a terminal: errors must stand alone."""
    if sys.stderr.isatty():
        yield
        return
    from huggingface_hub.utils import are_progress_bars_disabled, disable_progress_bars, enable_progress_bars
    from huggingface_hub.utils import logging as hub_logging  # configures its logger on import: do that first

    hub_logger = hub_logging.get_logger("huggingface_hub")
    level = hub_logger.level
    bars_were_on = not are_progress_bars_disabled()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # HF_HUB_DISABLE_PROGRESS_BARS=0 makes disable_progress_bars warn
        if bars_were_on:
            disable_progress_bars()
    hub_logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        hub_logger.setLevel(level)
        if bars_were_on:
            enable_progress_bars()


@contextmanager
def _bounded_waits() -> Iterator[None]:
    """Give every Hub request a timeout: huggingface_hub sends its API calls with none, so a server that accepts a
    connection and never answers would hang the conversion forever. HF_HUB_ETAG_TIMEOUT sets the bound."""
    from huggingface_hub.utils import get_session

    hooks = getattr(get_session(), "event_hooks", None)
    if not isinstance(hooks, dict) or not isinstance(hooks.get("request"), list):
        yield  # a requests-based huggingface_hub: its calls carry their own timeouts
        return
    hooks["request"].append(_bound_timeout)
    try:
        yield
    finally:
        with suppress(ValueError):
            hooks["request"].remove(_bound_timeout)


def _bound_timeout(request: Any) -> None:
    """Replace each unbounded part of a request's timeout (connect, read, write, pool) by HF_HUB_ETAG_TIMEOUT."""
    from huggingface_hub import constants

    limit = float(constants.HF_HUB_ETAG_TIMEOUT)
    timeout = dict(request.extensions.get("timeout") or {})
    request.extensions["timeout"] = {
        part: limit if timeout.get(part) is None else timeout[part] for part in ("connect", "read", "write", "pool")
    }


def _commit_of(folder: Path) -> str | None:
    """The commit sha of a snapshot folder in the HF cache layout (…/snapshots/<sha>)."""
    return folder.name if re.fullmatch(r"[0-9a-f]{40}", folder.name) else None
