"""The student and its teacher, checked before a distillation loads either model.

Training a student against a teacher of another shape fails deep inside a forward pass (an IndexError, a matmul of
the wrong sizes) after minutes of loading; each mismatch here is one line that names the folder and the field.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from xatl_convert.errors import XatlError, first_line

TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "tokenizer_config.json")


class PairError(XatlError):
    """The student cannot learn from this teacher: another shape, no attention to align to, the same folder."""


def check_student(folder: Path, settings: Any, stage: str) -> dict[str, Any]:
    """The student is an xatl folder (manifest, config) with a tokenizer, and has something to train; returns its
    manifest."""
    from xatl_convert.manifest import read_manifest
    from xatl_convert.verify.checks import read_output_config

    if not folder.is_dir():
        raise PairError(f"{folder}: no such folder; give a folder written by xatl convert")
    manifest = read_manifest(folder)
    config = read_output_config(folder)
    if not any((folder / name).is_file() for name in TOKENIZER_FILES):
        raise PairError(
            f"{folder}: has no tokenizer ({', '.join(TOKENIZER_FILES)}); distill tokenises the data with the "
            "student's tokenizer: convert from a source that has one"
        )
    lci_layers = [index for index, kind in enumerate(config.layer_types) if kind != "attention"]
    if not lci_layers and settings.align_steps and stage in ("all", "align"):
        raise PairError(
            f"{folder}: every layer is attention, so align has nothing to train; pass --align-steps 0 or --stage kd"
        )
    initialised = any(entry.get("status") == "initialised" for entry in manifest["tensors"].values())
    if settings.freeze and not initialised and settings.kd_steps and stage in ("all", "kd", "ce"):
        raise PairError(
            f"{folder}: every weight was transferred, so with --freeze nothing trains until LIT; pass --no-freeze"
        )
    return {"config": config, "lci_layers": lci_layers}


def check_teacher(student_folder: Path, teacher_path: Path, student: dict[str, Any]) -> None:
    """The teacher has the student's hidden size and layer count, attention where the student has new mixers, and
    is not the student itself."""
    from transformers import AutoConfig

    if teacher_path.resolve() == student_folder.resolve():
        raise PairError(f"--teacher {teacher_path}: is the student folder; give the source it was converted from")
    try:
        config = AutoConfig.from_pretrained(teacher_path, trust_remote_code=False)
    except Exception as error:  # transformers raises ValueError, OSError, its strict-dataclass errors, KeyError
        raise PairError(f"--teacher {teacher_path}: its config.json cannot be read ({first_line(error)})") from None
    ours = student["config"]
    where = teacher_path / "config.json"
    for field, theirs in (("hidden_size", _get(config, "hidden_size")),
                          ("num_hidden_layers", _get(config, "num_hidden_layers"))):  # fmt: skip
        if theirs != getattr(ours, field):
            raise PairError(
                f"{where}: {field} is {theirs}, the student's is {getattr(ours, field)}; give the teacher the student "
                "was converted from"
            )
    kinds = getattr(config, "layer_types", None)
    if isinstance(kinds, (list, tuple)) and len(kinds) == ours.num_hidden_layers:
        missing = [index for index in student["lci_layers"] if "attention" not in str(kinds[index])]
        if missing:
            raise PairError(
                f"{where}: layers {', '.join(map(str, missing[:8]))} are {kinds[missing[0]]!r}, not attention; align "
                "trains each new mixer on its teacher layer's attention: give a Transformer teacher"
            )


def check_token_ids(blocks: Any, vocab_sizes: dict[str, int], data: str) -> None:
    """Every token id of the data fits every model's embedding (a tokenizer larger than a vocabulary fails late)."""
    highest = int(blocks.max()) if blocks.numel() else -1
    for who, size in vocab_sizes.items():
        if highest >= size:
            raise PairError(
                f"--data {data}: the student's tokenizer gives id {highest}, beyond {who}'s vocab_size {size}; "
                "give the teacher the student was converted from"
            )


def _get(config: Any, name: str) -> Any:
    try:
        return getattr(config, name)
    except AttributeError:
        return None
