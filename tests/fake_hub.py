"""A tiny fake Hugging Face Hub HTTP server for offline tests (stdlib only).

Start it on 127.0.0.1 (any free port) and point ``HF_ENDPOINT`` at :attr:`FakeHub.endpoint` *before*
huggingface_hub is imported (it reads the variable at import time, so run the client in a subprocess or pass
``endpoint=`` explicitly), and the real ``huggingface_hub.snapshot_download`` code path works against it::

    with FakeHub().start() as hub:
        sha = hub.add_repo("org/tiny", {"config.json": b"{}"})
        env = {**os.environ, "HF_ENDPOINT": hub.endpoint, "HF_HOME": str(tmp_path / "hf")}
        subprocess.run([sys.executable, "-c", script], env=env, check=True)

Model repos (``add_repo(...)``) and dataset repos (``add_repo(..., repo_type="dataset")``, a separate namespace)
are served on the routes that huggingface_hub 2.4 and datasets 5.2 request, as measured; ``{kind}`` is ``models``
or ``datasets``:

- ``GET /api/{kind}/{repo}/revision/{rev}`` (and ``/api/{kind}/{repo}``): repo info JSON with ``sha`` and
  ``siblings``;
- ``GET /api/{kind}/{repo}/tree/{rev}[/{path}]?recursive=...``: the file listing (one page, no ``Link`` header);
- ``HEAD``/``GET /{repo}/resolve/{rev}/{path}`` for a model, ``/datasets/{repo}/resolve/{rev}/{path}`` for a
  dataset: the bytes (no redirect, no Xet headers, ``Range`` supported).

``datasets.load_dataset(id, streaming=True)`` needs no more: it fetches ``README.md`` (or, without one, the repo
info), probes a few optional files (``{name}.py``, ``.huggingface.yaml``, ``dataset_infos.json``: 404 is fine),
lists the tree and reads the data files with ``Range`` GETs (no ``paths-info`` POST, no parquet-export API).
Anything else, such as the ``/api/agent-harnesses`` probe huggingface_hub makes at start, gets a plain 404,
which the clients tolerate.

Errors carry ``X-Error-Code`` the way ``huggingface_hub.utils.hf_raise_for_status`` reads it: ``RepoNotFound``
(404; 401 for a private repo without :attr:`FakeHub.ALLOWED_TOKEN`), ``RevisionNotFound`` (404), ``EntryNotFound``
(404), ``GatedRepo`` (403 for a gated repo without the token). Anything else is a plain 404.
"""

from __future__ import annotations

import hashlib
import json
import pathlib
import re
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Literal
from urllib.parse import parse_qs, unquote, urlsplit

__all__ = ["FakeHub"]

_SHA_RE = re.compile(r"^[0-9a-f]{40}$")
# Files served as if tracked by git-lfs: tree entries carry an ``lfs`` block and the ETag is the sha256.
_LFS_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".msgpack", ".h5", ".onnx", ".gguf", ".npz")
_LAST_MODIFIED = "2024-01-01T00:00:00.000Z"
RepoType = Literal["model", "dataset"]
# URL segment after /api/ for each repo type (models are also served at the root, datasets under /datasets/).
_API_SEGMENTS: dict[str, RepoType] = {"models": "model", "datasets": "dataset"}


def _git_blob_sha1(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def _is_lfs(path: str) -> bool:
    return path.endswith(_LFS_SUFFIXES)


@dataclass
class _Commit:
    sha: str
    files: dict[str, bytes]


@dataclass
class _Repo:
    repo_id: str
    repo_type: RepoType = "model"
    gated: bool = False
    private: bool = False
    refs: dict[str, str] = field(default_factory=dict)  # revision name -> sha
    commits: dict[str, _Commit] = field(default_factory=dict)  # sha -> commit

    def resolve(self, revision: str) -> _Commit | None:
        sha = self.refs.get(revision)
        if sha is None and _SHA_RE.match(revision):
            sha = revision
        return self.commits.get(sha) if sha is not None else None


class _HubError(Exception):
    def __init__(self, status: int, code: str | None, message: str, commit: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.commit = commit


class FakeHub:
    """A fake Hub server; see the module docstring."""

    ALLOWED_TOKEN = "hf_allowed"

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._repos: dict[tuple[RepoType, str], _Repo] = {}  # (repo type, repo id) -> repo
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None
        self.requests: list[tuple[str, str]] = []

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> FakeHub:
        if self._server is not None:
            return self
        hub = self

        class Handler(_Handler):
            fake_hub = hub

        server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        server.daemon_threads = True
        self._server = server
        self._thread = threading.Thread(
            target=server.serve_forever, kwargs={"poll_interval": 0.05}, name="fake-hub", daemon=True
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        server, thread = self._server, self._thread
        self._server = self._thread = None
        if server is not None:
            server.shutdown()
            server.server_close()
        if thread is not None:
            thread.join(timeout=5)

    def __enter__(self) -> FakeHub:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    @property
    def endpoint(self) -> str:
        if self._server is None:
            raise RuntimeError("FakeHub is not started; call start() first")
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    # ------------------------------------------------------------------ content
    def add_repo(
        self,
        repo_id: str,
        files: dict[str, bytes] | pathlib.Path,
        *,
        revision: str = "main",
        gated: bool = False,
        private: bool = False,
        repo_type: RepoType = "model",
    ) -> str:
        """Add (or replace) ``revision`` of ``repo_id``; returns its deterministic 40-hex commit sha.

        ``gated``/``private`` apply to the whole repo (the latest call wins). A Path serves every file under it.
        ``repo_type="dataset"`` hosts a dataset repo: a separate namespace, as on the Hub, so ``org/x`` can be
        both a model and a dataset.
        """
        if isinstance(files, pathlib.Path):
            root = files
            content = {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}
        else:
            content = {str(k).lstrip("/"): bytes(v) for k, v in files.items()}
        # Models keep the digest they had before dataset repos existed, so recorded shas stay valid.
        prefix = "" if repo_type == "model" else f"{repo_type}s/"
        digest = hashlib.sha1(f"{prefix}{repo_id}\0{revision}\0".encode())
        for path in sorted(content):
            digest.update(f"{path}\0{hashlib.sha256(content[path]).hexdigest()}\0".encode())
        sha = digest.hexdigest()
        with self._lock:
            repo = self._repos.setdefault((repo_type, repo_id), _Repo(repo_id, repo_type))
            repo.gated, repo.private = gated, private
            repo.refs[revision] = sha
            repo.commits[sha] = _Commit(sha, content)
        return sha

    # ------------------------------------------------------------------ request log
    def _record(self, method: str, path: str) -> None:
        with self._lock:
            self.requests.append((method, path))

    def file_requests(self) -> list[tuple[str, str]]:
        """HEAD/GET requests on ``[/datasets]/{repo}/resolve/...`` (the actual file downloads), in order."""
        with self._lock:
            snapshot = list(self.requests)
        return [
            (method, path)
            for method, path in snapshot
            if method in ("HEAD", "GET") and "/resolve/" in urlsplit(path).path and not path.startswith("/api/")
        ]

    def reset_requests(self) -> None:
        with self._lock:
            self.requests.clear()

    # ------------------------------------------------------------------ routing helpers (called by the handler)
    def _split_repo(
        self, segments: list[str], markers: tuple[str, ...], repo_type: RepoType = "model"
    ) -> tuple[str, list[str]] | None:
        """Split raw URL segments into (repo_id, segments after the repo), preferring known repos of that type."""
        with self._lock:
            known = {repo_id for kind, repo_id in self._repos if kind == repo_type}
        candidates: list[int] = []
        for n in (2, 1):
            if len(segments) > n and unquote("/".join(segments[:n])) in known:
                candidates.append(n)
        if not candidates:
            candidates = [n for n in (2, 1) if len(segments) > n and segments[n] in markers]
        if not candidates and segments:
            candidates = [min(2, len(segments))]
        if not candidates:
            return None
        n = candidates[0]
        return unquote("/".join(segments[:n])), segments[n:]

    def _lookup(self, repo_id: str, token: str | None, repo_type: RepoType = "model") -> _Repo:
        with self._lock:
            repo = self._repos.get((repo_type, repo_id))
        if repo is None:
            raise _HubError(404, "RepoNotFound", "Repository not found")
        if repo.private and token != self.ALLOWED_TOKEN:
            raise _HubError(401, "RepoNotFound", "Invalid username or password.")
        if repo.gated and token != self.ALLOWED_TOKEN:
            raise _HubError(
                403,
                "GatedRepo",
                f"Access to {repo_type} {repo_id} is restricted. You must be authenticated to access it.",
            )
        return repo

    @staticmethod
    def _split_revision(repo: _Repo, rest: list[str]) -> tuple[str, list[str]]:
        """Split raw segments into (revision, remaining segments); handles unquoted slashes in known revisions."""
        with_slash = [r for r in repo.refs if "/" in r]
        for i in range(len(rest), 1, -1):
            candidate = unquote("/".join(rest[:i]))
            if candidate in with_slash:
                return candidate, rest[i:]
        return unquote(rest[0]), rest[1:]

    def _resolve(self, repo: _Repo, revision: str) -> _Commit:
        with self._lock:
            commit = repo.resolve(revision)
        if commit is None:
            raise _HubError(404, "RevisionNotFound", f"Invalid rev id: {revision}")
        return commit


class _Handler(BaseHTTPRequestHandler):
    fake_hub: FakeHub
    protocol_version = "HTTP/1.1"
    server_version = "FakeHub/1.0"

    def log_message(self, format: str, *args: object) -> None:  # quiet
        pass

    # ------------------------------------------------------------------ verbs
    def do_GET(self) -> None:
        self._handle(head=False)

    def do_HEAD(self) -> None:
        self._handle(head=True)

    def do_POST(self) -> None:
        self._drain_body()
        self._handle(head=False, unknown=True)

    do_PUT = do_POST
    do_DELETE = do_POST

    def _drain_body(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        if length:
            self.rfile.read(length)

    # ------------------------------------------------------------------ dispatch
    def _token(self) -> str | None:
        auth = self.headers.get("Authorization") or ""
        if auth.lower().startswith("bearer "):
            return auth[7:].strip() or None
        return None

    def _handle(self, *, head: bool, unknown: bool = False) -> None:
        hub = self.fake_hub
        hub._record(self.command, self.path)
        url = urlsplit(self.path)
        segments = [s for s in url.path.split("/") if s]
        try:
            if unknown:
                raise _HubError(404, None, "Not Found")
            if len(segments) >= 2 and segments[0] == "api" and segments[1] in _API_SEGMENTS:
                self._api_repo(_API_SEGMENTS[segments[1]], segments[2:], parse_qs(url.query), head=head)
            elif segments[:1] == ["datasets"]:
                self._resolve_file(segments[1:], head=head, repo_type="dataset")
            else:
                self._resolve_file(segments, head=head)
        except _HubError as err:
            body = json.dumps({"error": err.message}).encode()
            headers = {"Content-Type": "application/json"}
            if err.code is not None:
                headers["X-Error-Code"] = err.code
                headers["X-Error-Message"] = err.message
            self._send(err.status, body, headers, head=head, commit=err.commit)
        except (BrokenPipeError, ConnectionResetError):
            pass

    def _api_repo(self, repo_type: RepoType, segments: list[str], query: dict[str, list[str]], *, head: bool) -> None:
        """``/api/{models,datasets}/{repo}[/revision|/tree]/...``: the same two routes for both repo types."""
        hub = self.fake_hub
        split = hub._split_repo(segments, ("revision", "tree"), repo_type)
        if split is None:
            raise _HubError(404, None, "Not Found")
        repo_id, rest = split
        if rest and rest[0] not in ("revision", "tree"):
            raise _HubError(404, None, "Not Found")
        repo = hub._lookup(repo_id, self._token(), repo_type)
        if not rest:
            kind, revision, tail = "revision", "main", []
        elif len(rest) == 1:
            raise _HubError(404, None, "Not Found")
        else:
            kind = rest[0]
            revision, tail = hub._split_revision(repo, rest[1:])
        commit = hub._resolve(repo, revision)
        if kind == "revision":
            if tail:
                raise _HubError(404, None, "Not Found")
            payload: object = {
                "_id": commit.sha[:24],
                "id": repo_id,
                **({"modelId": repo_id} if repo_type == "model" else {}),
                "author": repo_id.split("/")[0] if "/" in repo_id else None,
                "sha": commit.sha,
                "lastModified": _LAST_MODIFIED,
                "createdAt": _LAST_MODIFIED,
                "private": repo.private,
                "gated": "manual" if repo.gated else False,
                "disabled": False,
                "downloads": 0,
                "likes": 0,
                "tags": [],
                "siblings": [{"rfilename": path} for path in sorted(commit.files)],
            }
        else:
            recursive = (query.get("recursive") or ["false"])[0].lower() == "true"
            payload = self._tree(commit, unquote("/".join(tail)).strip("/"), recursive)
        body = json.dumps(payload).encode()
        self._send(200, body, {"Content-Type": "application/json"}, head=head, commit=commit.sha)

    @staticmethod
    def _tree(commit: _Commit, prefix: str, recursive: bool) -> list[dict[str, object]]:
        base = f"{prefix}/" if prefix else ""
        if prefix and prefix not in commit.files and not any(p.startswith(base) for p in commit.files):
            raise _HubError(404, "EntryNotFound", f"{prefix} does not exist on {commit.sha}", commit.sha)
        entries: list[dict[str, object]] = []
        folders: set[str] = set()
        for path in sorted(commit.files):
            if not path.startswith(base):
                continue
            relative = path[len(base) :]
            parts = relative.split("/")
            for depth in range(1, len(parts)):
                if not recursive and depth > 1:
                    break
                folders.add(base + "/".join(parts[:depth]))
            if not recursive and len(parts) > 1:
                continue
            data = commit.files[path]
            entry: dict[str, object] = {"type": "file", "path": path, "size": len(data), "oid": _git_blob_sha1(data)}
            if _is_lfs(path):
                entry["lfs"] = {"oid": hashlib.sha256(data).hexdigest(), "size": len(data), "pointerSize": 134}
            entries.append(entry)
        for folder in sorted(folders):
            oid = hashlib.sha1(folder.encode()).hexdigest()
            entries.append({"type": "directory", "path": folder, "size": 0, "oid": oid})
        return entries

    def _resolve_file(self, segments: list[str], *, head: bool, repo_type: RepoType = "model") -> None:
        hub = self.fake_hub
        split = hub._split_repo(segments, ("resolve",), repo_type)
        if split is None:
            raise _HubError(404, None, "Not Found")
        repo_id, rest = split
        if len(rest) < 3 or rest[0] != "resolve":
            raise _HubError(404, None, "Not Found")
        repo = hub._lookup(repo_id, self._token(), repo_type)
        revision, tail = hub._split_revision(repo, rest[1:])
        commit = hub._resolve(repo, revision)
        path = unquote("/".join(tail))
        data = commit.files.get(path)
        if data is None:
            raise _HubError(404, "EntryNotFound", f"{path} does not exist on {commit.sha}", commit.sha)
        etag = hashlib.sha256(data).hexdigest() if _is_lfs(path) else _git_blob_sha1(data)
        headers = {"Content-Type": "application/octet-stream", "Accept-Ranges": "bytes"}
        status, body = 200, data
        match = re.fullmatch(r"bytes=(\d*)-(\d*)", (self.headers.get("Range") or "").strip())
        if match and (match.group(1) or match.group(2)):
            start_s, end_s = match.groups()
            if start_s:
                start, end = int(start_s), min(int(end_s), len(data) - 1) if end_s else len(data) - 1
            else:
                start, end = max(len(data) - int(end_s), 0), len(data) - 1
            if start >= len(data) or start > end:
                headers["Content-Range"] = f"bytes */{len(data)}"
                self._send(416, b"", headers, head=head, commit=commit.sha, etag=etag)
                return
            status, body = 206, data[start : end + 1]
            headers["Content-Range"] = f"bytes {start}-{end}/{len(data)}"
        self._send(status, body, headers, head=head, commit=commit.sha, etag=etag)

    def _send(
        self,
        status: int,
        body: bytes,
        headers: dict[str, str],
        *,
        head: bool,
        commit: str | None = None,
        etag: str | None = None,
    ) -> None:
        self.send_response(status)
        for name, value in headers.items():
            self.send_header(name, value)
        self.send_header("ETag", f'"{etag or hashlib.sha256(body).hexdigest()}"')
        if commit is not None:
            self.send_header("X-Repo-Commit", commit)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if not head:
            self.wfile.write(body)
