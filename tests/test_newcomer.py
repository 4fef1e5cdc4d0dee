"""Issue 22, part 5: what a newcomer meets first. Chat templates travel with every output; a piped usage error is
one `error:` line; every output file has the mode the umask gives; an export keeps the token ids; a distilled model's
card says it was distilled; eval's table names its models and explains a gap beyond 100%; the docs' sources resolve;
the `wrote` line summarises the layers; `--format` help lists every format; the dry-run table keeps tensor names whole
on a 100-column terminal."""

from __future__ import annotations

import io
import json
import os
import re
import shutil
import stat
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from rich.console import Console
from transformers import AutoTokenizer

from tests.bad_input import invoke
from tests.conftest import EXAMPLE_CHECKPOINT, REPO_ROOT
from tests.test_export import LLAMA
from tests.test_families import save_family
from tests.test_llama import save_source
from xatl_convert.conversion import convert

pytest.importorskip("datasets")
pytest.importorskip("accelerate")

TEMPLATE = "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}\n{% endfor %}"
TOOL_TEMPLATE = "TOOLS {{ messages[0]['content'] }}"
MESSAGES = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]


@contextmanager
def _umask(mask: int) -> Iterator[None]:
    previous = os.umask(mask)
    try:
        yield
    finally:
        os.umask(previous)


def _with_chat_templates(folder: Path) -> Path:
    """The example's tokenizer with a default chat template and a named one, saved as transformers 5 saves them
    (chat_template.jinja, additional_chat_templates/tool_use.jinja)."""
    tokenizer = AutoTokenizer.from_pretrained(EXAMPLE_CHECKPOINT)
    tokenizer.chat_template = {"default": TEMPLATE, "tool_use": TOOL_TEMPLATE}
    tokenizer.save_pretrained(folder)
    assert (folder / "chat_template.jinja").is_file() and (folder / "additional_chat_templates").is_dir()
    return folder


@pytest.fixture(scope="module")
def outputs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path | str]:
    """Every kind of output, written under umask 022 from sources whose tokenizers have chat templates: a conversion
    (a hybrid student), its distillation, an export, and a one-step `convert --format`."""
    root = tmp_path_factory.mktemp("newcomer")
    example = shutil.copytree(EXAMPLE_CHECKPOINT, root / "example")
    _with_chat_templates(example)
    llama = save_family(root / "llama", "llama", (LLAMA[0], LLAMA[1], {**LLAMA[2], "pad_token_id": 0}))
    _with_chat_templates(llama)
    (root / "text.txt").write_text((REPO_ROOT / "README.md").read_text()[:20000])  # a few held-out blocks: fast
    with _umask(0o022):
        convert(example, root / "student", attn_layers="1")
        distilled = invoke("distill", root / "student", "--teacher", example, "--data", root / "text.txt", "--out",
                           root / "distilled", "--align-steps", "1", "--kd-steps", "1", "--block-size", "32",
                           "--batch-size", "2")  # fmt: skip
        assert distilled.exit_code == 0, distilled.output
        convert(llama, root / "llama-xatl", to="mamba2")
        exported = invoke("export", root / "llama-xatl", "--format", "bamba", "--out", root / "bamba")
        assert exported.exit_code == 0, exported.output
        one_step = invoke("convert", llama, "--to", "mamba2", "--attn-layers", "1", "--format", "granitemoehybrid",
                          "--out", root / "granite")  # fmt: skip
        assert one_step.exit_code == 0, one_step.output
    return {"student": root / "student", "distilled": root / "distilled", "bamba": root / "bamba",
            "granite": root / "granite", "example": example, "llama": llama, "text": root / "text.txt",
            "one_step_stdout": one_step.stdout}  # fmt: skip


OUTPUT_KINDS = ["student", "distilled", "bamba", "granite"]


# --- 1. the chat template travels ---------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", OUTPUT_KINDS)
def test_every_output_applies_the_sources_chat_templates(outputs: dict, kind: str) -> None:
    tokenizer = AutoTokenizer.from_pretrained(outputs[kind])
    assert tokenizer.apply_chat_template(MESSAGES, tokenize=False) == "<user>hi\n<assistant>hello\n"
    assert tokenizer.apply_chat_template(MESSAGES, tokenize=False, chat_template="tool_use") == "TOOLS hi"
    ids = tokenizer.apply_chat_template(MESSAGES, tokenize=True)
    assert len(ids) > 0


# --- 2. a piped usage error ---------------------------------------------------------------------------------------


def _xatl() -> str:
    script = Path(sys.executable).parent / "xatl"
    return str(script) if script.is_file() else f"{sys.executable} -m xatl_convert.cli"


@pytest.mark.parametrize("columns", [None, "0", "abc"])
def test_a_piped_usage_error_is_one_lowercase_error_line(columns: str | None, tmp_path: Path) -> None:
    env = {key: value for key, value in os.environ.items() if key not in ("COLUMNS", "FORCE_COLOR", "TTY_COMPATIBLE")}
    env["PYTHONPATH"] = os.pathsep.join([str(REPO_ROOT), env.get("PYTHONPATH", "")])  # this tree's xatl_convert
    if columns is not None:
        env["COLUMNS"] = columns  # rich prints nothing at width 0; int("abc") was a traceback
    for command, stream in (
        (f"{_xatl()} convert --bogus | cat", "stderr"),
        (f"{_xatl()} convert 2>&1 | cat", "stdout"),
    ):
        result = subprocess.run(command, shell=True, capture_output=True, text=True, env=env, cwd=tmp_path, timeout=60)
        lines = [line for line in getattr(result, stream).splitlines() if line.strip()]
        assert len(lines) == 1 and lines[0].startswith("error: xatl convert: "), (command, result)
        assert "Error" not in result.stdout + result.stderr and "Traceback" not in result.stdout + result.stderr


# --- 3. modes -----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", OUTPUT_KINDS)
def test_every_output_file_and_folder_has_the_mode_the_umask_gives(outputs: dict, kind: str) -> None:
    folder = outputs[kind]
    assert stat.S_IMODE(folder.stat().st_mode) == 0o755
    entries = list(folder.rglob("*"))
    assert any(entry.suffix in (".safetensors", ".bin") for entry in entries)
    modes = {str(entry.relative_to(folder)): oct(stat.S_IMODE(entry.stat().st_mode)) for entry in entries}
    expected = {name: oct(0o755 if (folder / name).is_dir() else 0o644) for name in modes}
    assert modes == expected


# --- 4. token ids in an export ------------------------------------------------------------------------------------


def test_an_export_keeps_the_sources_pad_bos_and_eos_ids(outputs: dict, tmp_path: Path) -> None:
    for kind in ("llama-xatl", "bamba", "granite"):
        folder = outputs["bamba"].parent / kind
        config = json.loads((folder / "config.json").read_text())
        assert (config["pad_token_id"], config["bos_token_id"], config["eos_token_id"]) == (0, 1, 2), kind
    # a folder converted before the mappings carried pad_token_id: the export takes it from generation_config.json
    older = shutil.copytree(outputs["bamba"].parent / "llama-xatl", tmp_path / "older")
    config = json.loads((older / "config.json").read_text())
    (older / "config.json").write_text(json.dumps({**config, "pad_token_id": None}))
    assert json.loads((older / "generation_config.json").read_text())["pad_token_id"] == 0
    assert invoke("export", older, "--format", "bamba", "--out", tmp_path / "b").exit_code == 0
    assert json.loads((tmp_path / "b" / "config.json").read_text())["pad_token_id"] == 0


# --- 5. a distilled model's card ----------------------------------------------------------------------------------


def test_a_distilled_models_card_says_how_it_was_distilled(outputs: dict) -> None:
    from xatl_convert.model_card import UNTRAINED_NOTE, render_distilled_card

    student_card = (outputs["student"] / "README.md").read_text()
    card = (outputs["distilled"] / "README.md").read_text()
    record = json.loads((outputs["distilled"] / "xatl_manifest.json").read_text())["distillation"]
    assert UNTRAINED_NOTE in student_card and "Train it before use" not in card
    assert "Then distilled by `xatl distill`" in card and card.count("## Distillation") == 1
    assert card.index("## Distillation") < card.index("## Usage")  # the usage and the mapping are kept
    assert "## Mapping" in card and "tags:" in card and "- distillation" in card.split("---")[1]
    assert "| align | 1 | 64 |" in card and "| kd | 1 | 64 |" in card  # steps and tokens (2 blocks of 32 a step)
    for key in ("start_loss", "end_loss", "teacher_loss"):
        assert f"{record[key]:.3f}" in card
    assert render_distilled_card(card, record) == card  # distilling a distilled model describes the latest run


# --- 6. eval's table and gap --------------------------------------------------------------------------------------


def test_eval_names_its_rows_and_explains_a_gap_above_100_percent(outputs: dict) -> None:
    from xatl_convert.tables import eval_gap_line, eval_table
    from xatl_convert.training.evaluate import Evaluation, HeldOutLoss

    losses = {"model": HeldOutLoss(2.0, 100), "teacher": HeldOutLoss(2.5, 100)}
    result = Evaluation(str(outputs["distilled"]), "text.txt", losses, start=4.0, teacher=str(outputs["example"]))
    console = Console(width=120, file=io.StringIO(), record=True)
    console.print(eval_table(result))
    rows = [line.split("│")[1].strip() for line in console.export_text().splitlines() if line.startswith("│")]
    assert rows == ["distilled", "example (teacher)"]
    line = eval_gap_line(result)
    assert line is not None and line.startswith("gap recovered: 133% = (start − now) / (start − teacher)")
    assert "above 100%" in line and "beat its teacher" in line
    ordinary = Evaluation("m", "d", {"model": HeldOutLoss(3.0, 1), "teacher": HeldOutLoss(2.0, 1)}, start=4.0)
    assert "above 100%" not in (eval_gap_line(ordinary) or "")
    hub = Evaluation("m", "d", losses, teacher="HuggingFaceTB/SmolLM2-135M")
    console = Console(width=120, file=io.StringIO(), record=True)
    console.print(eval_table(hub))
    assert "HuggingFaceTB/SmolLM2-135M (teacher)" in console.export_text()


def test_eval_from_the_command_line_names_the_folders(outputs: dict) -> None:
    result = invoke("eval", outputs["distilled"], "--data", outputs["text"], "--teacher", outputs["example"],
                    "--block-size", "32", "--max-blocks", "2")  # fmt: skip
    assert result.exit_code == 0, result.output
    assert "│ distilled " in result.stdout and "│ example (teacher) " in result.stdout


# --- 7. the docs' sources -----------------------------------------------------------------------------------------


def test_every_source_in_the_distillation_guide_is_an_alias_or_a_hub_id() -> None:
    from xatl_convert.sources.aliases import ALIASES, expand_alias

    text = (REPO_ROOT / "docs" / "distillation.md").read_text()
    commands = "\n".join(re.findall(r"```bash\n(.*?)```", text, flags=re.DOTALL))
    named = re.findall(r"xatl convert (\S+)", commands) + re.findall(r"--teacher (\S+)", commands)
    assert "smollm2-135m" in named
    for source in named:
        assert source in ALIASES or "/" in source, source
    assert expand_alias("smollm2-135m") == "HuggingFaceTB/SmolLM2-135M"
    for quoted in re.findall(r'from_pretrained\("([^"]+)"', text):  # transformers takes Hub ids, not our aliases
        assert quoted not in ALIASES, quoted
    listed = invoke("sources")
    assert "smollm2-135m" in listed.stdout and "HuggingFaceTB/SmolLM2-135M" in listed.stdout


# --- 8. the `wrote` line ------------------------------------------------------------------------------------------


def test_the_wrote_line_summarises_the_layers(outputs: dict, tmp_path: Path) -> None:
    from xatl_convert.tables import layer_summary

    kinds = ["mamba2"] * 30
    kinds[1] = kinds[14] = "attention"
    assert layer_summary(kinds) == "28 mamba2, 2 attention (1, 14)"
    assert layer_summary(["mamba"] * 4) == "4 mamba"
    assert layer_summary(["attention", "mamba", "mamba", "attention", "attention"]) == "3 attention, 2 mamba (1–2)"
    result = invoke("convert", EXAMPLE_CHECKPOINT, "--attn-layers", "1", "--out", tmp_path / "out")
    assert result.exit_code == 0, result.output
    assert result.stdout.rstrip().endswith("layers: 3 mamba, 1 attention (1)")
    assert outputs["one_step_stdout"].rstrip().endswith("layers: 2 mamba2, 1 attention (1)")


# --- 9. `--format` help -------------------------------------------------------------------------------------------


def test_format_help_lists_every_format_from_a_module_that_imports_nothing() -> None:
    from xatl_convert.export import FORMATS
    from xatl_convert.export_formats import EXPORT_FORMATS

    assert list(EXPORT_FORMATS) == list(FORMATS)
    for command in ("convert", "export"):
        help_text = " ".join(invoke(command, "--help").stdout.split())
        for name, loads_with in EXPORT_FORMATS.items():
            assert f"{name} ({loads_with})" in help_text, (command, name)
    source = (REPO_ROOT / "xatl_convert" / "export_formats.py").read_text()
    assert not re.search(r"^\s*(import|from) (?!__future__)", source, flags=re.MULTILINE)


# --- 10. the dry-run table on 100 columns -------------------------------------------------------------------------


def _column_names(lines: list[str], column: int) -> list[str]:
    """The names in one column of a rendered table, each put back together from its wrapped pieces; a piece that
    does not end with `.` ends its name (so a name broken mid-word comes back as two wrong names)."""
    names, current = [], ""
    for line in lines:
        piece = line.split("│")[column].strip()
        if not piece:
            continue
        current += piece
        if not piece.endswith("."):
            names.append(current)
            current = ""
    assert current == ""
    return names


@pytest.mark.parametrize("width", [100, 200])
def test_the_dry_run_table_never_breaks_a_tensor_name_mid_word(width: int, tmp_path: Path) -> None:
    from xatl_convert.conversion import plan_conversion
    from xatl_convert.tables import _fold, plan_table

    source = save_source(tmp_path / "llama", "llama-gqa-untied")
    plan = plan_conversion(source, "mamba2", None, None, None, "1", {}, None, 0)
    plan.source.close()
    console = Console(width=width, file=io.StringIO(), record=True, color_system=None)
    console.print(plan_table(plan))
    rendered = console.export_text().splitlines()
    assert max(len(line) for line in rendered) <= width
    body = [line for line in rendered if line.startswith("│")]
    targets = {_fold(tensor.name, False)[1] for tensor in plan.tensors}
    sources = {_fold(name, False)[1] for tensor in plan.tensors for name in tensor.sources}
    assert set(_column_names(body, 1)) == targets
    assert set(_column_names(body, 3)) == sources
    if width == 200:  # room enough: every name on one line
        assert all(any(name in line for line in body) for name in targets | sources)
