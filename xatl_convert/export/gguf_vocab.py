"""The tokenizer inside a GGUF: llama.cpp's byte-level BPE model ("gpt2"): tokens and their types, merges, the
pre-tokenizer's name, special token ids, add_bos/add_eos and the chat template, read from the xatl folder's own
tokenizer files (gguf-py's `SpecialVocab` reads merges, special ids and templates, as llama.cpp's converter does).

llama.cpp's converter names the pre-tokenizer from a hash of the tokenizer's output on a test text; here it is named
from what the folder's tokenizer.json says it does (its `pre_tokenizer`), among the ones whose split llama.cpp
reproduces: a folder whose pre-tokenizer is none of them is refused with that reason, since llama.cpp would split text
another way. A folder without tokenizer.json is refused too: llama.cpp reads its vocabulary from the .gguf alone.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

# tokenizer.json's pre_tokenizer, as a signature, → llama.cpp's tokenizer.ggml.pre (src/llama-vocab.cpp)
_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2_SPLIT = _LLAMA3_SPLIT.replace(r"\p{N}{1,3}", r"\p{N}")
PRE_TOKENIZERS: dict[tuple[tuple[Any, ...], ...], str] = {
    (("ByteLevel", True),): "gpt-2",  # GPT-2's regex
    (("Digits", True), ("ByteLevel", True)): "smollm",  # digits one by one, then GPT-2's regex (SmolLM, StarCoder)
    (("Split", _LLAMA3_SPLIT, "Isolated"), ("ByteLevel", False)): "llama-bpe",  # Llama 3
    (("Split", _QWEN2_SPLIT, "Isolated"), ("ByteLevel", False)): "qwen2",  # Qwen2, Qwen2.5, Qwen3
}
NORMAL, USER_DEFINED, CONTROL, UNUSED = 1, 4, 3, 5  # gguf.TokenType


def tokenizer_refusals(folder: Path, vocab_size: int) -> list[str]:
    """Every reason the folder's tokenizer cannot be written as llama.cpp's byte-level BPE, or []."""
    data = _read_tokenizer(folder)
    if data is None:
        return ["it has no tokenizer.json; llama.cpp reads the vocabulary from the .gguf itself"]
    model = data.get("model") or {}
    if model.get("type") != "BPE" or model.get("byte_fallback"):
        return [f"its tokenizer is {model.get('type')!r}{' with byte fallback' if model.get('byte_fallback') else ''};"
                " the GGUF writer holds byte-level BPE (llama.cpp's gpt2 model) only"]  # fmt: skip
    signature = pre_tokenizer_signature(data.get("pre_tokenizer"))
    if signature not in PRE_TOKENIZERS:
        return [f"its pre-tokenizer {json.dumps(data.get('pre_tokenizer'))[:120]} is none llama.cpp is told here "
                f"({', '.join(PRE_TOKENIZERS.values())})"]  # fmt: skip
    ids = [*model.get("vocab", {}).values(), *(entry.get("id", -1) for entry in data.get("added_tokens", []))]
    if ids and max(ids) >= vocab_size:
        return [f"its tokenizer has token id {max(ids)}, beyond the embedding's {vocab_size} rows"]
    return []


def pre_tokenizer_signature(pre: Any) -> tuple[tuple[Any, ...], ...] | None:
    """What a pre_tokenizer does, as a tuple of steps, without the options that do not change the split."""
    steps = pre.get("pretokenizers", []) if isinstance(pre, dict) and pre.get("type") == "Sequence" else [pre]
    signature: list[tuple[Any, ...]] = []
    for step in steps:
        if not isinstance(step, dict):
            return None
        kind = step.get("type")
        if kind == "ByteLevel" and not step.get("add_prefix_space", False):
            signature.append(("ByteLevel", bool(step.get("use_regex", True))))
        elif kind == "Digits":
            signature.append(("Digits", bool(step.get("individual_digits", False))))
        elif kind == "Split" and not step.get("invert", False):
            pattern = step.get("pattern") or {}
            signature.append(("Split", pattern.get("Regex", pattern.get("String")), step.get("behavior")))
        else:
            return None
    return tuple(signature)


def _read_tokenizer(folder: Path) -> dict[str, Any] | None:
    try:
        data = json.loads((folder / "tokenizer.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def add_tokenizer(writer: Any, folder: Path, vocab_size: int) -> str:
    """Write the tokenizer keys for a folder that `tokenizer_refusals` accepts; returns the pre-tokenizer's name.

    Tokens are listed for every id below the embedding's vocab_size, as llama.cpp's converter lists them: an id the
    tokenizer lacks is `[PAD{id}]` (unused), an added special token is a control token, another added token is
    user-defined.
    """
    import gguf

    data = _read_tokenizer(folder)
    assert data is not None
    pre = PRE_TOKENIZERS[pre_tokenizer_signature(data.get("pre_tokenizer"))]  # type: ignore[index]
    by_id = {index: token for token, index in data["model"]["vocab"].items()}
    added = {entry["id"]: entry for entry in data.get("added_tokens", [])}
    tokens, types = [], []
    for index in range(vocab_size):
        if index in added:
            tokens.append(added[index]["content"])
            types.append(CONTROL if added[index].get("special") else USER_DEFINED)
        elif index in by_id:
            tokens.append(by_id[index])
            types.append(NORMAL)
        else:
            tokens.append(f"[PAD{index}]")
            types.append(UNUSED)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre)
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    special = gguf.SpecialVocab(folder, load_merges=True, n_vocab=vocab_size)
    for kind in ("bos", "eos"):  # said either way: llama.cpp's default depends on the pre-tokenizer (llama-bpe: bos)
        special.add_special_token.setdefault(kind, False)
    special.add_to_gguf(writer, quiet=True)
    return pre
