"""Bad input to `xatl verify`: each case ends as one `error: …` line naming the file at fault, or as a check that
fails or is skipped with its reason; never a traceback, and the converted folder is never modified.

One conversion serves the module; each case corrupts its own copy. Most cases fail before any model is built, so
only two cases run the forward passes.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from tests.bad_input import CHECK_FAILED, error_line, invoke, tree_digest
from tests.conftest import VERIFY_CHECK_NAMES, save_neox
from xatl_convert.conversion import convert
from xatl_convert.errors import OutputWriteError, UnsafeOutputError
from xatl_convert.manifest import MANIFEST_NAME
from xatl_convert.verify import VerifyReport
from xatl_convert.write_guard import WriteTarget, check_write_targets, write_report_file

WEIGHTS = "model.safetensors"
CHECK_NAMES = VERIFY_CHECK_NAMES

Damage = Callable[[Path], None]


@pytest.fixture(scope="module")
def converted(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A good conversion whose source stays in place; cases copy it, never touch it."""
    root = tmp_path_factory.mktemp("verify-bad-input")
    out = root / "out"
    convert(save_neox(root / "source"), out)
    return out


@pytest.fixture
def damaged(converted: Path, tmp_path: Path) -> Path:
    """A private copy of the conversion for one case to corrupt."""
    return Path(shutil.copytree(converted, tmp_path / "out"))


def _edit_json(name: str, edit: Callable[[Any], Any]) -> Damage:
    """Rewrite one JSON file of the folder through `edit` (which may change it in place or return a new value)."""

    def damage(out: Path) -> None:
        data = json.loads((out / name).read_text())
        changed = edit(data)
        (out / name).write_text(json.dumps(data if changed is None else changed))

    return damage


def _write(name: str, content: bytes) -> Damage:
    return lambda out: (out / name).write_bytes(content)


def _truncate(name: str) -> Damage:
    def damage(out: Path) -> None:
        data = (out / name).read_bytes()
        (out / name).write_bytes(data[: len(data) // 2])

    return damage


def _garble_header(out: Path) -> None:
    data = (out / WEIGHTS).read_bytes()
    (out / WEIGHTS).write_bytes(data[:8] + b"{garbage" + data[16:])  # the length prefix stays, the JSON breaks


def _delete(name: str) -> Damage:
    return lambda out: (out / name).unlink()


def _tensor(name: str, **fields: Any) -> Damage:
    return _edit_json(MANIFEST_NAME, lambda manifest: manifest["tensors"][name].update(fields))


EMBED = "model.embed_tokens.weight"

BAD_OUTPUTS = [
    pytest.param(
        _write(MANIFEST_NAME, b'{"tensors": '), [f"{MANIFEST_NAME}:1:13: invalid JSON"], id="manifest-not-json"
    ),
    pytest.param(_write(MANIFEST_NAME, b'{"a": "\xff"}'), [MANIFEST_NAME, "not UTF-8"], id="manifest-not-utf8"),
    pytest.param(_write(MANIFEST_NAME, b""), [MANIFEST_NAME, "empty"], id="manifest-empty-file"),
    pytest.param(
        _write(MANIFEST_NAME, b"{}"),
        [f"{MANIFEST_NAME}: missing required keys 'manifest_version', 'source', 'target', 'tensors'"],
        id="manifest-empty-object",
    ),
    pytest.param(
        _write(MANIFEST_NAME, b"[]"), [MANIFEST_NAME, "expected a JSON object, got a list"], id="manifest-list"
    ),
    pytest.param(
        _edit_json(MANIFEST_NAME, lambda manifest: manifest.pop("tensors") and None),
        [f"{MANIFEST_NAME}: missing required key 'tensors'"],
        id="manifest-without-tensors",
    ),
    pytest.param(
        _edit_json(MANIFEST_NAME, lambda manifest: manifest["source"].pop("path") and None),
        [f"{MANIFEST_NAME}: source: missing required key 'path'"],
        id="manifest-without-source-path",
    ),
    pytest.param(
        _edit_json(MANIFEST_NAME, lambda manifest: manifest.update(manifest_version=99)),
        [MANIFEST_NAME, "manifest_version 99 is newer", "upgrade xatl-convert"],
        id="manifest-from-the-future",
    ),
    pytest.param(
        _tensor(EMBED, shape=[96, "32"]),
        [f"{MANIFEST_NAME}: tensor '{EMBED}': shape[1]: should be a valid integer"],
        id="manifest-shape-wrong-type",
    ),
    pytest.param(
        _edit_json(MANIFEST_NAME, lambda manifest: manifest["tensors"].update({EMBED: "copy"})),
        [f"{MANIFEST_NAME}: tensor '{EMBED}': expected a JSON object, got a string"],
        id="manifest-entry-wrong-type",
    ),
    pytest.param(
        _tensor(EMBED, transform="frobnicate"),
        [f"{MANIFEST_NAME}: tensor '{EMBED}': unknown transform 'frobnicate'"],
        id="manifest-unknown-transform",
    ),
    pytest.param(
        _tensor(EMBED, status="moved"),
        [f"{MANIFEST_NAME}: tensor '{EMBED}': status: should be 'transferred' or 'initialised'"],
        id="manifest-unknown-status",
    ),
    pytest.param(_truncate(WEIGHTS), [WEIGHTS, "not a readable safetensors file", "truncated"], id="weights-truncated"),
    pytest.param(_garble_header, [WEIGHTS, "not a readable safetensors file", "invalid JSON"], id="weights-bad-header"),
    pytest.param(_delete(WEIGHTS), [f"{WEIGHTS}: missing", "convert again"], id="weights-missing"),
    pytest.param(_delete("config.json"), ["config.json: missing"], id="config-missing"),
    pytest.param(_write("config.json", b"{"), ["config.json:1:2: invalid JSON"], id="config-not-json"),
    pytest.param(
        _edit_json("config.json", lambda config: config.update(model_type="gpt2")),
        ["config.json: model_type is 'gpt2', expected 'xatl'"],
        id="config-not-xatl",
    ),
    pytest.param(
        _edit_json("config.json", lambda config: config.update(layer_types=["frob"] * 4)),
        ["config.json: not a valid xatl config", "unknown layer_types entries ['frob'"],
        id="config-invalid",
    ),
    pytest.param(
        _edit_json("config.json", lambda config: config.update(vocab_size=50)),
        ["config.json: does not fit the weights", "is [96, 32] in the safetensors, the config needs [50, 32]"],
        id="config-does-not-fit-weights",
    ),
]


@pytest.mark.parametrize(("damage", "expected"), BAD_OUTPUTS)
def test_a_damaged_output_fails_with_one_line_naming_the_file(
    damaged: Path, damage: Damage, expected: list[str]
) -> None:
    damage(damaged)
    before = tree_digest(damaged)
    line = error_line(invoke("verify", damaged))
    for fragment in expected:
        assert fragment in line, line
    assert str(damaged) in line  # the full path, so the user knows which folder
    assert tree_digest(damaged) == before


def test_a_source_given_that_does_not_exist_is_an_error_not_a_skip(damaged: Path, tmp_path: Path) -> None:
    before = tree_digest(damaged)
    missing = tmp_path / "no-such-source"
    line = error_line(invoke("verify", damaged, "--source", missing))
    assert f"--source {missing}: no such local folder" in line
    assert tree_digest(damaged) == before


@pytest.mark.parametrize("destination", ["missing-folder/report.json", "a-folder", "read-only/report.json"])
def test_an_unwritable_json_destination_fails_before_the_checks(
    damaged: Path, tmp_path: Path, destination: str
) -> None:
    (tmp_path / "a-folder").mkdir()
    (tmp_path / "read-only").mkdir(mode=0o555)
    if destination.startswith("read-only") and os.access(tmp_path / "read-only", os.W_OK):
        pytest.skip("running as root: a read-only folder is still writable")
    before = tree_digest(damaged)
    line = error_line(invoke("verify", damaged, "--json", tmp_path / destination))
    assert str(tmp_path / destination) in line
    assert tree_digest(damaged) == before


def test_report_destination_is_checked_by_the_write_guard_and_written_atomically(tmp_path: Path) -> None:
    def check(path: Path) -> None:
        check_write_targets([WriteTarget("--json", path, "report")], {})

    with pytest.raises(OutputWriteError, match=r"missing/report\.json: folder .*missing does not exist"):
        check(tmp_path / "missing" / "report.json")
    (tmp_path / "a-folder").mkdir()
    with pytest.raises(UnsafeOutputError, match="is a folder, not a file"):
        check(tmp_path / "a-folder")
    (tmp_path / "notes.json").write_text('{"mine": 1}')
    with pytest.raises(UnsafeOutputError, match="exists and is not a report xatl wrote"):
        check(tmp_path / "notes.json")
    check(tmp_path / "report.json")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a-folder", "notes.json"]  # checking creates nothing
    report = VerifyReport(output="out", source=None)
    write_report_file(tmp_path / "report.json", report.to_json())
    check(tmp_path / "report.json")  # a report xatl wrote may be replaced
    write_report_file(tmp_path / "report.json", report.to_json())
    assert json.loads((tmp_path / "report.json").read_text())["xatl_report"] == "verify"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a-folder", "notes.json", "report.json"]


def test_a_recorded_source_that_is_gone_skips_source_checks_with_the_reason(tmp_path: Path) -> None:
    source, out, report_path = tmp_path / "source", tmp_path / "out", tmp_path / "report.json"
    convert(save_neox(source), out)
    shutil.rmtree(source)
    before = tree_digest(out)
    result = invoke("verify", out, "--json", report_path)
    assert result.exit_code == 0, result.output
    report = json.loads(report_path.read_text())
    assert [check["name"] for check in report["checks"]] == CHECK_NAMES  # the same list as with a source
    transfers = next(check for check in report["checks"] if check["name"] == "transfers exact")
    reason = f"source not found: {source} (recorded in the manifest); pass --source"
    assert transfers["status"] == "skip" and transfers["value"] == reason and transfers["details"]["reason"] == reason
    assert report["passed"] is True  # a skip is not a failure, but it is shown
    assert "source not found" in result.stdout
    assert tree_digest(out) == before


def test_a_recorded_source_tensor_absent_from_the_source_fails_the_check_by_name(damaged: Path, tmp_path: Path) -> None:
    name = "model.layers.1.mlp.fc1.weight"
    _tensor(name, sources=["gpt_neox.layers.1.mlp.no_such_tensor.weight"])(damaged)
    before = tree_digest(damaged)
    report_path = tmp_path / "report.json"
    result = invoke("verify", damaged, "--json", report_path)
    assert result.exit_code == CHECK_FAILED, result.output
    assert "Traceback" not in result.output
    source = json.loads((damaged / MANIFEST_NAME).read_text())["source"]["path"]
    checks = json.loads(report_path.read_text())["checks"]
    transfers = next(check for check in checks if check["name"] == "transfers exact")
    assert transfers["status"] == "fail" and transfers["value"] == "43/44 equal"
    assert transfers["details"]["problems"] == [
        f"{name}: {source}: no tensor named 'gpt_neox.layers.1.mlp.no_such_tensor.weight'"
    ]
    assert tree_digest(damaged) == before
