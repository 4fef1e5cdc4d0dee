"""Careless and hostile input to `xatl convert`: nothing of the user's is ever lost, and every failure is one line.

Each case asserts the exit code, exactly one `error: …` line on stderr with no traceback, no leftovers beside OUT,
the source's bytes unchanged, and an existing OUT unchanged unless the run succeeded with --force. The cases for
source readers, mappings and verify live in test_bad_input_sources.py, _mapping.py and _verify.py.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import resource
import shutil
import signal
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import yaml
from safetensors.torch import load_file, save_file

from tests.bad_input import error_line, invoke, leftovers, tree_digest
from tests.conftest import EXAMPLE_CHECKPOINT, save_neox
from xatl_convert.mapping import builtin_mappings


@pytest.fixture
def source(neox_checkpoint: Path, tmp_path: Path) -> Path:
    """A private copy of the tiny checkpoint inside tmp_path, so that a mistake could only hurt this copy."""
    folder = tmp_path / "source"
    shutil.copytree(neox_checkpoint, folder)
    return folder


def _converts(result) -> None:
    assert result.exit_code == 0, (result.output, result.exception)


# --- data loss -----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("where", "says"),
    [
        (lambda src: src, "is the source checkpoint"),
        (lambda src: src.parent, "contains the source checkpoint"),
        (lambda src: src / "converted", "lies inside the source checkpoint"),
    ],
    ids=["out-is-source", "out-is-parent-of-source", "out-inside-source"],
)
def test_output_that_would_touch_the_source_is_refused_even_with_force(
    source: Path, tmp_path: Path, where: Callable[[Path], Path], says: str
) -> None:
    (tmp_path / "unrelated.txt").write_text("keep me")
    before = tree_digest(tmp_path)
    for force in (["--force"], []):  # without --force, the error must not suggest it
        assert says in error_line(invoke("convert", source, "--out", where(source), *force))
    assert tree_digest(tmp_path) == before


def test_output_through_a_symlink_to_the_source_is_refused(source: Path, tmp_path: Path) -> None:
    (tmp_path / "link").symlink_to(source)
    before = tree_digest(source)
    assert "lies inside the source checkpoint" in error_line(invoke("convert", source, "--out", tmp_path / "link/x"))
    assert tree_digest(source) == before


def test_output_inside_the_hub_cache_folder_of_the_source_is_refused(neox_checkpoint: Path, tmp_path: Path) -> None:
    repo = tmp_path / "hub" / "models--org--tiny"
    snapshot = repo / "snapshots" / ("a" * 40)
    shutil.copytree(neox_checkpoint, snapshot)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("a" * 40)
    before = tree_digest(repo)
    result = invoke("convert", snapshot, "--out", repo / "refs", "--force")
    assert "lies inside the source checkpoint" in error_line(result) or "is the source" in error_line(result)
    assert tree_digest(repo) == before


def test_output_holding_the_mapping_file_is_refused(source: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    mapping = out / "mine.yaml"
    shutil.copy(builtin_mappings()["gpt-neox-to-mamba"], mapping)
    result = invoke("convert", source, "--out", out, "--mapping", mapping, "--force")
    assert "contains the mapping file" in error_line(result)
    assert mapping.is_file()


def test_output_that_is_the_current_directory_is_refused(
    source: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    work = tmp_path / "work"
    work.mkdir()
    (work / "notes.txt").write_text("keep me")
    monkeypatch.chdir(work)
    for out in (".", str(tmp_path)):
        result = invoke("convert", source, "--out", out, "--force")
        line = error_line(result)
        assert "the current folder" in line or "contains the source" in line
    assert (work / "notes.txt").read_text() == "keep me"


def test_folder_that_appears_at_out_during_the_conversion_is_kept(
    source: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from xatl_convert import writer

    out = tmp_path / "out"
    original = writer._write_folder

    def someone_else_creates_out(*arguments: object, **keywords: object) -> None:
        original(*arguments, **keywords)
        out.mkdir()
        (out / "theirs.txt").write_text("another process wrote this")

    monkeypatch.setattr(writer, "_write_folder", someone_else_creates_out)
    result = invoke("convert", source, "--out", out)
    assert "appeared while converting" in error_line(result)
    assert sorted(path.name for path in out.iterdir()) == ["theirs.txt"]
    assert leftovers(tmp_path) == []


def test_empty_folder_that_appears_at_out_is_not_replaced(
    source: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """rename(2) silently replaces an empty folder; the no-replace rename must not."""
    from xatl_convert import writer

    out = tmp_path / "out"
    original = writer._write_folder
    monkeypatch.setattr(writer, "_write_folder", lambda *a, **k: (original(*a, **k), out.mkdir()))
    assert "appeared while converting" in error_line(invoke("convert", source, "--out", out))
    assert out.is_dir() and list(out.iterdir()) == []


def test_second_conversion_to_the_same_output_waits_its_turn(source: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    with open(tmp_path / ".out.xatl-lock", "w") as lock:  # what a running conversion holds
        fcntl.flock(lock, fcntl.LOCK_EX)
        assert "another xatl conversion is writing it" in error_line(invoke("convert", source, "--out", out))
        assert not out.exists()
    _converts(invoke("convert", source, "--out", out))
    assert leftovers(tmp_path) == []


@pytest.mark.parametrize("kind", ["file", "folder", "symlink"])
def test_force_never_replaces_what_xatl_did_not_write(source: Path, tmp_path: Path, kind: str) -> None:
    out, target = tmp_path / "out", tmp_path / "target"
    target.mkdir()
    (target / "keep.txt").write_text("not xatl's")
    if kind == "file":
        out.write_text("old")
    elif kind == "folder":
        shutil.copytree(target, out)
    else:
        out.symlink_to(target)
    before = tree_digest(tmp_path)
    line = error_line(invoke("convert", source, "--out", out, "--force"))
    assert "not written by xatl" in line or "is a file, not a folder" in line
    assert tree_digest(tmp_path) == before and leftovers(tmp_path) == []


def test_force_replaces_a_symlink_to_an_xatl_folder_and_keeps_the_folder(source: Path, tmp_path: Path) -> None:
    out, earlier = tmp_path / "out", tmp_path / "earlier"
    _converts(invoke("convert", source, "--out", earlier))
    before = tree_digest(earlier)
    out.symlink_to(earlier)
    _converts(invoke("convert", source, "--out", out, "--force"))
    assert (out / "model.safetensors").is_file() and not out.is_symlink()
    assert tree_digest(earlier) == before
    assert leftovers(tmp_path) == []


def test_staging_left_by_a_killed_run_is_removed_by_the_next(source: Path, tmp_path: Path) -> None:
    for stale in (".out.xatl-partial-999999", ".out.xatl-replaced-999999"):
        (tmp_path / stale).mkdir()
        (tmp_path / stale / "model.safetensors").write_bytes(b"\0" * 1024)
    (tmp_path / ".out.xatl-lock").write_text("")  # a killed run's lock file: flock died with it
    _converts(invoke("convert", source, "--out", tmp_path / "out"))
    assert leftovers(tmp_path) == []


# --- failures while writing ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("code", "says"),
    [
        (errno.ENOSPC, "No space left on device"),
        (errno.EROFS, "Read-only file system"),
        (errno.EFBIG, "File too large"),
        (errno.EACCES, "Permission denied"),
    ],
)
def test_write_failure_is_one_line_and_keeps_the_old_output(
    source: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, code: int, says: str
) -> None:
    from xatl_convert import writer

    def fail(tensors: object, path: object, **keywords: object) -> None:
        raise OSError(code, os.strerror(code), str(path))

    out = tmp_path / "deep" / "er" / "out"
    monkeypatch.setattr(writer, "save_file", fail)
    line = error_line(invoke("convert", source, "--out", out))
    assert f"model.safetensors: {says}" in line and "nothing was written" in line
    assert not (tmp_path / "deep").exists(), "parents created for OUT must go too"
    out.parent.mkdir(parents=True)
    out.mkdir()
    (out / "old.txt").write_text("previous conversion")
    error_line(invoke("convert", source, "--out", out, "--force"))
    assert tree_digest(out) == {"old.txt": tree_digest(out / "old.txt")["old.txt"]}
    assert leftovers(out.parent) == []


def test_disk_that_cannot_hold_the_weights_is_refused_before_writing(
    source: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from xatl_convert import output_folder

    usage = shutil.disk_usage(tmp_path)
    monkeypatch.setattr(output_folder.shutil, "disk_usage", lambda path: usage._replace(free=1000))
    line = error_line(invoke("convert", source, "--out", tmp_path / "out"))
    assert "GiB free" in line and "needs" in line
    assert leftovers(tmp_path) == [] and not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    ("make_out", "says"),
    [
        (lambda tmp: tmp / "a-file" / "out", "which is a file"),
        (lambda tmp: tmp / ("x" * 300), "File name too long"),
    ],
    ids=["parent-is-a-file", "name-too-long"],
)
def test_impossible_output_path_is_one_line(
    source: Path, tmp_path: Path, make_out: Callable[[Path], Path], says: str
) -> None:
    (tmp_path / "a-file").write_text("")
    before = tree_digest(tmp_path)
    assert says in error_line(invoke("convert", source, "--out", make_out(tmp_path)))
    assert tree_digest(tmp_path) == before


def test_real_file_size_limit_is_one_line(source: Path, tmp_path: Path) -> None:
    """`ulimit -f`: the kernel refuses the write (EFBIG) once the weights pass the limit (Python ignores SIGXFSZ)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (64 * 1024, hard))
    try:
        result = invoke("convert", source, "--out", tmp_path / "out")
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
    assert "model.safetensors: File too large" in error_line(result)
    assert leftovers(tmp_path) == [] and not (tmp_path / "out").exists()


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_signal_mid_write_prints_one_line_and_leaves_nothing(
    source: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, signum: int
) -> None:
    from xatl_convert import writer

    original = writer.save_file

    def signal_after_first_shard(*arguments: object, **keywords: object) -> None:
        original(*arguments, **keywords)
        os.kill(os.getpid(), signum)

    monkeypatch.setattr(writer, "save_file", signal_after_first_shard)
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)  # as at a terminal, even in a background job
    try:
        result = invoke("convert", source, "--out", tmp_path / "out", "--max-shard-size", "20K")
    finally:
        signal.signal(signal.SIGINT, previous)
    name = signal.Signals(signum).name
    assert f"interrupted ({name}); nothing was written" in error_line(result, exit_code=128 + signum)
    assert leftovers(tmp_path) == [] and not (tmp_path / "out").exists()


# --- what convert must notice -------------------------------------------------------------------------------------


def _rewrite_tensor(folder: Path, name: str, edit: Callable) -> None:  # type: ignore[type-arg]
    tensors = load_file(folder / "model.safetensors")
    tensors[name] = edit(tensors[name].clone())
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})


def test_nan_in_a_source_tensor_is_named(source: Path, tmp_path: Path) -> None:
    name = "gpt_neox.layers.2.mlp.dense_h_to_4h.weight"
    _rewrite_tensor(source, name, lambda tensor: tensor.index_fill_(0, tensor.new_tensor([3]).long(), float("nan")))
    line = error_line(invoke("convert", source, "--out", tmp_path / "out"))
    assert f"tensor {name!r} holds NaN or Inf" in line and "model.safetensors" in line
    assert leftovers(tmp_path) == [] and not (tmp_path / "out").exists()


def test_value_that_overflows_the_output_dtype_is_named(source: Path, tmp_path: Path) -> None:
    name = "gpt_neox.layers.1.mlp.dense_4h_to_h.weight"
    _rewrite_tensor(source, name, lambda tensor: tensor.index_fill_(0, tensor.new_tensor([0]).long(), 1e6))
    line = error_line(invoke("convert", source, "--out", tmp_path / "out", "--dtype", "float16"))
    assert "model.layers.1.mlp.fc2.weight: its values overflow float16" in line and name in line


def test_output_files_share_one_mode_and_the_tokenizer_loads_without_remote_code(tmp_path: Path) -> None:
    from transformers import AutoTokenizer

    out = tmp_path / "out"
    _converts(invoke("convert", EXAMPLE_CHECKPOINT, "--out", out))
    modes = {path.name: path.stat().st_mode & 0o777 for path in out.iterdir()}
    assert len(set(modes.values())) == 1, modes
    tokenizer = AutoTokenizer.from_pretrained(out)  # would ask about remote code without tokenizer_class
    reference = AutoTokenizer.from_pretrained(EXAMPLE_CHECKPOINT)
    assert tokenizer("Hello world")["input_ids"] == reference("Hello world")["input_ids"]


# --- one style for every error ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("arguments", "says"),
    [
        (["convert", "SRC", "--bogus"], "No such option: --bogus"),
        (["convert", "SRC"], "--out"),
        (["convert", "SRC", "--out", "o", "--dtype", "float8"], "'float8': expected one of"),
        (["convert", "SRC", "--out", "o", "--max-shard-size", "0"], "at least one byte"),
        (["convert"], "Missing argument 'SRC'"),
        (["verify"], "Missing argument 'OUT'"),
        (["frobnicate"], "No such command"),
        (["mappings", "show", "nope"], "no such mapping file or built-in mapping"),
    ],
)
def test_option_errors_are_one_line(source: Path, arguments: list[str], says: str) -> None:
    arguments = [str(source) if argument == "SRC" else argument for argument in arguments]
    assert says in error_line(invoke(*arguments))


def test_help_sources_and_mappings_do_not_import_torch_and_xatl_still_registers() -> None:
    """These run before any conversion; importing torch and transformers would cost them seconds."""
    script = (
        "import sys\nfrom xatl_convert.cli import app\n"
        "for arguments in (['--help'], ['convert', '--help'], ['sources'], ['mappings', 'list'],"
        " ['mappings', 'schema'], ['mappings', 'show', 'llama-to-mamba'], ['convert', 'x', '--bogus']):\n"
        "    try:\n        app(arguments)\n    except SystemExit:\n        pass\n"
        "print(sorted(name for name in ('torch', 'transformers') if name in sys.modules))\n"
        "from transformers import AutoConfig\n"  # the deferred registration fires once transformers is imported
        "print(type(AutoConfig.for_model('xatl')).__name__)\n"
    )
    process = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert process.stdout.strip().splitlines()[-2:] == ["[]", "XatlConfig"], process.stdout + process.stderr


def test_usage_line_and_help_name_arguments_plainly() -> None:
    result = invoke("convert", "--help")
    assert "Usage: xatl convert [OPTIONS] SRC" in result.stdout
    assert "--set KEY=VALUE" in result.stdout and "<bool>" not in result.stdout and "list[str]" not in result.stdout
    result = invoke("mappings", "--help")
    for command in ("list", "show", "validate", "new", "schema"):
        assert f"  {command} " in result.stdout


def test_dry_run_folds_layers_into_patterns(source: Path) -> None:
    result = invoke("convert", source, "--dry-run", "--attn-layers", "1")
    assert result.exit_code == 0, result.output
    assert "model.layers.{i}.mlp.fc1.weight" in result.stdout and "0–3" in result.stdout
    assert "model.layers.2.mlp.fc1.weight" not in result.stdout
    assert str(builtin_mappings()["gpt-neox-to-mamba"]) not in result.stdout  # the mapping is named once, briefly
    result = invoke("convert", source, "--dry-run", "--all")
    assert "model.layers.2.mlp.fc1.weight" in result.stdout


# --- README's promise, case by case -------------------------------------------------------------------------------

MARKER = "xatl-code-ran.marker"


def _malformed_yaml(source: Path, tmp_path: Path) -> list[object]:
    mapping = tmp_path / "bad.yaml"
    mapping.write_text(f"name: x\nsource: !!python/object/apply:os.system ['touch {tmp_path / MARKER}']\n")
    return ["convert", source, "--out", tmp_path / "out", "--mapping", mapping]


def _unknown_key(source: Path, tmp_path: Path) -> list[object]:
    data = yaml.safe_load(builtin_mappings()["gpt-neox-to-mamba"].read_text())
    data["rulez"] = data.pop("rules")
    (tmp_path / "bad.yaml").write_text(yaml.safe_dump(data))
    return ["convert", source, "--out", tmp_path / "out", "--mapping", tmp_path / "bad.yaml"]


def _layer_out_of_range(source: Path, tmp_path: Path) -> list[object]:
    return ["convert", source, "--out", tmp_path / "out", "--attn-layers", "7"]


def _shape_mismatch(source: Path, tmp_path: Path) -> list[object]:
    _rewrite_tensor(source, "gpt_neox.layers.0.mlp.dense_h_to_4h.weight", lambda tensor: tensor[:-1])
    return ["convert", source, "--out", tmp_path / "out"]


def _missing_tensor(source: Path, tmp_path: Path) -> list[object]:
    tensors = load_file(source / "model.safetensors")
    del tensors["gpt_neox.layers.1.post_attention_layernorm.weight"]
    save_file(tensors, source / "model.safetensors", metadata={"format": "pt"})
    return ["convert", source, "--out", tmp_path / "out"]


def _truncated_safetensors(source: Path, tmp_path: Path) -> list[object]:
    weights = source / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    return ["convert", source, "--out", tmp_path / "out"]


def _malicious_pickle(source: Path, tmp_path: Path) -> list[object]:
    import pickle

    class RunsCode:
        def __reduce__(self) -> tuple[object, ...]:
            return (os.system, (f"touch {tmp_path / MARKER}",))

    (source / "model.safetensors").unlink()
    (source / "pytorch_model.bin").write_bytes(pickle.dumps({"weight": RunsCode()}))
    return ["convert", source, "--out", tmp_path / "out"]


def _existing_output(source: Path, tmp_path: Path) -> list[object]:
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "precious.txt").write_text("keep me")
    return ["convert", source, "--out", tmp_path / "out"]


def _nonexistent_source(source: Path, tmp_path: Path) -> list[object]:
    return ["convert", tmp_path / "no-such-folder", "--out", tmp_path / "out"]


PROMISES = {
    "malformed-yaml": (_malformed_yaml, "invalid YAML"),
    "unknown-key": (_unknown_key, "unknown key 'rulez'"),
    "layer-out-of-range": (_layer_out_of_range, "attention layer 7 is out of range"),
    "shape-mismatch": (_shape_mismatch, "gpt_neox.layers.0.mlp.dense_h_to_4h.weight"),
    "missing-tensor": (_missing_tensor, "model.layers.1.mlp_norm.weight"),
    "truncated-safetensors": (_truncated_safetensors, "model.safetensors"),
    "malicious-pickle": (_malicious_pickle, "pytorch_model.bin"),
    "existing-output-without-force": (_existing_output, "exists and was not written by xatl"),
    "missing-source": (_nonexistent_source, "no-such-folder"),
}


@pytest.mark.parametrize("case", list(PROMISES))
def test_readme_promise_bad_input_is_one_line_and_loses_nothing(source: Path, tmp_path: Path, case: str) -> None:
    prepare, says = PROMISES[case]
    arguments = prepare(source, tmp_path)
    source_before, out_before = tree_digest(source), tree_digest(tmp_path / "out")
    assert says in error_line(invoke(*arguments))
    assert tree_digest(source) == source_before
    assert tree_digest(tmp_path / "out") == out_before
    assert leftovers(tmp_path) == []
    assert not (tmp_path / MARKER).exists(), "untrusted code ran"


def test_readme_promise_reruns_are_byte_identical(source: Path, tmp_path: Path) -> None:
    _converts(invoke("convert", source, "--out", tmp_path / "a", "--attn-layers", "paper"))
    _converts(invoke("convert", source, "--out", tmp_path / "b", "--attn-layers", "paper"))
    first, second = tree_digest(tmp_path / "a"), tree_digest(tmp_path / "b")
    manifest_a = json.loads((tmp_path / "a" / "xatl_manifest.json").read_text())
    manifest_b = json.loads((tmp_path / "b" / "xatl_manifest.json").read_text())
    assert {key: value for key, value in first.items() if key not in ("xatl_manifest.json", "README.md")} == {
        key: value for key, value in second.items() if key not in ("xatl_manifest.json", "README.md")
    }
    manifest_a.pop("command_line"), manifest_b.pop("command_line")
    assert manifest_a == manifest_b


def test_readme_promise_source_folder_survives_a_forced_conversion_next_to_it(source: Path, tmp_path: Path) -> None:
    """The data-loss bug that started issue 9: an earlier conversion beside the source is replaced, the source is
    not; a checkpoint beside it is never replaced, even with --force."""
    _converts(invoke("convert", source, "--out", tmp_path / "neighbour"))
    save_neox(tmp_path / "other-model")
    before, other = tree_digest(source), tree_digest(tmp_path / "other-model")
    _converts(invoke("convert", source, "--out", tmp_path / "neighbour", "--force"))
    assert tree_digest(source) == before and (tmp_path / "neighbour" / "xatl_manifest.json").is_file()
    assert "not written by xatl" in error_line(invoke("convert", source, "--out", tmp_path / "other-model", "--force"))
    assert tree_digest(tmp_path / "other-model") == other
