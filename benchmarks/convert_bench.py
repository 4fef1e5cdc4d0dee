"""Conversion cost against the physical floor and against the naive transformers path.

Builds random GPT-NeoX checkpoints once (pythia-410m and pythia-1.4b shapes, fp32), then measures, each in its own
child process, wall time and peak RSS (from os.wait4, so per child) of:
  floor   read every source tensor with safetensors and write the same bytes as safetensors shards;
  convert `xatl convert SRC --out OUT --max-shard-size ...`;
  naive   transformers from_pretrained, state-dict surgery to the same target tensors, save_pretrained.
Every run starts with the source in the page cache (it is read once beforehand) and with earlier output flushed
to disk (sync), and each is repeated: the table shows the best time and the highest peak RSS. The parent process
never imports torch and builds checkpoints in a child too: Linux carries a parent's resident set into a forked
child's ru_maxrss, so a large parent would inflate every child's peak.

    python benchmarks/convert_bench.py                    # both shapes
    python benchmarks/convert_bench.py --shapes 410m      # one shape
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHAPES = {  # pythia configs (hidden, layers, heads, vocab)
    "410m": {"hidden_size": 1024, "num_hidden_layers": 24, "num_attention_heads": 16, "vocab_size": 50304},
    "1.4b": {"hidden_size": 2048, "num_hidden_layers": 24, "num_attention_heads": 16, "vocab_size": 50304},
}
SOURCE_SHARD_BYTES = 2 * 1024**3


def build_checkpoint(folder: Path, shape: dict[str, int]) -> None:
    """Random fp32 GPT-NeoX weights with Pythia's names and shapes, written shard by shard (no model object)."""
    import torch
    from safetensors.torch import save_file
    from transformers import GPTNeoXConfig

    hidden, layers, vocab = shape["hidden_size"], shape["num_hidden_layers"], shape["vocab_size"]
    config = GPTNeoXConfig(**shape, intermediate_size=4 * hidden, rotary_pct=0.25, max_position_embeddings=2048)
    folder.mkdir(parents=True, exist_ok=True)
    config.save_pretrained(folder)
    names: dict[str, tuple[int, ...]] = {"gpt_neox.embed_in.weight": (vocab, hidden)}
    for i in range(layers):
        prefix = f"gpt_neox.layers.{i}"
        for norm in ("input_layernorm", "post_attention_layernorm"):
            names[f"{prefix}.{norm}.weight"] = names[f"{prefix}.{norm}.bias"] = (hidden,)
        names[f"{prefix}.attention.query_key_value.weight"] = (3 * hidden, hidden)
        names[f"{prefix}.attention.query_key_value.bias"] = (3 * hidden,)
        names[f"{prefix}.attention.dense.weight"] = (hidden, hidden)
        names[f"{prefix}.attention.dense.bias"] = (hidden,)
        names[f"{prefix}.mlp.dense_h_to_4h.weight"] = (4 * hidden, hidden)
        names[f"{prefix}.mlp.dense_h_to_4h.bias"] = (4 * hidden,)
        names[f"{prefix}.mlp.dense_4h_to_h.weight"] = (hidden, 4 * hidden)
        names[f"{prefix}.mlp.dense_4h_to_h.bias"] = (hidden,)
    names["gpt_neox.final_layer_norm.weight"] = names["gpt_neox.final_layer_norm.bias"] = (hidden,)
    names["embed_out.weight"] = (vocab, hidden)
    generator = torch.Generator().manual_seed(0)
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name, tensor_shape in names.items():
        tensor = torch.randn(tensor_shape, generator=generator) * 0.02
        if shards[-1] and size + tensor.nbytes > SOURCE_SHARD_BYTES:
            shards.append({})
            size = 0
        shards[-1][name] = tensor
        size += tensor.nbytes
    weight_map = {}
    for index, shard in enumerate(shards, 1):
        file = f"model-{index:05d}-of-{len(shards):05d}.safetensors" if len(shards) > 1 else "model.safetensors"
        save_file(shard, folder / file, metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(shard, file))
    if len(shards) > 1:
        total = sum(t.nbytes for shard in shards for t in shard.values())
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (folder / "model.safetensors.index.json").write_text(json.dumps(index))


def child_floor(source: Path, out: Path, shard_bytes: int) -> None:
    """The physical floor: read every tensor through safetensors, write the same bytes as shards."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    out.mkdir(parents=True)
    shard: dict = {}
    size, count = 0, 0
    for file in sorted(source.glob("*.safetensors")):
        with safe_open(file, framework="pt") as handle:
            for name in handle.keys():  # noqa: SIM118
                tensor = handle.get_tensor(name)
                if shard and size + tensor.nbytes > shard_bytes:
                    count += 1
                    save_file(shard, out / f"shard-{count}.safetensors")
                    shard, size = {}, 0
                shard[name] = tensor
                size += tensor.nbytes
    save_file(shard, out / f"shard-{count + 1}.safetensors")


def child_naive(source: Path, out: Path, reference_config: Path) -> None:
    """What a hand-written script does: load the whole model, rename tensors, build the target, save it."""
    import torch
    from transformers import AutoModelForCausalLM

    import xatl_convert  # noqa: F401
    from xatl_convert.models import XatlConfig, XatlForCausalLM

    model = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32)
    state = model.state_dict()
    heads = model.config.num_attention_heads
    config = XatlConfig.from_pretrained(reference_config)
    target: dict[str, torch.Tensor] = {
        "model.embed_tokens.weight": state["gpt_neox.embed_in.weight"],
        "model.final_norm.weight": state["gpt_neox.final_layer_norm.weight"],
        "model.final_norm.bias": state["gpt_neox.final_layer_norm.bias"],
        "lm_head.weight": state["lm_head.weight"],
    }
    for i, kind in enumerate(config.layer_types):
        src, dst = f"gpt_neox.layers.{i}", f"model.layers.{i}"
        for ours, theirs in {
            "input_norm": "input_layernorm",
            "mlp_norm": "post_attention_layernorm",
            "mlp.fc1": "mlp.dense_h_to_4h",
            "mlp.fc2": "mlp.dense_4h_to_h",
            "mixer.out_proj": "attention.dense",
        }.items():
            for param in ("weight", "bias"):
                target[f"{dst}.{ours}.{param}"] = state[f"{src}.{theirs}.{param}"]
        if kind == "attention":
            qkv_w = state[f"{src}.attention.query_key_value.weight"]
            qkv_b = state[f"{src}.attention.query_key_value.bias"]
            w, b = qkv_w.view(heads, 3, -1, qkv_w.shape[-1]), qkv_b.view(heads, 3, -1)
            for j, part in enumerate(("q_proj", "k_proj", "v_proj")):
                target[f"{dst}.mixer.{part}.weight"] = w[:, j].reshape(-1, qkv_w.shape[-1])
                target[f"{dst}.mixer.{part}.bias"] = b[:, j].reshape(-1)
    del model
    xatl = XatlForCausalLM(config)
    _, unexpected = xatl.load_state_dict(target, strict=False)
    assert not unexpected, unexpected
    xatl.save_pretrained(out, max_shard_size="2GB")


def run_child(arguments: list[str]) -> tuple[float, float]:
    """Run one measurement in a child process; returns (wall seconds, peak RSS in GiB) of that child alone."""
    start = time.perf_counter()
    process = subprocess.Popen(arguments, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    _, status, usage = os.wait4(process.pid, 0)
    elapsed = time.perf_counter() - start
    process.returncode = os.waitstatus_to_exitcode(status)
    if process.returncode != 0:
        raise SystemExit(f"child failed ({process.returncode}): {' '.join(arguments)}")
    return elapsed, usage.ru_maxrss / 1024**2  # ru_maxrss is in KiB on Linux


def warm(folder: Path) -> None:
    for file in folder.glob("*.safetensors"):
        with file.open("rb") as handle:
            while handle.read(64 * 1024 * 1024):
                pass


def measure(name: str, source: Path, work: Path, shard_size: str, repeats: int) -> dict[str, tuple[float, float]]:
    shard_bytes = int(shard_size.rstrip("G")) * 1024**3
    results: dict[str, tuple[float, float]] = {}
    outputs = {kind: work / f"{name}-{kind}" for kind in ("floor", "convert", "naive")}
    for folder in outputs.values():
        shutil.rmtree(folder, ignore_errors=True)
    me = [sys.executable, __file__]
    runs = {
        "floor": [*me, "--child", "floor", str(source), str(outputs["floor"]), str(shard_bytes)],
        "convert": [
            sys.executable,
            "-m",
            "xatl_convert.cli",
            "convert",
            str(source),
            "--out",
            str(outputs["convert"]),
            "--max-shard-size",
            shard_size,
        ],
        "naive": [*me, "--child", "naive", str(source), str(outputs["naive"]), str(outputs["convert"])],
    }
    for kind, arguments in runs.items():
        samples = []
        for _ in range(repeats):
            shutil.rmtree(outputs[kind], ignore_errors=True)
            warm(source)
            os.sync()
            samples.append(run_child(arguments))
            print(f"  {name} {kind:8s} {samples[-1][0]:7.1f} s  {samples[-1][1]:6.2f} GiB", flush=True)
        results[kind] = (min(time for time, _ in samples), max(rss for _, rss in samples))
    for folder in outputs.values():
        shutil.rmtree(folder, ignore_errors=True)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", default="410m,1.4b")
    parser.add_argument("--work", type=Path, default=ROOT / "benchmarks" / ".work")
    parser.add_argument("--repeats", type=int, default=2, help="runs of each measurement (best time is kept)")
    parser.add_argument("--json", type=Path, help="also write the results here")
    parser.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        kind, *rest = args.child
        if kind == "floor":
            child_floor(Path(rest[0]), Path(rest[1]), int(rest[2]))
        elif kind == "build":
            build_checkpoint(Path(rest[0]), SHAPES[rest[1]])
        else:
            child_naive(Path(rest[0]), Path(rest[1]), Path(rest[2]))
        return
    args.work.mkdir(parents=True, exist_ok=True)
    table = {}
    for name in args.shapes.split(","):
        source = args.work / f"pythia-{name}-random"
        if not (source / "config.json").is_file():
            print(f"building {source} ...", flush=True)
            run_child([sys.executable, __file__, "--child", "build", str(source), name])
        # the 1.4b shape runs with 1G shards, the memory-budget case of the issue
        table[name] = measure(name, source, args.work, "1G" if name == "1.4b" else "2G", args.repeats)
    print()
    print(
        "| shape | floor s | convert s | naive s | floor GiB | convert GiB | naive GiB | convert/floor time "
        "| naive/convert time | naive/convert RSS |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for name, r in table.items():
        (ft, fm), (ct, cm), (nt, nm) = r["floor"], r["convert"], r["naive"]
        print(
            f"| {name} | {ft:.1f} | {ct:.1f} | {nt:.1f} | {fm:.2f} | {cm:.2f} | {nm:.2f} | {ct / ft:.2f} "
            f"| {nt / ct:.2f} | {nm / cm:.2f} |"
        )
    if args.json:
        args.json.write_text(json.dumps(table, indent=2))


if __name__ == "__main__":
    main()
