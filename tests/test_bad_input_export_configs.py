"""Bad input to `xatl export` and to every reader of a config.json (issue 21, items 7 and 8).

Export reads an xatl folder's weights through its shard index, never a glob: a missing, stray, empty or foreign
shard is one line naming the file, and nothing appears at OUT (before, a missing shard exported 2 of 29 tensors with
exit 0). `xatl verify` of an export checks the export's files the same way, and its manifest's export record.
A config.json value of the wrong type (a string, float or null where transformers' config wants an int or a bool)
is one line naming the file and the field, from every command that reads a source or an xatl folder.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from safetensors.torch import load_file, save_file

from tests.bad_input import error_line, invoke, leftovers, tree_digest
from tests.conftest import DISTILL_TEXT, EXAMPLE_CHECKPOINT
from tests.test_export import LLAMA
from tests.test_families import save_family

INDEX = "model.safetensors.index.json"
MANIFEST = "xatl_manifest.json"
TRAINING = ["--align-steps", "1", "--kd-steps", "1", "--block-size", "16", "--batch-size", "2"]
SCORING = ["--block-size", "16", "--max-blocks", "1", "--batch-size", "1"]

Damage = Callable[[Path], str]  # damages a folder; returns the file the error line must name


# ---------------------------------------------------------------- shared folders (built once, never changed)


@pytest.fixture(scope="module")
def llama(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A Llama-family source: converted to Mamba2, it exports as bamba."""
    return save_family(tmp_path_factory.mktemp("llama") / "source", "llama", LLAMA)


@pytest.fixture(scope="module")
def sharded(llama: Path) -> Path:
    """The Llama source converted to Mamba2 in several shards."""
    out = llama.parent / "sharded"
    result = invoke("convert", llama, "--to", "mamba2", "--max-shard-size", "100K", "--out", out)
    assert result.exit_code == 0, result.output
    assert len(_shards(out)) > 2
    return out


@pytest.fixture(scope="module")
def single(llama: Path) -> Path:
    """The Llama source converted to Mamba2 in one model.safetensors."""
    out = llama.parent / "single"
    result = invoke("convert", llama, "--to", "mamba2", "--out", out)
    assert result.exit_code == 0, result.output
    return out


@pytest.fixture(scope="module")
def exported(sharded: Path) -> Path:
    """The sharded folder exported as bamba (sharded as well), which `xatl verify` checks against `sharded`."""
    out = sharded.parent / "bamba"
    result = invoke("export", sharded, "--format", "bamba", "--out", out)
    assert result.exit_code == 0, result.output
    assert (out / INDEX).is_file()
    return out


@pytest.fixture(scope="module")
def converted(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The example (GPT-NeoX) converted to Mamba in one model.safetensors: what verify, eval and distill read."""
    out = tmp_path_factory.mktemp("converted") / "xatl"
    result = invoke("convert", EXAMPLE_CHECKPOINT, "--to", "mamba", "--out", out)
    assert result.exit_code == 0, result.output
    return out


@pytest.fixture(scope="module")
def text(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("text") / "text.txt"
    path.write_text(DISTILL_TEXT[:6000])
    return path


def _shards(folder: Path) -> list[str]:
    """The shard files the folder's index names, in order."""
    return list(dict.fromkeys(json.loads((folder / INDEX).read_text())["weight_map"].values()))


def _copy(folder: Path, tmp_path: Path) -> Path:
    """A private copy of a shared folder, to damage."""
    return Path(shutil.copytree(folder, tmp_path / folder.name))


def _refused(args: list[Any], tmp_path: Path, *untouched: Path) -> str:
    """Run the CLI: one error line, exit 2, the user's folders unchanged, no OUT and no leftovers beside it."""
    before = [tree_digest(folder) for folder in untouched]
    line = error_line(invoke(*args))
    assert [tree_digest(folder) for folder in untouched] == before
    assert not (tmp_path / "out").exists()
    assert leftovers(tmp_path) == []
    return line


# ---------------------------------------------------------------- item 7: export reads what the index says


def _missing(folder: Path) -> str:
    shard = _shards(folder)[1]
    (folder / shard).unlink()
    return shard  # named by the index that names it


def _stray(folder: Path) -> str:
    shutil.copyfile(folder / _shards(folder)[1], folder / "extra.safetensors")
    return str(folder / "extra.safetensors")


def _empty(folder: Path) -> str:
    shard = folder / _shards(folder)[1]
    shard.write_bytes(b"")
    return str(shard)


def _foreign(folder: Path) -> str:
    first, _, third = _shards(folder)[:3]
    shutil.copyfile(folder / first, folder / third)  # another shard's tensors under this shard's name
    return str(folder / third)


def _lacking(folder: Path) -> str:
    shard = folder / _shards(folder)[1]
    tensors = load_file(shard)
    tensors.pop(sorted(tensors)[0])
    save_file(tensors, shard, metadata={"format": "pt"})
    return str(shard)


def _no_index(folder: Path) -> str:
    (folder / INDEX).unlink()
    return str(folder / INDEX)


DAMAGE: dict[str, tuple[Damage, str]] = {
    "missing shard": (_missing, "which is missing"),
    "stray shard": (_stray, "not part of the model"),
    "empty shard": (_empty, "not a readable safetensors file"),
    "foreign shard": (_foreign, "a foreign shard: it holds tensor"),
    "shard lacking a tensor": (_lacking, "a foreign shard: it lacks tensor"),
    "no index": (_no_index, "missing, and without it"),
}


@pytest.mark.parametrize("case", list(DAMAGE))
def test_export_of_a_folder_whose_shards_do_not_match_its_index_is_one_line(
    case: str, sharded: Path, tmp_path: Path
) -> None:
    folder = _copy(sharded, tmp_path)
    damage, reason = DAMAGE[case]
    named = damage(folder)
    line = _refused(["export", folder, "--format", "bamba", "--out", tmp_path / "out"], tmp_path, folder)
    assert named in line and reason in line, line
    assert line.endswith("; convert again")


def test_export_of_a_single_file_folder_refuses_a_stray_safetensors(single: Path, tmp_path: Path) -> None:
    folder = _copy(single, tmp_path)
    shutil.copyfile(folder / "model.safetensors", folder / "model-old.safetensors")
    line = _refused(["export", folder, "--format", "bamba", "--out", tmp_path / "out"], tmp_path, folder)
    assert line.startswith(f"error: {folder / 'model-old.safetensors'}: not part of the model"), line
    assert f"there is no {INDEX} to name it" in line


@pytest.mark.parametrize("case", list(DAMAGE))
def test_verify_of_an_export_whose_shards_do_not_match_its_index_is_one_line(
    case: str, exported: Path, sharded: Path, tmp_path: Path
) -> None:
    folder = _copy(exported, tmp_path)
    damage, reason = DAMAGE[case]
    named = damage(folder)
    line = _refused(["verify", folder], tmp_path, folder, sharded)
    assert named in line and reason in line, line
    assert line.endswith("; export again")


@pytest.mark.parametrize(
    ("record", "expected"),
    [
        ({"format": "bamba2", "from": "X"}, "names format 'bamba2', which xatl does not export (known: "),
        ({"format": None, "from": "X"}, "names format None"),
        ({"format": "bamba"}, 'has no "from"'),
        ("bamba", "is a string, not an object with format and from"),
        (None, "is null, not an object"),
    ],
    ids=["unknown format", "null format", "no from", "a string", "null"],
)
def test_verify_of_an_export_with_a_malformed_export_record_is_one_line(
    record: Any, expected: str, exported: Path, sharded: Path, tmp_path: Path
) -> None:
    folder = _copy(exported, tmp_path)
    manifest = json.loads((folder / MANIFEST).read_text())
    if isinstance(record, dict) and record.get("from") == "X":
        record = {**record, "from": str(sharded)}
    (folder / MANIFEST).write_text(json.dumps({**manifest, "export": record}))
    line = _refused(["verify", folder], tmp_path, folder, sharded)
    assert line.startswith(f"error: {folder / MANIFEST}: its export record "), line
    assert expected in line, line


# ---------------------------------------------------------------- item 8: configs transformers' strict config rejects


SOURCE_VALUES = {
    "num_hidden_layers": ("4", "must be an int, got '4' (a string)"),
    "hidden_size": (32.5, "must be an int, got 32.5"),
    "use_parallel_residual": (None, "must be true or false, got null"),
    "tie_word_embeddings": ("yes", "must be true or false, got 'yes' (a string)"),
    "layer_norm_eps": (1, "must be a float, got 1 (write 1.0)"),  # transformers refuses an int for a float
}


@pytest.fixture(scope="module")
def bad_sources(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The example checkpoint once per mistyped field."""
    root = tmp_path_factory.mktemp("bad-sources")
    sources = {}
    for field, (value, _) in SOURCE_VALUES.items():
        source = Path(shutil.copytree(EXAMPLE_CHECKPOINT, root / field))
        config = json.loads((source / "config.json").read_text())
        (source / "config.json").write_text(json.dumps({**config, field: value}, indent=2))
        sources[field] = source
    return sources


# Each command's arguments; SOURCE, MODEL, TEXT and OUT stand for the folders and files of a case.
SOURCE_COMMANDS: dict[str, list[str]] = {
    "convert": ["convert", "SOURCE", "--to", "mamba", "--out", "OUT"],
    "convert --dry-run": ["convert", "SOURCE", "--out", "OUT", "--dry-run"],
    "inspect": ["inspect", "SOURCE"],
    "verify --source": ["verify", "MODEL", "--source", "SOURCE"],
    "distill --teacher": ["distill", "MODEL", "--teacher", "SOURCE", "--data", "TEXT", "--out", "OUT", *TRAINING],
    "eval --teacher": ["eval", "MODEL", "--teacher", "SOURCE", "--data", "TEXT", "--split", "all", *SCORING],
}


def _arguments(template: list[str], **paths: Path) -> list[Any]:
    return [paths.get(argument.lower(), argument) for argument in template]


@pytest.mark.parametrize(
    ("field", "command"),  # every field through convert, every command with the first field
    [(field, "convert") for field in SOURCE_VALUES] + [("num_hidden_layers", name) for name in SOURCE_COMMANDS][1:],
)
def test_a_source_config_value_transformers_refuses_is_one_line_naming_the_file_and_field(
    field: str, command: str, bad_sources: dict[str, Path], converted: Path, text: Path, tmp_path: Path
) -> None:
    source = bad_sources[field]
    args = _arguments(SOURCE_COMMANDS[command], source=source, model=converted, text=text, out=tmp_path / "out")
    line = _refused(args, tmp_path, source, converted)
    assert f"{source / 'config.json'}: field '{field}' {SOURCE_VALUES[field][1]}" in line, line


def test_a_source_config_transformers_refuses_as_a_whole_is_one_line(tmp_path: Path) -> None:
    source = Path(shutil.copytree(EXAMPLE_CHECKPOINT, tmp_path / "source"))
    config = json.loads((source / "config.json").read_text())
    (source / "config.json").write_text(json.dumps({**config, "num_attention_heads": 5}))  # 5 does not divide 32
    line = _refused(["inspect", source], tmp_path, source)
    assert line.startswith(f"error: {source / 'config.json'}: transformers' GPTNeoXConfig refuses it: "), line


def test_a_gpt2_config_names_the_key_as_written(tmp_path: Path) -> None:
    """GPT-2 spells num_hidden_layers n_layer (transformers' attribute_map): the line says the file's own key."""
    source = save_family(tmp_path / "source", "gpt2")
    config = json.loads((source / "config.json").read_text())
    (source / "config.json").write_text(json.dumps({**config, "n_layer": "2"}))
    line = _refused(["inspect", source], tmp_path, source)
    assert f"{source / 'config.json'}: field 'n_layer' must be an int, got '2' (a string)" in line, line


XATL_VALUES = {
    "num_hidden_layers": ("4", "num_hidden_layers must be a positive integer, got '4'"),
    "tie_word_embeddings": ("yes", "tie_word_embeddings must be true or false, got 'yes'"),
    # transformers' own fields, which XatlConfig inherits and transformers leaves unchecked
    "chunk_size_feed_forward": ("4", "field 'chunk_size_feed_forward' must be an int, got '4' (a string)"),
    "id2label": ([1], "field 'id2label' must be an object or null, got [1] (a list)"),
}
XATL_COMMANDS: dict[str, list[str]] = {
    "verify": ["verify", "MODEL"],
    "eval": ["eval", "MODEL", "--data", "TEXT", "--split", "all", *SCORING],
    "export": ["export", "MODEL", "--format", "mamba-ssm", "--out", "OUT"],
    "distill": ["distill", "MODEL", "--teacher", str(EXAMPLE_CHECKPOINT), "--data", "TEXT", "--out", "OUT", *TRAINING],
}


@pytest.mark.parametrize(
    ("field", "command"),  # every field through verify, every command with a field that transformers owns
    [(field, "verify") for field in XATL_VALUES] + [("id2label", command) for command in XATL_COMMANDS][1:],
)
def test_an_xatl_config_value_of_the_wrong_type_is_one_line_naming_the_file_and_field(
    field: str, command: str, converted: Path, text: Path, tmp_path: Path
) -> None:
    model = _copy(converted, tmp_path)
    config = json.loads((model / "config.json").read_text())
    (model / "config.json").write_text(json.dumps({**config, field: XATL_VALUES[field][0]}, indent=2))
    args = _arguments(XATL_COMMANDS[command], model=model, text=text, out=tmp_path / "out")
    line = _refused(args, tmp_path, model)
    assert line.startswith(f"error: {model / 'config.json'}: "), line
    assert XATL_VALUES[field][1] in line and line.endswith("; convert again"), line
