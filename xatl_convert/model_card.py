"""The converted folder's README.md: a Hub model card with what was transferred and how to use it."""

from __future__ import annotations

import re
from typing import Any

import yaml

from xatl_convert.plan import ConversionPlan

MODEL_CARD_NAME = "README.md"
UNTRAINED_NOTE = "Train it before use; `xatl_manifest.json` lists the transferred tensors to freeze at first."
_DISTILLED_NOTE = re.compile(r"Then distilled by `xatl distill`[^\n]*")
_DISTILLATION_SECTION = re.compile(r"\n## Distillation\n.*?(?=\n## |\Z)", re.DOTALL)
_FRONT_MATTER = re.compile(r"\A---\n(.*?)\n---\n", re.DOTALL)


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
initialisation. {UNTRAINED_NOTE}

| | tensors | bytes |
|---|---:|---:|
| transferred from the source | {totals["transferred_tensors"]} | {totals["transferred_bytes"]:,} |
| initialised | {totals["initialised_tensors"]} | {totals["initialised_bytes"]:,} |
| source tensors dropped | {totals["dropped_source_tensors"]} | |

Layers ({len(plan.layer_types)}): {layers}
{layer_selection_section(manifest.get("layer_selection"))}
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


def layer_selection_section(record: dict[str, Any] | None) -> str:
    """How `--attn-layers auto:K` chose the attention layers: the method, what it read, and every layer's rank
    ('' when the layers were given by hand)."""
    if not record:
        return ""
    budget = record["budget"]
    chosen = set(record["chosen"])
    rows = "\n".join(
        f"| {entry['rank']} | {entry['layer']} | {entry['kl']:.4f} | {entry['score']:+.4f} | "
        f"{'kept' if entry['layer'] in chosen else ''} |"
        for entry in sorted(record["layers"], key=lambda entry: entry["rank"])
    )
    picks = ", then ".join(f"{pick['layer']} (KL {pick['kl']:.4f})" for pick in record.get("greedy", []))
    how = record.get("description", "")
    return f"""
## Layer selection

The attention layers were chosen by `--attn-layers auto:{record["keep"]}` (`{record["method"]}`): {how}.
Measured on `{record.get("data")}` with {budget["tokens"]:,} tokens ({budget["align_tokens"]:,} to align,
{budget["score_tokens"]:,} to score; budget {budget["select_tokens"]:,}), seed {record.get("seed")}. KL of the all-LCI
student to the source: {record["baseline_kl"]:.4f}; greedy picks: {picks}.

| rank | layer | KL with it alone restored | score (KL drop) | |
|---:|---:|---:|---:|---|
{rows}
"""


def render_distilled_card(card: str, record: dict[str, Any]) -> str:
    """The student's card (`card`, as the conversion wrote it) for the model `xatl distill` trained: the note to train
    it before use becomes what distillation did, and a Distillation section gives the stages, their tokens and the
    held-out loss against the teacher's. A card distilled before describes the latest run only, as the manifest."""
    from xatl_convert.training.evaluate import gap_meaning, gap_recovered

    start, end, teacher = record["start_loss"], record["end_loss"], record["teacher_loss"]
    summary = (
        f"Then distilled by `xatl distill` from its teacher (see Distillation below): held-out loss "
        f"{start:.3f} → {end:.3f}, the teacher's {teacher:.3f}."
    )
    card = card.replace(UNTRAINED_NOTE, summary) if UNTRAINED_NOTE in card else _DISTILLED_NOTE.sub(summary, card, 1)
    card = _DISTILLATION_SECTION.sub("", card)
    card = _tagged(card, "distillation")
    data = record.get("data") or {}
    rows = "\n".join(_stage_row(stage) for stage in record["stages"])
    gap = gap_recovered(start, end, teacher)
    gap_text = "" if gap is None else f"; gap recovered {gap:.0%}, (start − end) / (start − teacher){gap_meaning(gap)}"
    section = f"""
## Distillation

Trained after conversion by `xatl distill` against the teacher `{record.get("teacher")}` on `{data.get("source")}`
({data.get("train_blocks")} training blocks; the held-out split, {data.get("held_out_blocks")} blocks, never trains).
`xatl_manifest.json` (`distillation`) records every setting; the `distill_*.csv` files hold the per-step losses.

| stage | steps | tokens | learning rate | final loss |
|---|---:|---:|---:|---|
{rows}

Held-out loss: {start:.3f} at the start, {end:.3f} after distillation; the teacher's {teacher:.3f}{gap_text}.
"""
    usage = card.find("\n## ")
    head, tail = (card, "") if usage < 0 else (card[:usage], card[usage:])
    return head.rstrip("\n") + "\n" + section + tail


def _stage_row(stage: dict[str, Any]) -> str:
    """One stage of the Distillation table: align's mean normalised MSE, kd's KL (ce's next-token loss)."""
    if stage.get("skipped"):
        return f"| {stage['stage']} | 0 | 0 | | skipped |"
    if stage["stage"] == "align":
        final = stage.get("final_mean_loss")
        loss = "" if final is None else f"{final:.4f} (mean normalised MSE per layer)"
    else:
        final = stage.get("final_loss")
        kind = "KL to the teacher" if stage["stage"] == "kd" else "next-token loss"
        loss = "" if final is None else f"{final:.4f} ({kind})"
        if stage.get("lit_unfrozen_at") is not None:
            loss += f"; LIT unfroze the transferred weights at step {stage['lit_unfrozen_at']}"
    return f"| {stage['stage']} | {stage['steps']:,} | {stage['tokens']:,} | {stage['lr']:g} | {loss} |"


def _tagged(card: str, tag: str) -> str:
    """The card with `tag` among its front matter's tags (a card without front matter is left as it is)."""
    match = _FRONT_MATTER.match(card)
    if match is None:
        return card
    try:
        front = yaml.safe_load(match.group(1))
    except yaml.YAMLError:
        return card
    if not isinstance(front, dict) or not isinstance(front.get("tags", []), list) or tag in front.get("tags", []):
        return card
    front["tags"] = [*front.get("tags", []), tag]
    return f"---\n{yaml.safe_dump(front, sort_keys=False).strip()}\n---\n" + card[match.end() :]
