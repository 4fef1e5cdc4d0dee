"""Package discovery for the wheel; everything else (metadata, dependencies, data) lives in pyproject.toml.

Packages are found, not listed, so a new subpackage cannot be left out of the wheel (tests/test_wheel.py compares
the built wheel with the source tree). The built-in mappings live at the top of the repository (mappings/) and ship
inside the package as xatl_convert.builtin_mappings, which no discovery can find on its own.
"""

from setuptools import find_packages, setup

setup(
    packages=[*find_packages(include=["xatl_convert", "xatl_convert.*"]), "xatl_convert.builtin_mappings"],
    package_dir={"xatl_convert.builtin_mappings": "mappings"},
)
