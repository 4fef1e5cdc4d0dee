"""Bad input to the source readers and the Hub resolver: each case ends in one `error:` line, never a traceback.

Every case checks that the line names the file, tensor or repo and the reason, that no output folder and no
staging leftovers appear, and that the source's bytes are unchanged.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import socket
import threading
import time
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.bad_input import error_line, invoke, leftovers, tree_digest
from tests.conftest import save_neox
from tests.fake_hub import FakeHub
from xatl_convert.errors import SourceError
from xatl_convert.sources.checkpoint import SourceCheckpoint, open_checkpoint, storage_root

WEIGHTS = "model.safetensors"
INDEX = "model.safetensors.index.json"
DENSE_0 = "gpt_neox.layers.0.attention.dense.weight"
DENSE_1 = "gpt_neox.layers.1.attention.dense.weight"
REPO = "org/tiny"

Edit = Callable[[Path], None]


# ---------------------------------------------------------------- helpers


def _copy(checkpoint: Path, tmp_path: Path) -> Path:
    """A private copy of a shared checkpoint, to damage."""
    return Path(shutil.copytree(checkpoint, tmp_path / "src"))


def _assert_refused(src: Path, tmp_path: Path, expected: list[str], command: str = "convert") -> str:
    """Run the CLI on a damaged source; check the one error line, no output, no leftovers, the source untouched."""
    before = tree_digest(src)
    out = tmp_path / "out"
    result = invoke(command, src, "--out", out) if command == "convert" else invoke(command, src)
    line = error_line(result)
    for text in expected:
        assert text in line, (text, line)
    assert not out.exists()
    assert leftovers(tmp_path) == []
    assert tree_digest(src) == before
    return line


def _read_header(file: Path) -> tuple[dict, bytes]:
    raw = file.read_bytes()
    length = int.from_bytes(raw[:8], "little")
    return json.loads(raw[8 : 8 + length]), raw[8 + length :]


def _write_header(file: Path, header: object, data: bytes) -> None:
    encoded = json.dumps(header).encode()
    file.write_bytes(len(encoded).to_bytes(8, "little") + encoded + data)


def _edit_header(edit: Callable[[dict], object]) -> Edit:
    """Rewrite model.safetensors with an edited header and the same data bytes."""

    def apply(folder: Path) -> None:
        header, data = _read_header(folder / WEIGHTS)
        _write_header(folder / WEIGHTS, edit(header) or header, data)

    return apply


def _set_entry(tensor: str, **fields: object) -> Edit:
    return _edit_header(lambda header: header[tensor].update(fields))


def _drop_field(tensor: str, key: str) -> Edit:
    def drop(header: dict) -> None:
        del header[tensor][key]

    return _edit_header(drop)


def _truncate_data(folder: Path) -> None:
    raw = (folder / WEIGHTS).read_bytes()
    (folder / WEIGHTS).write_bytes(raw[:-100])


def _overlap(folder: Path) -> None:
    """Point tensor 1's data at tensor 0's bytes (same shape and dtype, so each range alone is valid)."""
    header, data = _read_header(folder / WEIGHTS)
    header[DENSE_1]["data_offsets"] = header[DENSE_0]["data_offsets"]
    _write_header(folder / WEIGHTS, header, data)


def _shift_into_neighbour(folder: Path) -> None:
    """Move tensor 1's range 4 bytes into whatever precedes it: a partial overlap."""
    header, data = _read_header(folder / WEIGHTS)
    start, end = header[DENSE_1]["data_offsets"]
    header[DENSE_1]["data_offsets"] = [start - 4, end - 4]
    _write_header(folder / WEIGHTS, header, data)


@pytest.fixture(scope="module")
def sharded_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_neox(tmp_path_factory.mktemp("sharded") / "source", "sharded")


def _write_index(folder: Path, name: str, index: object) -> None:
    (folder / name).write_text(json.dumps(index))


def _index_of(folder: Path) -> dict:
    return json.loads((folder / INDEX).read_text())


# ---------------------------------------------------------------- safetensors headers

HEADER_CASES = [
    pytest.param(
        _edit_header(lambda header: list(header)), [WEIGHTS, "header is a list, not a JSON object"], id="list"
    ),
    pytest.param(
        _edit_header(lambda header: header.update({DENSE_0: "F32"})),
        [WEIGHTS, DENSE_0, "header entry is a string, not a JSON object"],
        id="entry-not-object",
    ),
    pytest.param(_set_entry(DENSE_0, shape="32,32"), [DENSE_0, "shape '32,32' is not a list"], id="shape-string"),
    pytest.param(_set_entry(DENSE_0, shape=[32, 32.0]), [DENSE_0, "non-negative integers"], id="shape-float"),
    pytest.param(_set_entry(DENSE_0, shape=[-32, -32]), [DENSE_0, "non-negative integers"], id="shape-negative"),
    pytest.param(_set_entry(DENSE_0, shape=[True, 32]), [DENSE_0, "non-negative integers"], id="shape-bool"),
    pytest.param(_drop_field(DENSE_0, "data_offsets"), [DENSE_0, "has no data_offsets"], id="no-offsets"),
    pytest.param(_drop_field(DENSE_0, "dtype"), [DENSE_0, "has no dtype"], id="no-dtype"),
    pytest.param(_drop_field(DENSE_0, "shape"), [DENSE_0, "has no shape"], id="no-shape"),
    pytest.param(_set_entry(DENSE_0, dtype="F8_E9"), [DENSE_0, "unsupported dtype 'F8_E9'"], id="bad-dtype"),
    pytest.param(_set_entry(DENSE_0, data_offsets=[0]), [DENSE_0, "is not [start, end]"], id="offsets-one"),
    pytest.param(_set_entry(DENSE_0, data_offsets=["0", "4096"]), [DENSE_0, "is not [start, end]"], id="offsets-str"),
    pytest.param(
        _set_entry(DENSE_0, data_offsets=[4096, 0]), [DENSE_0, "end before they start"], id="offsets-reversed"
    ),
    pytest.param(
        _set_entry(DENSE_0, data_offsets=[10**9, 10**9 + 4096]), [DENSE_0, "runs past the end of the file"], id="beyond"
    ),
    pytest.param(_truncate_data, [WEIGHTS, "runs past the end of the file", "truncated"], id="data-truncated"),
    pytest.param(_overlap, [WEIGHTS, DENSE_0, DENSE_1, "overlaps"], id="overlap-same-range"),
    pytest.param(_shift_into_neighbour, [WEIGHTS, DENSE_1, "overlaps"], id="overlap-partial"),
    pytest.param(
        lambda folder: (folder / WEIGHTS).write_bytes((5).to_bytes(8, "little") + b'{"\xff"}' + b"\0" * 64),
        [WEIGHTS, "not a readable safetensors file", "invalid JSON header"],
        id="header-not-utf8",
    ),
    pytest.param(
        lambda folder: (folder / WEIGHTS).write_bytes(b"\x02\0\0"),
        [WEIGHTS, "not a readable safetensors file", "does not fit a file of 3 bytes"],
        id="shorter-than-length",
    ),
]


@pytest.mark.parametrize(("damage", "expected"), HEADER_CASES)
def test_a_damaged_safetensors_header_names_the_file_and_tensor(
    neox_checkpoint: Path, tmp_path: Path, damage: Edit, expected: list[str]
) -> None:
    src = _copy(neox_checkpoint, tmp_path)
    damage(src)
    _assert_refused(src, tmp_path, expected)


def test_inspect_reports_a_damaged_header_in_one_line(neox_checkpoint: Path, tmp_path: Path) -> None:
    src = _copy(neox_checkpoint, tmp_path)
    _overlap(src)
    _assert_refused(src, tmp_path, [DENSE_1, "overlaps"], command="inspect")


# ---------------------------------------------------------------- sharded indexes


def _outside_shard(folder: Path) -> Path:
    """A valid shard outside the checkpoint: reading it would succeed, so only the refusal explains an error."""
    outside = folder.parent / "outside.safetensors"
    shutil.copyfile(folder / "model-00001-of-00002.safetensors", outside)
    return outside


def _map_first_shard_to(name_of: Callable[[Path], str]) -> Edit:
    def apply(folder: Path) -> None:
        name = name_of(folder)
        index = _index_of(folder)
        first = "model-00001-of-00002.safetensors"
        index["weight_map"] = {
            tensor: name if shard == first else shard for tensor, shard in index["weight_map"].items()
        }
        _write_index(folder, INDEX, index)

    return apply


def _climbing_shard(folder: Path) -> str:
    _outside_shard(folder)
    return "../outside.safetensors"


def _absolute_shard(folder: Path) -> str:
    return str(_outside_shard(folder))


def _symlinked_shard(folder: Path) -> str:
    (folder / "link.safetensors").symlink_to(_outside_shard(folder))
    return "link.safetensors"


INDEX_CASES = [
    pytest.param(
        lambda folder: _write_index(folder, INDEX, {"weight_map": list(_index_of(folder)["weight_map"])}),
        [INDEX, '"weight_map" should be an object', "got a list"],
        id="weight-map-list",
    ),
    pytest.param(
        lambda folder: _write_index(folder, INDEX, {"weight_map": dict.fromkeys(_index_of(folder)["weight_map"], 1)}),
        [INDEX, "maps tensor", "not a shard file name"],
        id="weight-map-values-not-str",
    ),
    pytest.param(
        lambda folder: _write_index(folder, INDEX, {"weight_map": {}}), [INDEX, "an empty object"], id="empty"
    ),
    pytest.param(lambda folder: _write_index(folder, INDEX, [1, 2]), [INDEX, "got a list"], id="index-list"),
    pytest.param(
        lambda folder: (folder / INDEX).write_bytes(b'{"weight_map": {"\xff": "a"}}'),
        [INDEX, "not UTF-8"],
        id="index-not-utf8",
    ),
    pytest.param(
        _map_first_shard_to(_climbing_shard),
        ["'../outside.safetensors'", "outside the checkpoint folder"],
        id="shard-dotdot",
    ),
    pytest.param(
        _map_first_shard_to(_absolute_shard),
        ["outside.safetensors", "outside the checkpoint folder"],
        id="shard-absolute",
    ),
    pytest.param(
        _map_first_shard_to(_symlinked_shard),
        ["link.safetensors", "outside the checkpoint folder"],
        id="shard-symlink-out",
    ),
]


@pytest.mark.parametrize(("damage", "expected"), INDEX_CASES)
def test_a_bad_shard_index_is_refused_and_nothing_outside_is_read(
    sharded_checkpoint: Path, tmp_path: Path, damage: Edit, expected: list[str]
) -> None:
    src = _copy(sharded_checkpoint, tmp_path)
    damage(src)
    _assert_refused(src, tmp_path, expected)


def test_a_bin_index_naming_a_shard_outside_is_refused(neox_checkpoint: Path, tmp_path: Path) -> None:
    src = _copy(neox_checkpoint, tmp_path)
    state = load_file(src / WEIGHTS)
    (src / WEIGHTS).unlink()
    torch.save(state, tmp_path / "outside.bin")
    _write_index(src, "pytorch_model.bin.index.json", {"weight_map": dict.fromkeys(state, "../outside.bin")})
    _assert_refused(src, tmp_path, ["pytorch_model.bin.index.json", "'../outside.bin'", "outside the checkpoint"])


@pytest.mark.parametrize("name", ["config.json", WEIGHTS])
def test_a_file_linked_from_outside_the_folder_is_not_read(neox_checkpoint: Path, tmp_path: Path, name: str) -> None:
    src = _copy(neox_checkpoint, tmp_path)
    outside = tmp_path / f"elsewhere-{name}"
    (src / name).rename(outside)
    (src / name).symlink_to(outside)
    _assert_refused(src, tmp_path, [name, "outside the checkpoint folder"])


# ---------------------------------------------------------------- config.json


def test_a_config_that_is_not_utf8_is_named(neox_checkpoint: Path, tmp_path: Path) -> None:
    src = _copy(neox_checkpoint, tmp_path)
    (src / "config.json").write_bytes(b'{"model_type": "gpt_neox\xe9"}')
    _assert_refused(src, tmp_path, ["config.json", "not UTF-8", "0xe9"])


def test_a_config_that_is_a_json_list_is_named(neox_checkpoint: Path, tmp_path: Path) -> None:
    src = _copy(neox_checkpoint, tmp_path)
    (src / "config.json").write_text("[]")
    _assert_refused(src, tmp_path, ["config.json", "expected a JSON object, got a list"], command="inspect")


# ---------------------------------------------------------------- pytorch_model.bin


class _RunsCode:
    """A pickle that would create a marker file if unpickled without weights_only."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[object, tuple[str]]:
        return os.system, (f"touch {self.marker}",)


def _bin_source(checkpoint: Path, tmp_path: Path, extra: dict[str, object], zipped: bool) -> Path:
    src = _copy(checkpoint, tmp_path)
    state: dict[str, object] = {**load_file(src / WEIGHTS), **extra}
    (src / WEIGHTS).unlink()
    torch.save(state, src / "pytorch_model.bin", _use_new_zipfile_serialization=zipped)
    return src


def test_a_legacy_non_zip_bin_converts(neox_checkpoint: Path, tmp_path: Path) -> None:
    src = _bin_source(neox_checkpoint, tmp_path, {}, zipped=False)
    out = tmp_path / "out"
    result = invoke("convert", src, "--out", out)
    assert result.exit_code == 0, result.output
    assert (out / WEIGHTS).is_file()


@pytest.mark.parametrize("zipped", [False, True], ids=["legacy", "zip"])
def test_a_bin_with_pickled_code_is_refused_and_never_run(neox_checkpoint: Path, tmp_path: Path, zipped: bool) -> None:
    marker = tmp_path / "pwned"
    src = _bin_source(neox_checkpoint, tmp_path, {"evil": _RunsCode(marker)}, zipped)
    line = _assert_refused(src, tmp_path, [])
    assert line == (
        f"error: {src / 'pytorch_model.bin'}: refused: it holds pickled code, which xatl never runs; "
        "convert the checkpoint to safetensors"
    )
    assert not marker.exists()


@pytest.mark.parametrize("zipped", [False, True], ids=["legacy", "zip"])
def test_a_truncated_bin_is_named(neox_checkpoint: Path, tmp_path: Path, zipped: bool) -> None:
    src = _bin_source(neox_checkpoint, tmp_path, {}, zipped)
    raw = (src / "pytorch_model.bin").read_bytes()
    (src / "pytorch_model.bin").write_bytes(raw[: len(raw) // 2])
    _assert_refused(src, tmp_path, ["pytorch_model.bin", "not a readable PyTorch weights file"])


# ---------------------------------------------------------------- tokenizer files and the storage root


def test_a_tokenizer_file_linked_outside_is_not_copied(neox_checkpoint: Path, tmp_path: Path) -> None:
    src = _copy(neox_checkpoint, tmp_path)
    secret = tmp_path / "secret.txt"
    secret.write_text("not a tokenizer")
    (src / "merges.txt").symlink_to(secret)
    (src / "vocab.json").write_text("{}")
    out = tmp_path / "out"
    result = invoke("convert", src, "--out", out)
    assert result.exit_code == 0, result.output
    assert not (out / "merges.txt").exists()
    assert (out / "vocab.json").read_text() == "{}"


def test_storage_root_is_the_folder_or_a_snapshots_repo_cache(tmp_path: Path) -> None:
    snapshot = tmp_path / "hub" / "models--org--tiny" / "snapshots" / ("a" * 40)
    snapshot.mkdir(parents=True)
    (tmp_path / "plain").mkdir()
    assert storage_root(tmp_path / "plain") == (tmp_path / "plain").resolve()
    assert storage_root(snapshot) == (tmp_path / "hub" / "models--org--tiny").resolve()
    source = SourceCheckpoint(path=snapshot, reference=REPO, config={}, tensors={})
    assert source.storage_root == storage_root(snapshot)


# ---------------------------------------------------------------- read errors


@pytest.mark.parametrize(
    ("name", "code"), [("config.json", errno.EACCES), (WEIGHTS, errno.EIO)], ids=["config-eacces", "weights-eio"]
)
def test_an_os_error_while_reading_names_the_file(
    neox_checkpoint: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, name: str, code: int
) -> None:
    src = _copy(neox_checkpoint, tmp_path)
    before = tree_digest(src)
    real_open = Path.open

    def failing_open(self: Path, *args: object, **kwargs: object) -> object:
        if self.name == name and src in self.parents:
            raise OSError(code, os.strerror(code), str(self))
        return real_open(self, *args, **kwargs)

    with monkeypatch.context() as patch:  # only while xatl runs: the digests below read the files too
        patch.setattr(Path, "open", failing_open)
        result = invoke("convert", src, "--out", tmp_path / "out")
    line = error_line(result)
    assert f"{src / name}: cannot read it ({os.strerror(code)})" in line
    assert not (tmp_path / "out").exists()
    assert leftovers(tmp_path) == []
    assert tree_digest(src) == before


@pytest.mark.skipif(hasattr(os, "geteuid") and os.geteuid() == 0, reason="root reads files whatever their mode")
def test_an_unreadable_config_names_the_file(neox_checkpoint: Path, tmp_path: Path) -> None:
    src = _copy(neox_checkpoint, tmp_path)
    (src / "config.json").chmod(0)
    try:
        _assert_refused(src, tmp_path, ["config.json", "Permission denied"])
    finally:
        (src / "config.json").chmod(0o644)


def test_a_weights_file_removed_after_opening_is_a_source_error(neox_checkpoint: Path, tmp_path: Path) -> None:
    src = _copy(neox_checkpoint, tmp_path)
    with open_checkpoint(src) as source:
        (src / WEIGHTS).unlink()
        with pytest.raises(SourceError, match=rf"{WEIGHTS}: cannot read tensor '{DENSE_0}'"):
            source.read(DENSE_0)


# ---------------------------------------------------------------- the Hub


@pytest.fixture(scope="module")
def hub_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[FakeHub]:
    hub = FakeHub().start()
    hub.add_repo(REPO, save_neox(tmp_path_factory.mktemp("repos") / "tiny"))
    yield hub
    hub.stop()


def _point_hub_at(endpoint: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Point huggingface_hub (already imported) at ENDPOINT, with an empty cache and short timeouts."""
    from huggingface_hub import constants
    from huggingface_hub.utils import _detect_agent

    monkeypatch.setattr(constants, "ENDPOINT", endpoint)
    monkeypatch.setattr(constants, "HUGGINGFACE_CO_URL_TEMPLATE", endpoint + "/{repo_id}/resolve/{revision}/{filename}")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hf-cache"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "HF_HUB_ETAG_TIMEOUT", 1)
    monkeypatch.setattr(constants, "HF_HUB_DOWNLOAD_TIMEOUT", 1)
    # Its once-a-process telemetry fetch waits 3 s on a silent server; it is not what these tests measure.
    monkeypatch.setattr(_detect_agent, "_registry", {"standardEnvVars": [], "harnesses": {}}, raising=False)
    monkeypatch.delenv("HF_TOKEN", raising=False)


@pytest.fixture
def hub(hub_server: FakeHub, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> FakeHub:
    _point_hub_at(hub_server.endpoint, tmp_path, monkeypatch)
    hub_server.reset_requests()
    return hub_server


@pytest.fixture
def silent_endpoint() -> Iterator[str]:
    """A server on 127.0.0.1 that accepts connections and never answers."""
    server = socket.create_server(("127.0.0.1", 0))
    held: list[socket.socket] = []

    def accept() -> None:
        while True:
            try:
                held.append(server.accept()[0])
            except OSError:
                return

    threading.Thread(target=accept, daemon=True).start()
    yield f"http://127.0.0.1:{server.getsockname()[1]}"
    server.close()
    for connection in held:
        connection.close()


class _ServerError(BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        body = b'{"error": "Internal Error"}'
        self.send_response(500)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    do_HEAD = do_GET

    def log_message(self, format: str, *args: object) -> None:
        pass


@pytest.fixture
def failing_endpoint() -> Iterator[str]:
    """A server on 127.0.0.1 that answers every request with HTTP 500."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), _ServerError)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def _refused_endpoint() -> str:
    """An address where nothing listens: the connection is refused at once."""
    with socket.create_server(("127.0.0.1", 0)) as probe:
        return f"http://127.0.0.1:{probe.getsockname()[1]}"


def _assert_hub_refused(tmp_path: Path, source: str, expected: list[str], *options: str) -> str:
    out = tmp_path / "out"
    line = error_line(invoke("convert", source, "--out", out, *options))
    for text in expected:
        assert text in line, (text, line)
    assert not out.exists()
    assert leftovers(tmp_path) == []
    return line


def test_a_hub_that_never_answers_times_out_in_seconds(
    silent_endpoint: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _point_hub_at(silent_endpoint, tmp_path, monkeypatch)
    started = time.monotonic()
    line = _assert_hub_refused(tmp_path, REPO, [])
    assert line == (
        f"error: {REPO}: the Hub at {silent_endpoint} did not answer (timeout); check your network or HF_ENDPOINT, "
        "or set HF_HUB_OFFLINE=1 to use the cache"
    )
    assert time.monotonic() - started < 8


def test_a_hub_server_error_says_try_again_later(
    failing_endpoint: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _point_hub_at(failing_endpoint, tmp_path, monkeypatch)
    line = _assert_hub_refused(tmp_path, REPO, [REPO, "the Hub answered HTTP 500 (server error); try again later"])
    assert "offline" not in line


def test_no_network_without_offline_mode_does_not_suggest_unsetting_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    endpoint = _refused_endpoint()
    _point_hub_at(endpoint, tmp_path, monkeypatch)
    line = _assert_hub_refused(tmp_path, REPO, [REPO, f"cannot reach the Hub at {endpoint}", "check your network"])
    assert "unset HF_HUB_OFFLINE" not in line


def test_offline_mode_without_a_cached_copy_suggests_unsetting_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from huggingface_hub import constants

    _point_hub_at(_refused_endpoint(), tmp_path, monkeypatch)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    _assert_hub_refused(tmp_path, REPO, [REPO, "not in the local cache", "unset HF_HUB_OFFLINE"])


@pytest.mark.parametrize(
    ("source", "expected"),
    [
        ("org/a--b", ["org/a--b: not a valid Hub id", "without '--' or '..'"]),
        ("org/..", ["org/..: not a valid Hub id", "a Hub id is ORG/NAME"]),
        ("org/" + "n" * 97, ["not a valid Hub id", "at most 96 characters"]),
        ("a/b/c", ["a/b/c: no such local folder, and not a Hub id (org/name)"]),
    ],
    ids=["double-dash", "dot-dot", "too-long", "three-parts"],
)
def test_an_invalid_hub_id_is_refused_before_any_request(
    hub: FakeHub, tmp_path: Path, source: str, expected: list[str]
) -> None:
    _assert_hub_refused(tmp_path, source, expected)
    assert hub.requests == []


def test_a_cache_dir_that_is_a_file_names_the_cache(hub: FakeHub, tmp_path: Path) -> None:
    cache = tmp_path / "cache-file"
    cache.write_text("not a folder")
    _assert_hub_refused(
        tmp_path, REPO, [REPO, f"cannot use the Hugging Face cache {cache}", "--cache-dir"], "--cache-dir", str(cache)
    )
    assert cache.read_text() == "not a folder"


def test_a_full_disk_during_download_names_the_cache(
    hub: FakeHub, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import huggingface_hub.file_download as file_download

    def disk_full(*args: object, **kwargs: object) -> None:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(file_download, "http_get", disk_full)
    _assert_hub_refused(
        tmp_path, REPO, [REPO, f"cannot use the Hugging Face cache {tmp_path / 'hf-cache'}", "No space left on device"]
    )


def test_a_read_only_cache_names_the_cache(hub: FakeHub, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Simulated (root can write anywhere): every folder creation under the cache is refused, as on a read-only one."""
    cache = tmp_path / "hf-cache"
    real_makedirs, real_mkdir = os.makedirs, Path.mkdir

    def refuse(path: object) -> None:
        if str(path).startswith(str(cache)):
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(path))

    def makedirs(name: str, *args: object, **kwargs: object) -> None:
        refuse(name)
        real_makedirs(name, *args, **kwargs)

    def mkdir(self: Path, *args: object, **kwargs: object) -> None:
        refuse(self)
        real_mkdir(self, *args, **kwargs)

    monkeypatch.setattr(os, "makedirs", makedirs)
    monkeypatch.setattr(Path, "mkdir", mkdir)
    _assert_hub_refused(tmp_path, REPO, [REPO, f"cannot use the Hugging Face cache {cache}", "Permission denied"])


def test_hub_downloads_print_no_progress_bars_and_restore_them(hub: FakeHub, tmp_path: Path) -> None:
    from huggingface_hub.utils import are_progress_bars_disabled

    before = are_progress_bars_disabled()
    result = invoke("convert", REPO, "--out", tmp_path / "out")
    assert result.exit_code == 0, result.output
    assert "it/s" not in result.stderr and "Fetching" not in result.stderr and "%|" not in result.stderr
    assert are_progress_bars_disabled() == before
