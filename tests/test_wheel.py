"""What users install: the wheel holds every module and data file of the source tree, the sdist builds the same
wheel, and the wheel installed alone (no checkout, no editable finder) imports every subpackage and runs `xatl`.

An editable install resolves any subpackage from the checkout, so a package missing from the wheel passes every
other test; these build the real artefacts (about 15 s).
"""

from __future__ import annotations

import subprocess
import sys
import sysconfig
import tarfile
import zipfile
from pathlib import Path

import pytest

from tests.conftest import REPO_ROOT


def _build(kind: str, source: Path, out: Path) -> Path:
    """Build an sdist or a wheel of `source` into `out` with setuptools' own backend (no network, no isolation)."""
    code = f"from setuptools import build_meta as b; print(b.build_{kind}({str(out)!r}))"
    result = subprocess.run([sys.executable, "-c", code], cwd=source, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    return out / result.stdout.strip().splitlines()[-1]


def expected_files() -> set[str]:
    """Every module and data file the package has in the checkout, under the names the wheel gives them."""
    files = {
        str(path.relative_to(REPO_ROOT))
        for path in (REPO_ROOT / "xatl_convert").rglob("*")
        if path.is_file() and "__pycache__" not in path.parts and path.suffix != ".pyc"
    }
    files |= {f"xatl_convert/builtin_mappings/{path.name}" for path in (REPO_ROOT / "mappings").glob("*.yaml")}
    return files


def _package_files(wheel: Path) -> set[str]:
    with zipfile.ZipFile(wheel) as archive:
        return {name for name in archive.namelist() if ".dist-info/" not in name}


@pytest.fixture(scope="module")
def wheels(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A wheel built from the checkout, and one built from the sdist (unpacked elsewhere, as pip does)."""
    root = tmp_path_factory.mktemp("wheels")
    (root / "direct").mkdir()
    (root / "sdist").mkdir()
    (root / "from-sdist").mkdir()
    direct = _build("wheel", REPO_ROOT, root / "direct")
    sdist = _build("sdist", REPO_ROOT, root / "sdist")
    with tarfile.open(sdist) as archive:
        archive.extractall(root / "unpacked", filter="data")
    (unpacked,) = (root / "unpacked").iterdir()
    return {"direct": direct, "from-sdist": _build("wheel", unpacked, root / "from-sdist")}


def test_the_wheel_holds_every_module_and_data_file_of_the_source_tree(wheels: dict[str, Path]) -> None:
    held = _package_files(wheels["direct"])
    missing, extra = expected_files() - held, held - expected_files()
    assert not missing, f"left out of the wheel: {sorted(missing)[:10]}"
    assert not extra, f"in the wheel but not in the source tree: {sorted(extra)[:10]}"


def test_the_sdist_builds_the_same_wheel(wheels: dict[str, Path]) -> None:
    assert _package_files(wheels["from-sdist"]) == _package_files(wheels["direct"])


def test_the_wheel_installed_alone_imports_every_subpackage_and_runs(wheels: dict[str, Path], tmp_path: Path) -> None:
    target = tmp_path / "installed"
    install = [
        sys.executable,
        "-m",
        "pip",
        "install",
        "-q",
        "--no-deps",
        "--target",
        str(target),
        str(wheels["direct"]),
    ]
    subprocess.run(install, check=True, capture_output=True, timeout=300)
    # -S: no .pth files, so no editable finder; the wheel's copy first, then the dependencies' site-packages.
    code = (
        f"import sys; sys.path[:0] = [{str(target)!r}, {sysconfig.get_paths()['purelib']!r}]\n"
        "import importlib, pkgutil, xatl_convert\n"
        f"assert xatl_convert.__file__.startswith({str(target)!r}), xatl_convert.__file__\n"
        "for module in pkgutil.walk_packages(xatl_convert.__path__, 'xatl_convert.'):\n"
        "    importlib.import_module(module.name)\n"
        "from xatl_convert.mapping import builtin_mappings\n"
        "assert len(builtin_mappings()) >= 10, builtin_mappings()\n"
        "from xatl_convert.cli import app\n"
        "app(['--version'])\n"
    )
    result = subprocess.run(
        [sys.executable, "-S", "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr[-3000:]
    from xatl_convert import __version__

    assert result.stdout.strip() == f"xatl-convert {__version__}"
