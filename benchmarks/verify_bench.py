"""Peak memory and time of the streaming `xatl verify` on pythia-1.4b (fp16 GPT-NeoX) and 7B (bf16 Llama) shapes.

`xatl verify` loads one decoder block at a time, so its peak memory should be about one block plus embeddings plus
head (the "unit"), whatever the model size. Random checkpoints are built once, shard by shard, under
benchmarks/.work/verify_bench/<shape>/ and converted to Mamba; then, each in its own child process (wall time and
peak RSS from os.wait4, so per child; the parent never imports torch, since Linux carries a parent's resident set
into a forked child's ru_maxrss), we time `xatl verify` and one plain transformers forward over the same 256 tokens.
Targets: verify peak RSS ≤ 3 × unit, verify time ≤ 5 × the baseline forward, and ≤ 6 GB peak RSS on the 7B shape.
Sizes are in GB (10^9 bytes). The 7B shape needs ~30 GB of free disk; `quick` is a tiny smoke test.

    python benchmarks/verify_bench.py                       # 1.4b and 7b (many minutes)
    python benchmarks/verify_bench.py --shapes quick        # under a minute
    python benchmarks/verify_bench.py --shapes 7b --reconvert
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import struct
import subprocess
import sys
import time
import zlib
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
WORK = ROOT / "benchmarks" / ".work" / "verify_bench"
RESULTS = ROOT / "benchmarks" / "results" / "verify_bench.json"
GB = 1e9
SHARD_BYTES = 2 * 1024**3
SAMPLE_TOKENS = 256  # what verify scores when the folder has no tokenizer
OUTPUT_OVER_SOURCE = 1.3  # a Mamba output is ~1.22 × a Llama source (16.5 GB for 13.5 GB); a margin on top

SHAPES: dict[str, dict[str, Any]] = {
    "quick": {
        "model_type": "llama",
        "dtype": "bfloat16",
        "hidden_size": 256,
        "num_hidden_layers": 4,
        "intermediate_size": 512,
        "num_attention_heads": 4,
        "num_key_value_heads": 4,
        "vocab_size": 1000,
        "max_position_embeddings": 2048,
    },
    "quick-neox": {  # smoke test of the GPT-NeoX path that the 1.4b shape takes
        "model_type": "gpt_neox",
        "dtype": "float16",
        "hidden_size": 256,
        "num_hidden_layers": 4,
        "intermediate_size": 1024,
        "num_attention_heads": 4,
        "vocab_size": 1000,
        "max_position_embeddings": 2048,
        "rotary_pct": 0.25,
        "use_parallel_residual": True,
    },
    "1.4b": {  # pythia-1.4b
        "model_type": "gpt_neox",
        "dtype": "float16",
        "hidden_size": 2048,
        "num_hidden_layers": 24,
        "intermediate_size": 8192,
        "num_attention_heads": 16,
        "vocab_size": 50304,
        "max_position_embeddings": 2048,
        "rotary_pct": 0.25,
        "use_parallel_residual": True,
    },
    "7b": {  # Llama-2-7B
        "model_type": "llama",
        "dtype": "bfloat16",
        "hidden_size": 4096,
        "num_hidden_layers": 32,
        "intermediate_size": 11008,
        "num_attention_heads": 32,
        "num_key_value_heads": 32,
        "vocab_size": 32000,
        "max_position_embeddings": 4096,
    },
}
DEFAULT_SHAPES = ["1.4b", "7b"]
LAYER = re.compile(r"(?:^|\.)layers\.(\d+)\.")
DTYPE_BYTES = {"float16": 2, "bfloat16": 2, "float32": 4}


# ---------------------------------------------------------------- children (these import torch)


def _config(shape: dict[str, Any]) -> Any:
    from transformers import GPTNeoXConfig, LlamaConfig

    settings = {key: value for key, value in shape.items() if key != "model_type"}
    config_class = GPTNeoXConfig if shape["model_type"] == "gpt_neox" else LlamaConfig
    return config_class(**settings, tie_word_embeddings=False)


def _checkpoint_name(name: str, model_type: str) -> str:
    """transformers 5 calls GPT-NeoX's head lm_head; checkpoints (and xatl's mapping) call it embed_out."""
    return "embed_out.weight" if model_type == "gpt_neox" and name == "lm_head.weight" else name


def _random_tensor(name: str, shape: tuple[int, ...], dtype: Any) -> Any:
    """std-0.02 normal weights, ones for norm weights, zeros for norm biases; seeded by name, drawn in fp32."""
    import torch

    if "norm" in name:
        return (torch.ones if name.endswith(".weight") else torch.zeros)(shape, dtype=dtype)
    generator = torch.Generator().manual_seed(zlib.crc32(name.encode()))
    return (torch.randn(shape, generator=generator) * 0.02).to(dtype)


def _plan_shards(tensors: dict[str, tuple[tuple[int, ...], int]]) -> list[list[str]]:
    """Names grouped by layer (a layer never straddles two shards), packed greedily into ~SHARD_BYTES shards."""
    groups: dict[str, list[str]] = {}
    for name in tensors:
        match = LAYER.search(name)
        groups.setdefault(match.group(0) if match else name, []).append(name)
    shards: list[list[str]] = [[]]
    size = 0
    for names in groups.values():
        group_bytes = sum(tensors[name][1] for name in names)
        if shards[-1] and size + group_bytes > SHARD_BYTES:
            shards.append([])
            size = 0
        shards[-1].extend(names)
        size += group_bytes
    return shards


def child_build(folder: Path, shape_name: str) -> None:
    """Random weights with transformers' names and shapes, written shard by shard without a model object."""
    import torch
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM

    shape = SHAPES[shape_name]
    config = _config(shape)
    dtype = getattr(torch, shape["dtype"])
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    tensors = {
        _checkpoint_name(name, shape["model_type"]): (tuple(t.shape), t.numel() * dtype.itemsize)
        for name, t in model.state_dict().items()
    }
    del model
    folder.mkdir(parents=True, exist_ok=True)
    shards = _plan_shards(tensors)
    weight_map: dict[str, str] = {}
    for index, names in enumerate(shards, 1):
        file = f"model-{index:05d}-of-{len(shards):05d}.safetensors"
        shard = {name: _random_tensor(name, tensors[name][0], dtype) for name in names}
        save_file(shard, folder / file, metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(names, file))
        del shard
    index_json = {"metadata": {"total_size": sum(b for _, b in tensors.values())}, "weight_map": weight_map}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index_json, indent=2))
    config.save_pretrained(folder)  # last: config.json marks a complete checkpoint


def child_baseline(source: Path, dtype_name: str) -> None:
    """Load the source with transformers and time one plain forward over verify's tokens; JSON on the last line."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(source)
    length = min(SAMPLE_TOKENS, config.max_position_embeddings)
    input_ids = torch.randint(0, config.vocab_size, (1, length), generator=torch.Generator().manual_seed(0))
    start = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(source, dtype=getattr(torch, dtype_name))
    model.eval()
    load_s = time.perf_counter() - start
    with torch.no_grad():
        start = time.perf_counter()
        logits = model(input_ids).logits
        forward_s = time.perf_counter() - start
    finite = bool(torch.isfinite(logits).all())
    print(json.dumps({"load_s": load_s, "forward_s": forward_s, "tokens": length, "finite": finite}))


def child_streamed(source: Path) -> None:
    """One forward of the source in float32, streamed block by block as verify runs each of its models (the
    arithmetic verify pays per pass, where a plain float32 model would not fit in memory); JSON on the last line."""
    import torch

    from xatl_convert.sources import resolve_source
    from xatl_convert.verify.streaming import StreamedModel, return_freed_blocks_to_the_os
    from xatl_convert.verify.twin import source_skeleton

    return_freed_blocks_to_the_os()
    checkpoint = resolve_source(source)
    model, layers, reader = source_skeleton(checkpoint, torch.float32)
    vocab = checkpoint.config["vocab_size"]
    length = min(SAMPLE_TOKENS, checkpoint.config.get("max_position_embeddings", SAMPLE_TOKENS))
    input_ids = torch.randint(0, vocab, (1, length), generator=torch.Generator().manual_seed(0))
    stream = StreamedModel(model, reader, layers)
    start = time.perf_counter()
    logits = stream.forward(input_ids)
    forward_s = time.perf_counter() - start
    assert logits is not None
    print(json.dumps({"forward_s": forward_s, "finite": bool(torch.isfinite(logits).all())}))


# ---------------------------------------------------------------- parent (no torch)


def run_child(arguments: list[str], log: Path, ok_codes: tuple[int, ...] = (0,)) -> tuple[int, float, float]:
    """Run a child with stdout+stderr to `log`; returns (exit code, wall seconds, peak RSS in GB) of that child."""
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("w") as handle:
        start = time.perf_counter()
        process = subprocess.Popen(arguments, cwd=ROOT, stdout=handle, stderr=subprocess.STDOUT)
        _, status, usage = os.wait4(process.pid, 0)
        elapsed = time.perf_counter() - start
    process.returncode = code = os.waitstatus_to_exitcode(status)
    if code not in ok_codes:
        tail = "\n".join(log.read_text(errors="replace").splitlines()[-30:])
        raise SystemExit(f"child failed ({code}): {' '.join(arguments)}\n--- {log} (tail) ---\n{tail}")
    return code, elapsed, usage.ru_maxrss * 1024 / GB  # ru_maxrss is in KiB on Linux


def safetensors_sizes(folder: Path) -> dict[str, int]:
    """Bytes of every tensor in the folder's .safetensors files, read from the headers alone."""
    sizes: dict[str, int] = {}
    for file in sorted(folder.glob("*.safetensors")):
        with file.open("rb") as handle:
            (length,) = struct.unpack("<Q", handle.read(8))
            header = json.loads(handle.read(length))
        for name, entry in header.items():
            if name != "__metadata__":
                start, end = entry["data_offsets"]
                sizes[name] = end - start
    return sizes


def largest_block(sizes: dict[str, int]) -> int:
    blocks: dict[str, int] = {}
    for name, size in sizes.items():
        match = LAYER.search(name)
        if match:
            blocks[match.group(1)] = blocks.get(match.group(1), 0) + size
    return max(blocks.values(), default=0)


def checkpoint_complete(folder: Path) -> bool:
    index = folder / "model.safetensors.index.json"
    if not (folder / "config.json").is_file() or not index.is_file():
        return False
    files = set(json.loads(index.read_text())["weight_map"].values())
    return all((folder / file).is_file() for file in files)


def estimated_source_bytes(shape: dict[str, Any]) -> int:
    """Parameter bytes from the shape alone (no torch), for the disk-space check."""
    h, n, i, v = (shape[k] for k in ("hidden_size", "num_hidden_layers", "intermediate_size", "vocab_size"))
    if shape["model_type"] == "gpt_neox":
        block = 4 * h * h + 2 * h * i + 9 * h + i
    else:
        kv = h * shape["num_key_value_heads"] // shape["num_attention_heads"]
        block = 2 * h * h + 2 * h * kv + 3 * h * i + 2 * h
    return (2 * v * h + n * block + 2 * h) * DTYPE_BYTES[shape["dtype"]]


def check_disk(name: str, source: Path, output: Path, reconvert: bool) -> None:
    estimate = estimated_source_bytes(SHAPES[name])
    need = 1 * GB  # margin for reports and logs
    if not checkpoint_complete(source):
        need += estimate
    if reconvert or not (output / "xatl_manifest.json").is_file():
        need += OUTPUT_OVER_SOURCE * estimate  # --force keeps the old output until the new one is complete
    WORK.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(WORK).free
    if free < need:
        raise SystemExit(
            f"{name}: not enough disk space under {WORK}: {free / GB:.1f} GB free, {need / GB:.1f} GB needed "
            f"(source ~{estimate / GB:.1f} GB, Mamba output ~{OUTPUT_OVER_SOURCE * estimate / GB:.1f} GB); "
            "free some space or delete old shapes there"
        )


def xatl(*arguments: str) -> list[str]:
    return [sys.executable, "-m", "xatl_convert.cli", *arguments]


def measure_floor() -> float:
    """Peak RSS of a child that only imports torch, transformers and the xatl CLI: the interpreter's floor."""
    code = "import torch, transformers, xatl_convert.cli"
    return run_child([sys.executable, "-c", code], WORK / "import-floor.log")[2]


def measure_shape(name: str, reconvert: bool) -> dict[str, Any]:
    shape = SHAPES[name]
    folder = WORK / name
    source, output, report_path = folder / "source", folder / "mamba", folder / "verify.json"
    check_disk(name, source, output, reconvert)
    result: dict[str, Any] = {"shape": shape}
    if checkpoint_complete(source):
        print(f"{name}: reusing {source}", flush=True)
    else:
        print(f"{name}: building {source} ...", flush=True)
        shutil.rmtree(source, ignore_errors=True)
        arguments = [sys.executable, __file__, "--child", "build", str(source), name]
        result["build_s"] = run_child(arguments, folder / "build.log")[1]
    if reconvert or not (output / "xatl_manifest.json").is_file():
        print(f"{name}: converting ...", flush=True)
        arguments = xatl("convert", str(source), "--out", str(output), "--to", "mamba", "--force")
        _, result["convert_s"], result["convert_rss_gb"] = run_child(arguments, folder / "convert.log")
    else:
        print(f"{name}: reusing {output} (--reconvert to convert again)", flush=True)
    result.update(sizes(source, output))
    print(f"{name}: verify ...", flush=True)
    report_path.unlink(missing_ok=True)
    arguments = xatl("verify", str(output), "--json", str(report_path))
    code, result["verify_s"], result["verify_rss_gb"] = run_child(arguments, folder / "verify.log", (0, 1))
    result["verify_exit"] = code
    result["checks"] = read_checks(report_path)
    print(f"{name}: baseline forward ...", flush=True)
    arguments = [sys.executable, __file__, "--child", "baseline", str(source), shape["dtype"]]
    log = folder / "baseline.log"
    _, _, result["baseline_rss_gb"] = run_child(arguments, log)
    baseline = json.loads(log.read_text().strip().splitlines()[-1])
    result["baseline_load_s"], result["baseline_forward_s"] = baseline["load_s"], baseline["forward_s"]
    result["baseline_finite"] = baseline["finite"]
    if result["source_gb"] * 4 / DTYPE_BYTES[shape["dtype"]] < 0.6 * _memory_gb():
        print(f"{name}: baseline forward in float32 ...", flush=True)
        arguments = [sys.executable, __file__, "--child", "baseline", str(source), "float32"]
        log = folder / "baseline_fp32.log"
        run_child(arguments, log)
        result["fp32_forward_s"] = json.loads(log.read_text().strip().splitlines()[-1])["forward_s"]
    print(f"{name}: streamed float32 forward ...", flush=True)
    log = folder / "streamed.log"
    _, _, result["streamed_rss_gb"] = run_child([sys.executable, __file__, "--child", "streamed", str(source)], log)
    result["streamed_forward_s"] = json.loads(log.read_text().strip().splitlines()[-1])["forward_s"]
    result["rss_over_unit"] = result["verify_rss_gb"] / result["unit_gb"]
    result["time_over_forward"] = result["verify_s"] / result["baseline_forward_s"]
    result["time_over_streamed"] = result["verify_s"] / result["streamed_forward_s"]
    return result


def _memory_gb() -> float:
    """Physical memory, from /proc/meminfo (Linux; 0 elsewhere, which skips the float32 baseline)."""
    try:
        text = Path("/proc/meminfo").read_text()
    except OSError:
        return 0.0
    match = re.search(r"MemTotal:\s+(\d+) kB", text)
    return int(match.group(1)) * 1024 / GB if match else 0.0


def sizes(source: Path, output: Path) -> dict[str, float]:
    source_sizes, output_sizes = safetensors_sizes(source), safetensors_sizes(output)
    embeddings = output_sizes["model.embed_tokens.weight"]
    head = output_sizes.get("lm_head.weight", embeddings)  # tied: the embedding serves twice
    block = max(largest_block(source_sizes), largest_block(output_sizes))
    return {
        "source_gb": sum(source_sizes.values()) / GB,
        "output_gb": sum(output_sizes.values()) / GB,
        "source_block_gb": largest_block(source_sizes) / GB,
        "output_block_gb": largest_block(output_sizes) / GB,
        "embeddings_head_gb": (embeddings + head) / GB,
        "unit_gb": (block + embeddings + head) / GB,
    }


def read_checks(report_path: Path) -> list[dict[str, Any]]:
    if not report_path.is_file():
        return []
    return json.loads(report_path.read_text())["checks"]


def checks_summary(checks: list[dict[str, Any]]) -> str:
    counts: dict[str, int] = {}
    for check in checks:
        counts[check["status"]] = counts.get(check["status"], 0) + 1
    return ", ".join(f"{count} {status}" for status, count in sorted(counts.items())) or "no report"


def mark(value: float, target: float) -> str:
    return f"{'PASS' if value <= target else 'MISS'} (≤ {target:g})"


def table_rows(result: dict[str, Any], name: str) -> list[tuple[str, str]]:
    r = result
    rows = [
        ("source size GB", f"{r['source_gb']:.2f}"),
        ("output size GB", f"{r['output_gb']:.2f}"),
        ("largest block GB (source / output)", f"{r['source_block_gb']:.3f} / {r['output_block_gb']:.3f}"),
        ("embeddings+head GB", f"{r['embeddings_head_gb']:.3f}"),
        ("unit GB (block+emb+head)", f"{r['unit_gb']:.3f}"),
        ("verify peak RSS GB", f"{r['verify_rss_gb']:.2f}"),
        ("peak RSS / unit", f"{r['rss_over_unit']:.2f}  {mark(r['rss_over_unit'], 3)}"),
        ("verify time s", f"{r['verify_s']:.1f}"),
        ("baseline forward s", f"{r['baseline_forward_s']:.2f}"),
        ("verify time / forward", f"{r['time_over_forward']:.1f}  {mark(r['time_over_forward'], 5)}"),
        ("plain float32 forward s", f"{r['fp32_forward_s']:.2f}" if "fp32_forward_s" in r else "does not fit"),
        ("streamed float32 forward s", f"{r['streamed_forward_s']:.2f}"),
        ("verify time / streamed fp32 forward", f"{r['time_over_streamed']:.1f}  {mark(r['time_over_streamed'], 5)}"),
        ("baseline load s / RSS GB", f"{r['baseline_load_s']:.1f} / {r['baseline_rss_gb']:.2f}"),
        ("convert s / RSS GB", f"{r['convert_s']:.1f} / {r['convert_rss_gb']:.2f}" if "convert_s" in r else "reused"),
        ("verify checks", f"{checks_summary(r['checks'])} (exit {r['verify_exit']})"),
    ]
    if name == "7b":
        rows.insert(6, ("7B absolute", mark(r["verify_rss_gb"], 6) + " GB"))
    return rows


def print_table(results: dict[str, dict[str, Any]], floor_gb: float) -> None:
    columns = {name: dict(table_rows(result, name)) for name, result in results.items()}
    labels = list(dict.fromkeys(label for column in columns.values() for label in column))
    label_width = max(len(label) for label in labels)
    widths = {name: max(len(name), *(len(v) for v in column.values())) for name, column in columns.items()}
    print()
    print("  ".join([" " * label_width, *(name.ljust(widths[name]) for name in columns)]).rstrip())
    for label in labels:
        cells = (columns[name].get(label, "").ljust(widths[name]) for name in columns)
        print("  ".join([label.ljust(label_width), *cells]).rstrip())
    print(f"\nimport floor (python + torch + transformers + xatl_convert): {floor_gb:.2f} GB peak RSS")
    if any(r["unit_gb"] < floor_gb for r in results.values()):
        print("note: a unit below the import floor makes peak RSS / unit meaningless (smoke-test shapes)")


def print_failures(name: str, result: dict[str, Any]) -> None:
    for check in result["checks"]:
        if check["status"] == "fail":
            print(f"{name}: FAILED {check['name']}: {check['value']} (bound {check['bound']})")
            print(json.dumps(check.get("details", {}), indent=2, default=str))
    if result["verify_exit"] != 0 and not result["checks"]:
        print(f"{name}: verify exited {result['verify_exit']} without a report; see {WORK / name / 'verify.log'}")


def write_results(results: dict[str, dict[str, Any]], floor_gb: float) -> None:
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    saved = json.loads(RESULTS.read_text()) if RESULTS.is_file() else {}
    shapes = saved.get("shapes", {})
    stamp = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    for name, result in results.items():
        previous = shapes.get(name, {})
        kept = {key: previous[key] for key in ("convert_s", "convert_rss_gb") if key in previous}
        if "convert_s" not in result and kept:  # the output was reused: keep the run that converted it
            result = {**result, **kept, "convert_reused": True}
        shapes[name] = {**result, "measured": stamp, "import_floor_gb": floor_gb}
    machine = {"platform": platform.platform(), "cpus": os.cpu_count(), "python": platform.python_version()}
    RESULTS.write_text(json.dumps({"machine": machine, "shapes": shapes}, indent=2) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", nargs="+", choices=list(SHAPES), default=DEFAULT_SHAPES)
    parser.add_argument("--reconvert", action="store_true", help="convert again even if the output exists")
    parser.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        kind, *rest = args.child
        if kind == "build":
            child_build(Path(rest[0]), rest[1])
        elif kind == "streamed":
            child_streamed(Path(rest[0]))
        else:
            child_baseline(Path(rest[0]), rest[1])
        return
    WORK.mkdir(parents=True, exist_ok=True)
    floor_gb = measure_floor()
    results = {}
    for name in args.shapes:
        results[name] = measure_shape(name, args.reconvert)
        print_failures(name, results[name])
    print_table(results, floor_gb)
    write_results(results, floor_gb)
    print(f"\nwrote {RESULTS.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
