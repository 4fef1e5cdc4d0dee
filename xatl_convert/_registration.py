"""Register the xatl family with transformers' Auto classes as soon as transformers is imported, not before.

Importing `xatl_convert.models` costs seconds (torch and transformers). A user who imports `xatl_convert` is about
to load a model through transformers, and the command line often needs neither, so the registration runs after the
import of transformers completes: at once when it is already imported, otherwise from an import hook that removes
itself after firing once.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import importlib.util
import sys
from types import ModuleType

_TRIGGER = "transformers"


def register_when_transformers_loads() -> None:
    """Register now if transformers is loaded, else once its import finishes."""
    if _TRIGGER in sys.modules:
        _register()
    elif not any(isinstance(finder, _RegisterAfterImport) for finder in sys.meta_path):
        sys.meta_path.insert(0, _RegisterAfterImport())


def _register() -> None:
    import xatl_convert.models  # noqa: F401  (its import registers the Auto classes)


class _RegisterAfterImport(importlib.abc.MetaPathFinder):
    """Finds transformers with the other finders, then runs the registration after its module has executed."""

    def find_spec(self, name: str, path: object = None, target: ModuleType | None = None):
        if name != _TRIGGER:
            return None
        sys.meta_path.remove(self)  # fire once; and let the real finders answer below
        spec = importlib.util.find_spec(name)
        if spec is None or spec.loader is None:
            return spec
        spec.loader = _RegisteringLoader(spec.loader)
        return spec


class _RegisteringLoader(importlib.abc.Loader):
    """Delegates to transformers' own loader, then registers the xatl family."""

    def __init__(self, loader: importlib.abc.Loader) -> None:
        self._loader = loader

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> ModuleType | None:
        return self._loader.create_module(spec)

    def exec_module(self, module: ModuleType) -> None:
        self._loader.exec_module(module)
        _register()

    def __getattr__(self, name: str) -> object:  # get_resource_reader, is_package, …
        return getattr(self._loader, name)
