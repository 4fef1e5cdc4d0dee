"""Hub sources through the real huggingface_hub code path, against a fake Hub on 127.0.0.1."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from typer.testing import CliRunner

from tests.bad_input import error_line, invoke, leftovers
from tests.conftest import EXAMPLE_CHECKPOINT, save_neox
from tests.fake_hub import FakeHub
from xatl_convert.cli import app

runner = CliRunner()
PYTHIA = "EleutherAI/pythia-70m"
COMMITS: dict[str, str] = {}  # revision name → commit sha, filled by the hub_server fixture


@pytest.fixture(scope="session")
def hub_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[FakeHub]:
    """A fake Hub serving: the example checkpoint as pythia-70m (plus a stray .bin that must not be fetched), a
    step3000 revision, a .bin-only repo, a gated and a private repo."""
    folders = tmp_path_factory.mktemp("repos")
    hub = FakeHub().start()
    files = {path.name: path.read_bytes() for path in EXAMPLE_CHECKPOINT.iterdir()}
    hub.add_repo(PYTHIA, {**files, "pytorch_model.bin": b"not to be downloaded", "README.md": b"# card"})
    COMMITS["step3000"] = hub.add_repo(PYTHIA, save_neox(folders / "step3000", seed=7), revision="step3000")
    hub.add_repo("org/bin-only", save_neox(folders / "bin-only", "bin", seed=8))
    hub.add_repo("org/gated", save_neox(folders / "gated", seed=9), gated=True)
    hub.add_repo("org/private", save_neox(folders / "private", seed=10), private=True)
    yield hub
    hub.stop()


@pytest.fixture
def hub(hub_server: FakeHub, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> FakeHub:
    """Point huggingface_hub (already imported) at the fake Hub, with an empty cache for this test."""
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "ENDPOINT", hub_server.endpoint)
    template = hub_server.endpoint + "/{repo_id}/resolve/{revision}/{filename}"
    monkeypatch.setattr(constants, "HUGGINGFACE_CO_URL_TEMPLATE", template)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hf-cache"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.delenv("HF_TOKEN", raising=False)
    hub_server.reset_requests()
    return hub_server


def _downloaded_files(hub: FakeHub) -> set[str]:
    return {path.rsplit("/", 1)[-1] for method, path in hub.file_requests() if method == "GET"}


def _error_line(result) -> str:
    assert result.exit_code != 0, result.output
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in result.output, result.output
    return lines[0]


def test_alias_converts_end_to_end_and_fetches_only_config_tokenizer_and_safetensors(
    hub: FakeHub, tmp_path: Path
) -> None:
    out = tmp_path / "out"
    result = runner.invoke(app, ["convert", "pythia-70m", "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert _downloaded_files(hub) == {
        "config.json",
        "generation_config.json",
        "model.safetensors",
        "tokenizer.json",
        "tokenizer_config.json",
    }
    manifest = json.loads((out / "xatl_manifest.json").read_text())
    assert manifest["source"]["reference"] == PYTHIA
    assert len(manifest["source"]["revision"]) == 40
    assert "base_model: EleutherAI/pythia-70m" in (out / "README.md").read_text()
    assert (out / "tokenizer.json").read_bytes() == (EXAMPLE_CHECKPOINT / "tokenizer.json").read_bytes()


def test_a_hub_conversion_verifies_against_the_cached_snapshot_with_no_request(hub: FakeHub, tmp_path: Path) -> None:
    """The manifest records the snapshot folder; verify (twin included) reads it there, through its blob links."""
    out = tmp_path / "out"
    assert runner.invoke(app, ["convert", PYTHIA, "--out", str(out), "--attn-layers", "paper"]).exit_code == 0
    hub.reset_requests()
    result = runner.invoke(app, ["verify", str(out), "--json", str(tmp_path / "report.json")])
    assert result.exit_code == 0, result.output
    assert hub.file_requests() == []
    checks = {check["name"]: check for check in json.loads((tmp_path / "report.json").read_text())["checks"]}
    assert all(check["status"] == "pass" for check in checks.values())
    assert len(checks["source twin = source"]["details"]["per_layer"]) == 4


def test_second_convert_makes_no_download_request(hub: FakeHub, tmp_path: Path) -> None:
    assert runner.invoke(app, ["convert", PYTHIA, "--out", str(tmp_path / "a")]).exit_code == 0
    hub.reset_requests()
    assert runner.invoke(app, ["convert", PYTHIA, "--out", str(tmp_path / "b")]).exit_code == 0
    assert hub.file_requests() == []
    assert (tmp_path / "a" / "model.safetensors").read_bytes() == (tmp_path / "b" / "model.safetensors").read_bytes()


def test_cache_dir_option_decides_where_downloads_go(hub: FakeHub, tmp_path: Path) -> None:
    cache = tmp_path / "my-cache"
    result = runner.invoke(app, ["convert", PYTHIA, "--out", str(tmp_path / "out"), "--cache-dir", str(cache)])
    assert result.exit_code == 0, result.output
    assert list((cache / "models--EleutherAI--pythia-70m" / "snapshots").glob("*/model.safetensors"))
    assert not (tmp_path / "hf-cache").exists()


def _cli(args: list[str], env: dict[str, str], cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "xatl_convert.cli", *args], env=env, cwd=cwd, capture_output=True, text=True
    )


def test_offline_mode_converts_from_the_cache_and_fails_cleanly_without_it(hub: FakeHub, tmp_path: Path) -> None:
    """Real environment variables in a fresh process, as a user sets them."""
    cache = tmp_path / "cache"
    env = {**os.environ, "HF_ENDPOINT": hub.endpoint, "HF_HUB_CACHE": str(cache), "HF_HUB_OFFLINE": "0"}
    online = _cli(["convert", "pythia-70m", "--out", "first"], env, tmp_path)
    assert online.returncode == 0, online.stderr
    hub.reset_requests()
    offline = {**env, "HF_HUB_OFFLINE": "1"}
    cached = _cli(["convert", "pythia-70m", "--out", "second"], offline, tmp_path)
    assert cached.returncode == 0, cached.stderr
    assert hub.requests == []
    missing = _cli(["convert", "org/bin-only", "--out", "third"], offline, tmp_path)
    assert missing.returncode != 0
    assert missing.stderr.strip().splitlines() == [
        "error: org/bin-only: not in the local cache and the Hub cannot be reached (offline mode or no network); "
        "connect once, or unset HF_HUB_OFFLINE"
    ]
    assert not (tmp_path / "third").exists()


@pytest.mark.parametrize("form", ["inline", "option"])
def test_named_revision_is_converted_and_recorded(hub: FakeHub, tmp_path: Path, form: str) -> None:
    out = tmp_path / "out"
    args = [f"{PYTHIA}@step3000"] if form == "inline" else [PYTHIA, "--revision", "step3000"]
    result = runner.invoke(app, ["convert", *args, "--out", str(out)])
    assert result.exit_code == 0, result.output
    manifest = json.loads((out / "xatl_manifest.json").read_text())
    assert manifest["source"]["revision"] == COMMITS["step3000"]
    config = json.loads((out / "config.json").read_text())
    assert config["hidden_size"] == 32  # the tiny step3000 model, not the example on main (hidden 128)


def test_bin_only_repo_fetches_the_bin_weights(hub: FakeHub, tmp_path: Path) -> None:
    result = runner.invoke(app, ["convert", "org/bin-only", "--out", str(tmp_path / "out")])
    assert result.exit_code == 0, result.output
    assert "pytorch_model.bin" in _downloaded_files(hub)


@pytest.mark.parametrize(
    ("source", "message"),
    [
        ("org/missing", "org/missing: repository not found on the Hub, or private and not accessible"),
        ("org/private", "org/private: repository not found on the Hub, or private and not accessible"),
        ("org/gated", "org/gated: the repo is gated; accept its terms on the Hub, then log in"),
        (f"{PYTHIA}@nope", f"{PYTHIA}@nope: revision 'nope' not found on the Hub"),
        (f"{PYTHIA}@main --revision step3000", "revision 'main' conflicts with --revision 'step3000'"),
        ("not a hub id", "not a hub id: no such local folder, and not a Hub id (org/name) or a known alias"),
    ],
)
def test_hub_errors_end_in_one_clear_line(hub: FakeHub, tmp_path: Path, source: str, message: str) -> None:
    source_args = source.split(" --revision ")
    args = [source_args[0], *(["--revision", source_args[1]] if len(source_args) > 1 else [])]
    assert message in error_line(invoke("convert", *args, "--out", tmp_path / "out"))  # exit 2, one line
    assert not (tmp_path / "out").exists() and leftovers(tmp_path) == []


def test_token_from_environment_opens_a_gated_repo(hub: FakeHub, tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("HF_TOKEN", FakeHub.ALLOWED_TOKEN)
    result = runner.invoke(app, ["convert", "org/gated", "--out", str(tmp_path / "out")])
    assert result.exit_code == 0, result.output


def test_sources_command_lists_the_pythia_suite() -> None:
    result = runner.invoke(app, ["sources"])
    assert result.exit_code == 0
    for alias in ("pythia-70m", "pythia-12b", "pythia-1.4b-deduped"):
        assert alias in result.stdout
    assert "EleutherAI/pythia-410m" in result.stdout
