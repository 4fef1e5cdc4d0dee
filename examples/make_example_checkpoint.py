"""Build the tiny example source checkpoint ``examples/pythia-tiny``.

A small ``GPTNeoXForCausalLM`` (Pythia-style: parallel residual, partial rotary, untied
output embedding) with its own 4096-entry byte-level BPE tokenizer, trained from scratch on
the reStructuredText sources of the Python 3.11 documentation (PSF licence), which Debian ships
in the ``python3.11-doc`` package::

    apt-get update && apt-get install -y python3.11-doc
    python examples/make_example_checkpoint.py

The train/validation split is a deterministic function of each file's relative path
(:func:`split_corpus`), so later steps (e.g. fine-tuning converted models) can import this
module and reuse exactly the same split::

    from examples.make_example_checkpoint import split_corpus, read_documents
    train_files, val_files = split_corpus()

Importing this module has no side effects; everything runs under ``main()``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import random
import sys
import time
from collections.abc import Iterable, Sequence
from pathlib import Path

DEFAULT_CORPUS_DIR = Path("/usr/share/doc/python3.11/html/_sources")
DEFAULT_OUT = Path(__file__).resolve().parent / "pythia-tiny"
APT_HINT = "apt-get update && apt-get install -y python3.11-doc"

EOS_TOKEN = "<|endoftext|>"
VOCAB_SIZE = 4096
VAL_PERCENT = 5  # ~5% of files (by hash of relative path) go to validation
CORPUS_GLOB = "*.txt"  # Sphinx copies sources as ``<name>.rst.txt``

MODEL_KWARGS = dict(
    vocab_size=VOCAB_SIZE,
    hidden_size=128,
    num_hidden_layers=4,
    num_attention_heads=4,
    intermediate_size=512,
    max_position_embeddings=512,
    hidden_act="gelu",
    use_parallel_residual=True,
    tie_word_embeddings=False,
    layer_norm_eps=1e-5,
    initializer_range=0.02,
    attention_bias=True,
    # Pythia's ``rotary_pct=0.25``; transformers 5 stores it in ``rope_parameters``.
    rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.25},
)


# --------------------------------------------------------------------------------------------
# Corpus
# --------------------------------------------------------------------------------------------
class CorpusMissingError(FileNotFoundError):
    pass


def _check_corpus_dir(corpus_dir: Path) -> Path:
    corpus_dir = Path(corpus_dir)
    if not corpus_dir.is_dir() or not any(corpus_dir.rglob(CORPUS_GLOB)):
        raise CorpusMissingError(
            f"Corpus folder {corpus_dir} not found (or empty). It is provided by Debian's "
            f"python3.11-doc package; install it with:\n    {APT_HINT}\n"
            "or pass --corpus-dir pointing at another copy of the Python docs' _sources folder."
        )
    return corpus_dir


def is_validation_file(relpath: str, val_percent: int = VAL_PERCENT) -> bool:
    """Deterministic assignment of a corpus file (relative POSIX path) to the validation split."""
    digest = hashlib.sha256(relpath.encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") % 100 < val_percent


def split_corpus(
    corpus_dir: str | Path = DEFAULT_CORPUS_DIR, val_percent: int = VAL_PERCENT
) -> tuple[list[Path], list[Path]]:
    """Return ``(train_files, val_files)``: sorted absolute paths of the corpus text files.

    A file is in validation iff the SHA-256 of its relative POSIX path, taken mod 100, is below
    ``val_percent``. The split depends only on the relative paths, not on file order or content.
    """
    corpus_dir = _check_corpus_dir(Path(corpus_dir))
    files = sorted(p for p in corpus_dir.rglob(CORPUS_GLOB) if p.is_file())
    train, val = [], []
    for p in files:
        (val if is_validation_file(p.relative_to(corpus_dir).as_posix(), val_percent) else train).append(p)
    return train, val


def read_documents(files: Iterable[Path]) -> list[str]:
    """Read each file as one document (UTF-8, undecodable bytes replaced)."""
    return [Path(f).read_text(encoding="utf-8", errors="replace") for f in files]


# --------------------------------------------------------------------------------------------
# Tokenizer
# --------------------------------------------------------------------------------------------
def train_tokenizer(train_docs: Sequence[str], vocab_size: int = VOCAB_SIZE):
    """Byte-level BPE (GPT-2/Pythia style) trained on the training documents only."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=[EOS_TOKEN],  # id 0
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(train_docs, trainer=trainer, length=len(train_docs))
    return tok


def wrap_tokenizer(tok):
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=EOS_TOKEN,
        eos_token=EOS_TOKEN,
        unk_token=EOS_TOKEN,
        pad_token=EOS_TOKEN,
        model_max_length=MODEL_KWARGS["max_position_embeddings"],
        clean_up_tokenization_spaces=False,
    )


def encode_stream(tokenizer, docs: Sequence[str], eos_id: int):
    """Concatenate tokenized documents, each followed by ``eos``, into one 1-D LongTensor."""
    import torch

    # Use the Rust backend directly: whole documents exceed model_max_length, which is fine here.
    enc = tokenizer.backend_tokenizer.encode_batch(list(docs), add_special_tokens=False)
    ids: list[int] = []
    for doc in enc:
        ids.extend(doc.ids)
        ids.append(eos_id)
    return torch.tensor(ids, dtype=torch.long)


# --------------------------------------------------------------------------------------------
# Model / training
# --------------------------------------------------------------------------------------------
def build_config(eos_id: int):
    from transformers import GPTNeoXConfig

    return GPTNeoXConfig(**MODEL_KWARGS, bos_token_id=eos_id, eos_token_id=eos_id, pad_token_id=eos_id)


def lr_at(step: int, total: int, peak: float, warmup: int, min_ratio: float = 0.1) -> float:
    """Linear warmup then cosine decay to ``min_ratio * peak``."""
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return peak * (min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress)))


def evaluate(model, stream, seq_len: int, batch_size: int, max_batches: int | None = None) -> float:
    """Mean next-token loss over non-overlapping ``seq_len`` blocks of ``stream`` (token-weighted)."""
    import torch

    n_blocks = stream.numel() // seq_len
    blocks = stream[: n_blocks * seq_len].view(n_blocks, seq_len)
    model.eval()
    total, count = 0.0, 0
    with torch.no_grad():
        for b, start in enumerate(range(0, n_blocks, batch_size)):
            if max_batches is not None and b >= max_batches:
                break
            x = blocks[start : start + batch_size]
            loss = model(input_ids=x, labels=x).loss
            n = x.shape[0] * (seq_len - 1)
            total += loss.item() * n
            count += n
    model.train()
    return total / max(1, count)


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--corpus-dir", type=Path, default=DEFAULT_CORPUS_DIR)
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT)
    ap.add_argument("--steps", type=int, default=1800)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--warmup", type=int, default=60)
    ap.add_argument("--weight-decay", type=float, default=0.1)
    ap.add_argument("--seed", type=int, default=1234)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--log-every", type=int, default=25)
    ap.add_argument("--eval-every", type=int, default=0, help="validation every N steps (0: only at end)")
    args = ap.parse_args(argv)

    try:
        train_files, val_files = split_corpus(args.corpus_dir)
    except CorpusMissingError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2

    import numpy as np
    import torch
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer, GPTNeoXForCausalLM

    random.seed(args.seed)
    np.random.seed(args.seed)
    torch.manual_seed(args.seed)
    torch.set_num_threads(args.threads)
    t_start = time.time()

    corpus_dir = Path(args.corpus_dir)
    train_docs = read_documents(train_files)
    val_docs = read_documents(val_files)
    print(
        f"corpus: {len(train_files)} train files ({sum(map(len, train_docs)):,} chars), "
        f"{len(val_files)} validation files ({sum(map(len, val_docs)):,} chars)"
    )

    # --- tokenizer (train split only) ---
    t0 = time.time()
    tokenizer = wrap_tokenizer(train_tokenizer(train_docs))
    eos_id = tokenizer.convert_tokens_to_ids(EOS_TOKEN)
    assert eos_id == 0 and len(tokenizer) == VOCAB_SIZE, (eos_id, len(tokenizer))
    for sample in (val_docs[0][:500], "def f(x):\n    return x ** 2  # café ✓\n"):
        assert tokenizer.decode(tokenizer.encode(sample)) == sample, "tokenizer does not round-trip"
    print(f"tokenizer: vocab {len(tokenizer)}, trained in {time.time() - t0:.1f}s, round-trip ok")

    train_stream = encode_stream(tokenizer, train_docs, eos_id)
    val_stream = encode_stream(tokenizer, val_docs, eos_id)
    print(f"tokens: train {train_stream.numel():,}, validation {val_stream.numel():,}")

    # --- model ---
    config = build_config(eos_id)
    model = GPTNeoXForCausalLM(config).float()
    n_params = sum(p.numel() for p in model.parameters())
    print(f"model: GPTNeoXForCausalLM, {n_params:,} parameters")

    decay = [p for n, p in model.named_parameters() if p.ndim >= 2 and "embed" not in n]
    no_decay = [p for n, p in model.named_parameters() if not (p.ndim >= 2 and "embed" not in n)]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": args.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=args.lr,
        betas=(0.9, 0.95),
    )

    gen = torch.Generator().manual_seed(args.seed)
    max_start = train_stream.numel() - args.seq_len
    offsets = torch.arange(args.seq_len)
    init_val = evaluate(model, val_stream, args.seq_len, 32, max_batches=4)
    print(f"initial validation loss (subset) {init_val:.3f}  (ln V = {math.log(VOCAB_SIZE):.3f})")

    # --- training ---
    model.train()
    t_train = time.time()
    ema, history = None, []
    for step in range(args.steps):
        lr = lr_at(step, args.steps, args.lr, args.warmup)
        for g in opt.param_groups:
            g["lr"] = lr
        starts = torch.randint(0, max_start + 1, (args.batch_size,), generator=gen)
        x = train_stream[starts[:, None] + offsets]
        loss = model(input_ids=x, labels=x).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        li = loss.item()
        ema = li if ema is None else 0.98 * ema + 0.02 * li
        if (step + 1) % args.log_every == 0 or step == 0 or step + 1 == args.steps:
            el = time.time() - t_train
            eta = el / (step + 1) * (args.steps - step - 1)
            print(
                f"step {step + 1:5d}/{args.steps}  loss {li:.3f}  ema {ema:.3f}  lr {lr:.2e}  "
                f"{el:6.0f}s elapsed, eta {eta:4.0f}s",
                flush=True,
            )
            history.append({"step": step + 1, "loss": round(li, 4), "ema_loss": round(ema, 4)})
        if args.eval_every and (step + 1) % args.eval_every == 0 and step + 1 != args.steps:
            v = evaluate(model, val_stream, args.seq_len, 32, max_batches=8)
            print(f"  validation loss (subset) {v:.3f}", flush=True)
    train_time = time.time() - t_train

    # --- final evaluation: full validation split, and a same-size sample of train for reference ---
    t0 = time.time()
    val_loss = evaluate(model, val_stream, args.seq_len, 32)
    train_eval = evaluate(model, train_stream[: val_stream.numel()], args.seq_len, 32)
    print(
        f"final: train loss (ema) {ema:.3f}, train loss (eval, {val_stream.numel():,} tokens) "
        f"{train_eval:.3f}, validation loss {val_loss:.3f} (ppl {math.exp(val_loss):.1f}) "
        f"[eval {time.time() - t0:.0f}s]"
    )

    # --- save ---
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    model.generation_config.bos_token_id = eos_id
    model.generation_config.eos_token_id = eos_id
    model.generation_config.pad_token_id = eos_id
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)

    info = {
        "description": "Tiny Pythia-style GPTNeoXForCausalLM example checkpoint for xatl_convert",
        "corpus": {
            "source": "Debian package python3.11-doc (reStructuredText sources of the Python 3.11 docs)",
            "licence": "PSF License Agreement (Python Software Foundation)",
            "corpus_dir": str(corpus_dir),
            "glob": f"**/{CORPUS_GLOB}",
            "split_rule": f"validation iff int(sha256(relpath)[:8 bytes], big-endian) % 100 < {VAL_PERCENT}",
            "num_train_files": len(train_files),
            "num_val_files": len(val_files),
            "train_chars": sum(map(len, train_docs)),
            "val_chars": sum(map(len, val_docs)),
            "train_bytes": sum(f.stat().st_size for f in train_files),
            "val_bytes": sum(f.stat().st_size for f in val_files),
            "train_tokens": int(train_stream.numel()),
            "val_tokens": int(val_stream.numel()),
            "val_files": [f.relative_to(corpus_dir).as_posix() for f in val_files],
        },
        "tokenizer": {
            "type": "byte-level BPE (tokenizers), trained on the train split only",
            "vocab_size": len(tokenizer),
            "special_tokens": {"bos/eos/unk/pad": EOS_TOKEN, "id": eos_id},
        },
        "model": {"class": "GPTNeoXForCausalLM", "num_parameters": n_params, "dtype": "float32"},
        "training": {
            "steps": args.steps,
            "batch_size": args.batch_size,
            "seq_len": args.seq_len,
            "tokens_seen": args.steps * args.batch_size * args.seq_len,
            "lr": args.lr,
            "schedule": f"linear warmup {args.warmup} steps, cosine decay to 0.1*lr",
            "optimizer": f"AdamW(betas=(0.9, 0.95), weight_decay={args.weight_decay}), grad clip 1.0",
            "seed": args.seed,
            "threads": args.threads,
            "initial_val_loss_subset": round(init_val, 4),
            "final_train_loss_ema": round(ema, 4),
            "final_train_loss_last_step": round(li, 4),
            "final_train_loss_eval": round(train_eval, 4),
            "val_loss": round(val_loss, 4),
            "val_perplexity": round(math.exp(val_loss), 2),
            "train_wall_time_s": round(train_time, 1),
            "total_wall_time_s": round(time.time() - t_start, 1),
            "loss_history": history,
        },
        "versions": {
            "python": sys.version.split()[0],
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "tokenizers": __import__("tokenizers").__version__,
        },
    }
    (out / "training_info.json").write_text(json.dumps(info, indent=2) + "\n")

    # --- verify reload + greedy generation ---
    tok2 = AutoTokenizer.from_pretrained(out)
    model2 = AutoModelForCausalLM.from_pretrained(out).eval()
    prompt = "The Python interpreter"
    ids = tok2(prompt, return_tensors="pt").input_ids
    with torch.no_grad():
        gen_ids = model2.generate(ids, max_new_tokens=40, do_sample=False, pad_token_id=eos_id)
        re_val = evaluate(model2, val_stream, args.seq_len, 32, max_batches=2)
        ref_val = evaluate(model, val_stream, args.seq_len, 32, max_batches=2)
    assert abs(re_val - ref_val) < 1e-4, (re_val, ref_val)
    print(f"reloaded from {out} OK; greedy sample:\n  {tok2.decode(gen_ids[0])!r}")
    size = sum(f.stat().st_size for f in out.iterdir() if f.is_file())
    print(f"checkpoint files: {sorted(f.name for f in out.iterdir())}, {size / 1e6:.2f} MB total")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
