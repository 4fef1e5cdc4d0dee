"""The CPU-side parts of benchmarks/gpu_check.py: limiting the CUDA builds to one architecture."""

from __future__ import annotations

import importlib.util
import io
import tarfile
from pathlib import Path

import pytest

from tests.conftest import REPO_ROOT

SETUP = """cc_flag = []
if True:
    cc_flag.append("-gencode")
    cc_flag.append("arch=compute_75,code=sm_75")
    cc_flag.append("-gencode")
    cc_flag.append("arch=compute_90,code=sm_90")
    cc_flag.append("-DKEEP")
    # HACK: The compiler flag -D_GLIBCXX_USE_CXX11_ABI is set to be the same as
RESULT = cc_flag
"""


def _load_gpu_check():
    spec = importlib.util.spec_from_file_location("gpu_check", REPO_ROOT / "benchmarks" / "gpu_check.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _sdist(folder: Path, name: str, setup: str) -> None:
    with tarfile.open(folder / f"{name}.tar.gz", "w:gz") as tar:
        data = setup.encode()
        info = tarfile.TarInfo(f"{name}/setup.py")
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))


def test_patch_sources_builds_for_one_architecture_only(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    gpu_check = _load_gpu_check()
    deps = tmp_path / "deps"
    deps.mkdir()
    _sdist(deps, "mamba_ssm-9.9", SETUP)
    monkeypatch.setattr(gpu_check, "DEPS", deps)
    (folder,) = gpu_check.patch_sources("90", tmp_path / "build")
    namespace: dict = {}
    exec((folder / "setup.py").read_text(), namespace)  # the patched setup.py still runs, with one gencode
    assert namespace["RESULT"] == ["-DKEEP", "-gencode", "arch=compute_90,code=sm_90"]


def test_patch_sources_refuses_a_setup_py_it_does_not_recognise(tmp_path: Path, monkeypatch) -> None:
    gpu_check = _load_gpu_check()
    deps = tmp_path / "deps"
    deps.mkdir()
    _sdist(deps, "mamba_ssm-10.0", "cc_flag = []\n")
    monkeypatch.setattr(gpu_check, "DEPS", deps)
    with pytest.raises(SystemExit, match="marker not found"):
        gpu_check.patch_sources("90", tmp_path / "build")


def test_kernel_timing_dry_run_compares_every_call_site_and_times_both_paths() -> None:
    timing = _load_gpu_check().kernel_timing("cpu", quick=True)
    assert set(timing) == {"mamba", "mamba2"}
    for measured in timing.values():
        assert measured["kernels"] == "stand-ins on cpu"
        assert measured["call_sites_passed"] is True
        assert measured["kernels_prefill_ms"] > 0 and measured["reference_step_ms"] > 0
        assert measured["prefill_speedup"] == round(
            measured["reference_prefill_ms"] / measured["kernels_prefill_ms"], 2
        )


def test_model_timing_dry_run_runs_a_whole_hybrid_on_both_paths() -> None:
    timing = _load_gpu_check().model_timing("cpu", quick=True)
    assert set(timing) == {"mamba paper hybrid", "mamba2 paper hybrid"}
    for measured in timing.values():
        assert measured["passed"] is True and measured["relative_logit_difference"] <= 2e-2
        assert measured["kernels_step_ms"] > 0 and measured["reference_prefill_ms"] > 0
