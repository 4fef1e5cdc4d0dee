"""xatl-convert: cross-architecture transfer from Transformer checkpoints to linear-cost-inference models.

Importing the package registers the ``xatl`` model family with transformers' Auto classes, so a converted
folder loads with ``AutoModelForCausalLM.from_pretrained(out)``.
"""

from __future__ import annotations

from xatl_convert import models as _models  # noqa: F401  (registers the Auto classes)

__version__ = "0.1.0"
