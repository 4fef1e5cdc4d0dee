"""`xatl distill` under `accelerate launch`: two CPU processes sharing the global batch train the same model as one
process, through align (gradients averaged over processes) and kd (the HF Trainer's DDP) with a LIT unfreeze."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.conftest import EXAMPLE_CHECKPOINT
from xatl_convert.conversion import convert

pytest.importorskip("datasets")
pytest.importorskip("accelerate")

ROOT = Path(__file__).resolve().parents[1]

# LIT as in test_distill_resume: a trigger that always finds the loss flat unfreezes after kd step 2, so the
# unfrozen weights' gradients must be averaged over the processes too (DDP does not know them).
LAUNCHER = """
import sys
from xatl_convert.training import distill
from xatl_convert.training.lit import LossImprovementThreshold
distill.LossImprovementThreshold.preset = classmethod(
    lambda cls, name, window=50: LossImprovementThreshold(window=1, threshold=10.0))
from xatl_convert.cli import main
sys.argv[0] = "xatl"
main()
"""


def _rows(path: Path) -> list[dict[str, str]]:
    with path.open() as handle:
        return list(csv.DictReader(handle))


def test_two_processes_train_as_one_with_the_same_global_batch(tmp_path: Path) -> None:
    student = tmp_path / "student"
    convert(EXAMPLE_CHECKPOINT, student, attn_layers="1")
    (tmp_path / "text.txt").write_text((ROOT / "README.md").read_text())
    launcher = tmp_path / "launch_xatl.py"
    launcher.write_text(LAUNCHER)
    arguments = ["distill", str(student), "--teacher", str(EXAMPLE_CHECKPOINT), "--data", str(tmp_path / "text.txt"),
                 "--align-steps", "3", "--kd-steps", "8", "--block-size", "32", "--batch-size", "4"]  # fmt: skip
    environment = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    one, two = tmp_path / "one", tmp_path / "two"
    single = subprocess.run([sys.executable, str(launcher), *arguments, "--out", str(one)],
                            env=environment, capture_output=True, text=True, timeout=600)  # fmt: skip
    assert single.returncode == 0, single.stderr
    # accelerate's `--cpu` starts a single process unless MPI is installed; `--multi_gpu` starts the processes with
    # torchrun, and without CUDA they join a gloo group on the CPU.
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
              "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"]  # fmt: skip
    double = subprocess.run([*launch, str(launcher), *arguments, "--out", str(two)],
                            env=environment, capture_output=True, text=True, timeout=600)  # fmt: skip
    assert double.returncode == 0, double.stderr[-3000:]
    assert double.stdout.count("wrote ") == 1  # the main process writes and says so; the other stays quiet

    for name, key in (("distill_align.csv", "mean"), ("distill_kd.csv", "loss")):
        mine, theirs = _rows(two / name), _rows(one / name)
        assert len(mine) == len(theirs) > 0
        for a, b in zip(mine, theirs, strict=True):
            assert float(a[key]) == pytest.approx(float(b[key]), rel=1e-4), (name, a["step"])
    records = [json.loads((folder / "xatl_manifest.json").read_text())["distillation"] for folder in (one, two)]
    assert records[0]["stages"][1]["lit_unfrozen_at"] == records[1]["stages"][1]["lit_unfrozen_at"] == 2
    assert records[1]["end_loss"] == pytest.approx(records[0]["end_loss"], rel=1e-4)
    weights = load_file(one / "model.safetensors"), load_file(two / "model.safetensors")
    moved = "model.layers.2.mlp.fc1.weight"  # transferred, trained only after the unfreeze
    assert not torch.equal(weights[0][moved], load_file(student / "model.safetensors")[moved])
    start = load_file(student / "model.safetensors")
    for name, tensor in weights[0].items():
        if name.endswith("k_proj.bias"):
            # Its gradient is zero in exact arithmetic (a key bias shifts all of a query's scores alike, and softmax
            # ignores that), so Adam turns each run's rounding noise there into full-size steps: not comparable.
            continue
        # Adam turns rounding differences in near-zero gradient entries into steps of up to the learning rate, so
        # elementwise bounds measure noise; what must hold is that the runs differ by a sliver of how far each moved.
        moved = (tensor.float() - start[name].float()).norm()
        apart = (weights[1][name].float() - tensor.float()).norm()
        assert apart <= 1e-2 * moved + 1e-6, (name, float(apart), float(moved))
