"""`xatl mappings validate` as CI and pre-commit run it: many files in one call, every one reported, TODOs refused."""

from __future__ import annotations

import re
import shlex
import shutil
from pathlib import Path

import pytest
import yaml

from tests.bad_input import BAD_INPUT, error_line, invoke
from tests.conftest import EXAMPLE_CHECKPOINT, REPO_ROOT
from xatl_convert.errors import MappingError
from xatl_convert.mapping import builtin_mappings, parse_mapping

HOOKS = REPO_ROOT / ".pre-commit-hooks.yaml"
BUILTIN_FILES = sorted((REPO_ROOT / "mappings").glob("*.yaml"))
NEOX_TEXT = (REPO_ROOT / "mappings" / "gpt-neox.yaml").read_text()


def _hook() -> dict:
    hooks = yaml.safe_load(HOOKS.read_text())
    assert isinstance(hooks, list)
    return next(hook for hook in hooks if hook["id"] == "xatl-mappings-validate")


def _run_hook(files: list[Path]):
    """The hook's entry with the file names appended, as pre-commit runs it (in-process: `xatl` is the app)."""
    program, *arguments = shlex.split(_hook()["entry"])
    assert program == "xatl"
    return invoke(*arguments, *files)


def _lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.strip()]


def _line_of(text: str, start: str) -> int:
    """The 1-based number of the first line of `text` that starts with `start`."""
    return next(number for number, line in enumerate(text.splitlines(), 1) if line.startswith(start))


@pytest.fixture(scope="module")
def todo_scaffold(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A scaffold as `xatl mappings new` writes it for a family it knows only in part (Bloom): TODOs left."""
    from transformers import BloomConfig, BloomForCausalLM

    root = tmp_path_factory.mktemp("bloom")
    BloomForCausalLM(BloomConfig(n_layer=2, hidden_size=16, n_head=2, vocab_size=50)).save_pretrained(root / "b")
    out = root / "mappings" / "bloom.yaml"
    out.parent.mkdir()
    assert invoke("mappings", "new", "--source", root / "b", "--out", out).exit_code == 0
    return out


def test_the_hook_declares_what_pre_commit_requires() -> None:
    hook = _hook()
    assert {"id", "name", "entry", "language"} <= set(hook)
    assert hook["language"] == "python" and hook["pass_filenames"] is True
    files = re.compile(hook["files"])
    assert all(files.search(str(path.relative_to(REPO_ROOT))) for path in BUILTIN_FILES)
    assert files.search("configs/mappings/my-model.yml")
    assert not files.search("mappings.yaml") and not files.search("docs/mappings.md")


def test_the_hook_passes_every_builtin_mapping_file() -> None:
    result = _run_hook(BUILTIN_FILES)
    assert result.exit_code == 0, result.output
    assert result.stderr == ""
    assert _lines(result.stdout) == [
        f"ok {path}: schema valid ({len(parse_mapping(path.read_text()).rules)} rules)" for path in BUILTIN_FILES
    ]


def test_the_hook_reports_every_bad_file_and_still_checks_the_good_ones(tmp_path: Path, todo_scaffold: Path) -> None:
    folder = tmp_path / "mappings"
    folder.mkdir()
    good = folder / "good.yaml"
    shutil.copy(REPO_ROOT / "mappings" / "gpt-neox.yaml", good)
    broken = folder / "broken.yaml"
    mixer_line = next(text for text in NEOX_TEXT.splitlines() if text.startswith("  mixer: "))
    broken.write_text(NEOX_TEXT.replace(mixer_line, mixer_line.replace("mixer:", "mixr:")))
    later = folder / "llama.yaml"
    shutil.copy(REPO_ROOT / "mappings" / "llama.yaml", later)

    result = _run_hook([broken, good, todo_scaffold, later])

    assert result.exit_code == BAD_INPUT, result.output
    assert "Traceback" not in result.output
    assert _lines(result.stdout) == [f"ok {good}: schema valid (24 rules)", f"ok {later}: schema valid (22 rules)"]
    errors = _lines(result.stderr)
    assert len(errors) == 2 and all(line.startswith("error: ") for line in errors)
    line = _line_of(NEOX_TEXT, mixer_line)
    assert errors[0] == f"error: {broken}:{line}:3: unknown key 'target.mixr'; did you mean 'mixer'?"
    todo_lines = [number for number, text in enumerate(todo_scaffold.read_text().splitlines(), 1) if "TODO" in
                  text.split("#")[0]]  # fmt: skip
    named = re.findall(rf"{re.escape(str(todo_scaffold))}:(\d+): TODO left: ", errors[1])
    assert [int(number) for number in named] == todo_lines and len(todo_lines) >= 3
    assert errors[1].endswith(f"; fill them in ({len(todo_lines)} TODOs)")


def test_with_a_source_every_file_is_planned_and_each_misfit_named(tmp_path: Path) -> None:
    neox_file = builtin_mappings()["gpt-neox-to-mamba"]
    result = invoke("mappings", "validate", "gpt-neox-to-mamba2", "llama-to-mamba", neox_file,
                    "--source", EXAMPLE_CHECKPOINT, "--attn-layers", "paper")  # fmt: skip
    assert result.exit_code == BAD_INPUT, result.output
    assert _lines(result.stdout) == [
        f"ok gpt-neox-to-mamba2 covers {EXAMPLE_CHECKPOINT}: 50 transferred, 21 initialised, 6 dropped",
        f"ok {neox_file} covers {EXAMPLE_CHECKPOINT}: 50 transferred, 24 initialised, 6 dropped",
    ]
    llama_file = builtin_mappings()["llama-to-mamba"]
    assert _lines(result.stderr) == [
        f"error: {llama_file}: {EXAMPLE_CHECKPOINT}: model_type 'gpt_neox' does not match mapping 'llama-to-mamba' "
        "(which converts llama, mistral, qwen2, smollm3)"
    ]


def test_one_bad_file_is_one_error_line_as_for_any_command(tmp_path: Path) -> None:
    mapping = tmp_path / "m.yaml"
    mapping.write_text(NEOX_TEXT.replace("description: GPT-NeoX / Pythia", "description: TODO"))
    line = _line_of(NEOX_TEXT, "description:")
    expected = f"error: {mapping}:{line}: TODO left: description; fill it in"
    assert error_line(invoke("mappings", "validate", mapping)) == expected
    assert error_line(invoke("mappings", "validate", mapping, "--source", EXAMPLE_CHECKPOINT)) == expected
    out = tmp_path / "out"
    assert error_line(invoke("convert", EXAMPLE_CHECKPOINT, "--mapping", mapping, "--out", out)) == expected
    assert not out.exists()


def test_a_todo_in_a_value_fails_and_a_todo_in_a_comment_does_not() -> None:
    commented = NEOX_TEXT.replace("options:\n", "options:  # TODO: try attention_init on a bigger model\n", 1)
    assert parse_mapping(commented, "m.yaml").name == "gpt-neox"
    rule = _line_of(NEOX_TEXT, '  - target: "model.layers.{i}.mixer.q_proj.weight"')  # rules[7]
    placeholders = {
        '  - target: "model.layers.{i}.mixer.q_proj.weight"': '  - target: "TODO.{i}.q"',
        "attention_init: false": "TODO: false",  # a key is no escape
        "    norm_type: layernorm": "    norm_type: &norm TODO\n    norm_layout: *norm",  # an alias is named once
    }
    text = NEOX_TEXT
    for old, new in placeholders.items():
        assert old in text
        text = text.replace(old, new, 1)
    with pytest.raises(MappingError) as raised:
        parse_mapping(text, "m.yaml")
    norm = _line_of(NEOX_TEXT, "    norm_type: layernorm")
    option = _line_of(NEOX_TEXT, "  attention_init: false") + 1  # one line down: norm_layout was added above
    assert str(raised.value) == (
        f"m.yaml:{norm}: TODO left: target.config.norm_type; m.yaml:{option}: TODO left: options.TODO; "
        f"m.yaml:{rule + 1}: TODO left: rules[7].target; fill them in (3 TODOs)"
    )
