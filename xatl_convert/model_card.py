"""The converted folder's README.md: a Hub model card with what was transferred and how to use it."""

from __future__ import annotations

from typing import Any

import yaml

from xatl_convert.plan import ConversionPlan


def render_model_card(plan: ConversionPlan, manifest: dict[str, Any]) -> str:
    """Model card text: YAML front matter for the Hub, then transfer counts, the mapping and the command."""
    totals = manifest["totals"]
    mixers = sorted(set(plan.layer_types) - {"attention"})
    front_matter = {
        "base_model": plan.source.reference,
        "library_name": "transformers",
        "tags": ["xatl", *mixers, "hybrid" if plan.attention_layers and mixers else "linear-cost-inference"],
    }
    layers = ", ".join(f"{index}: {kind}" for index, kind in enumerate(plan.layer_types))
    return f"""---
{yaml.safe_dump(front_matter, sort_keys=False).strip()}
---

# {plan.source.reference} → xatl ({"/".join(mixers) or "attention"})

Converted by [xatl-convert](https://pypi.org/project/xatl-convert/) with cross-architecture transfer (XATL): the
components shared with the source Transformer were copied, and only the new mixers start from their own
initialisation. Train it before use; `xatl_manifest.json` lists the transferred tensors to freeze at first.

| | tensors | bytes |
|---|---:|---:|
| transferred from the source | {totals["transferred_tensors"]} | {totals["transferred_bytes"]:,} |
| initialised | {totals["initialised_tensors"]} | {totals["initialised_bytes"]:,} |
| source tensors dropped | {totals["dropped_source_tensors"]} | |

Layers ({len(plan.layer_types)}): {layers}

## Usage

```python
import xatl_convert  # registers the xatl model family; or pass trust_remote_code=True instead
from transformers import AutoModelForCausalLM, AutoTokenizer

model = AutoModelForCausalLM.from_pretrained("path/to/this/folder")
```

## Command

```
{manifest.get("command_line") or "(called from Python)"}
```

## Mapping `{plan.mapping.name}`

```yaml
{plan.mapping.text.strip()}
```
"""
