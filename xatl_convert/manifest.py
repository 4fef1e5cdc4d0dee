"""The provenance manifest (xatl_manifest.json): what each target tensor came from.

Training reads it to freeze what was transferred; verify reads it to recompute every transferred tensor.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from xatl_convert.plan import ConversionPlan

MANIFEST_NAME = "xatl_manifest.json"
MANIFEST_VERSION = 1


def build_manifest(plan: ConversionPlan, command_line: str | None = None) -> dict[str, Any]:
    """A JSON-ready description of the plan: source, mapping, target layout, every tensor and every drop."""
    from xatl_convert import __version__

    tensors: dict[str, Any] = {}
    for tensor in plan.tensors:
        entry: dict[str, Any] = {
            "status": tensor.status,
            "shape": list(tensor.shape),
            "dtype": str(tensor.dtype).removeprefix("torch."),
            "rule": tensor.rule,
        }
        if tensor.status == "transferred":
            entry["sources"] = list(tensor.sources)
            entry["transform"] = tensor.transform.spec() if tensor.transform else None
            entry["group"] = tensor.group
        else:
            entry["strategy"] = tensor.strategy
            if tensor.parts:
                entry["parts"] = [
                    {
                        "part": part.part,
                        "rows": list(part.rows),
                        "sources": list(part.sources),
                        "transform": part.transform.spec(),
                        "rule": part.rule,
                    }
                    for part in tensor.parts
                ]
        tensors[tensor.name] = entry
    return {
        "manifest_version": MANIFEST_VERSION,
        "xatl_convert_version": __version__,
        "command_line": command_line,
        "source": {
            "reference": plan.source.reference,
            "path": str(plan.source.path),
            "revision": plan.source.revision,
            "model_type": plan.source.model_type,
        },
        "mapping": {
            "name": plan.mapping.name,
            "file": plan.mapping.file,
            "sha256": hashlib.sha256(plan.mapping.text.encode()).hexdigest(),
            "options": plan.mapping.options,
            "overrides": plan.overrides,
        },
        "target": {
            "model_type": "xatl",
            "layer_types": plan.layer_types,
            "attention_layers": plan.attention_layers,
            "dtype": str(plan.dtype).removeprefix("torch."),
            "seed": plan.seed,
        },
        "totals": {
            "transferred_tensors": len(plan.by_status("transferred")),
            "transferred_bytes": plan.total_bytes("transferred"),
            "initialised_tensors": len(plan.by_status("initialised")),
            "initialised_bytes": plan.total_bytes("initialised"),
            "dropped_source_tensors": len(plan.dropped),
        },
        "warnings": list(plan.warnings),
        "tensors": tensors,
        "dropped": dict(plan.dropped),
    }


def read_manifest(folder: str | Path) -> dict[str, Any]:
    """Load a converted folder's manifest."""
    return json.loads((Path(folder) / MANIFEST_NAME).read_text())


def transferred_tensor_names(manifest: dict[str, Any]) -> list[str]:
    """Names of the target tensors that came from the source (the ones to freeze at first)."""
    return [name for name, entry in manifest["tensors"].items() if entry["status"] == "transferred"]
