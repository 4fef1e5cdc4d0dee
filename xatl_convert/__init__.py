"""xatl-convert: cross-architecture transfer from Transformer checkpoints to linear-cost-inference models.

Importing the package registers the ``xatl`` model family with transformers' Auto classes, so a converted
folder loads with ``AutoModelForCausalLM.from_pretrained(out)``. The registration waits for transformers to be
imported (at once if it already is): the command line imports neither torch nor transformers for `--help`,
`sources` or `mappings`, which keeps those commands under half a second.
"""

from __future__ import annotations

from xatl_convert._registration import register_when_transformers_loads

__version__ = "0.1.0"

register_when_transformers_loads()
