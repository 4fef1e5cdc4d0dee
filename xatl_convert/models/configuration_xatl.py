"""Configuration of the `xatl` decoder family: a Transformer block skeleton whose mixer is chosen per layer.

Self-contained on purpose (torch, transformers and the stdlib only): this file is copied into every converted
model folder and loaded with `trust_remote_code=True` where `xatl_convert` is not installed.
"""

from __future__ import annotations

import copy
import math
from typing import Any

try:  # transformers >= 5 spells it PreTrainedConfig; the old alias is kept for safety.
    from transformers import PreTrainedConfig
except ImportError:  # pragma: no cover
    from transformers import PretrainedConfig as PreTrainedConfig

LAYER_TYPES: tuple[str, ...] = ("attention", "mamba")
NORM_TYPES: tuple[str, ...] = ("layernorm", "rmsnorm")

MAMBA_DEFAULTS: dict[str, Any] = {
    "d_state": 16,
    "d_conv": 4,
    "expand": 2,
    "dt_rank": "auto",
    "dt_min": 0.001,
    "dt_max": 0.1,
    "dt_init_floor": 1e-4,
    "dt_scale": 1.0,
    "conv_bias": True,
    "proj_bias": False,
    "out_proj_bias": False,
}


class XatlConfig(PreTrainedConfig):
    """Embeddings → blocks (norm → mixer, norm → MLP, parallel or sequential residual) → final norm → head.

    `layer_types[i]` picks layer i's mixer. `mamba` holds mamba-ssm's Mamba (v1) mixer arguments, merged over
    `MAMBA_DEFAULTS` and with `dt_rank` resolved, so config.json is explicit about every shape.
    """

    model_type = "xatl"

    def __init__(
        self,
        vocab_size: int = 50304,
        hidden_size: int = 768,
        num_hidden_layers: int = 12,
        intermediate_size: int = 3072,
        layer_types: list[str] | None = None,
        norm_type: str = "layernorm",
        norm_eps: float = 1e-5,
        norm_bias: bool = True,
        hidden_act: str = "gelu",
        mlp_bias: bool = True,
        mlp_gated: bool = False,
        parallel_residual: bool = True,
        num_attention_heads: int = 12,
        num_key_value_heads: int | None = None,
        head_dim: int | None = None,
        attention_bias: bool = True,
        attention_out_bias: bool = True,
        partial_rotary_factor: float = 1.0,
        rope_theta: float = 10000.0,
        max_position_embeddings: int = 2048,
        mamba: dict[str, Any] | None = None,
        tie_word_embeddings: bool = False,
        initializer_range: float = 0.02,
        use_cache: bool = False,
        pad_token_id: int | None = None,
        bos_token_id: int | None = None,
        eos_token_id: int | None = None,
        **kwargs: Any,
    ) -> None:
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.num_hidden_layers = num_hidden_layers
        self.intermediate_size = intermediate_size
        self.norm_type = norm_type
        self.norm_eps = norm_eps
        self.norm_bias = norm_bias
        self.hidden_act = hidden_act
        self.mlp_bias = mlp_bias
        self.mlp_gated = mlp_gated
        self.parallel_residual = parallel_residual
        self.num_attention_heads = num_attention_heads
        self.num_key_value_heads = num_key_value_heads or num_attention_heads
        self.head_dim = head_dim or hidden_size // num_attention_heads
        self.attention_bias = attention_bias
        self.attention_out_bias = attention_out_bias
        self.partial_rotary_factor = partial_rotary_factor
        self.rope_theta = rope_theta
        self.max_position_embeddings = max_position_embeddings
        self.mamba = self._merge_mamba(mamba, hidden_size)
        self.initializer_range = initializer_range
        self.use_cache = use_cache
        self.tie_word_embeddings = tie_word_embeddings
        super().__init__(
            pad_token_id=pad_token_id,
            bos_token_id=bos_token_id,
            eos_token_id=eos_token_id,
            tie_word_embeddings=tie_word_embeddings,
            **kwargs,
        )
        # Set after super().__init__: transformers 5 rewrites a config's `layer_types` there into its own
        # vocabulary ("mamba" → "linear_attention", "attention" → "full_attention"), which would lose ours.
        self.layer_types = list(layer_types) if layer_types is not None else ["mamba"] * num_hidden_layers
        self.validate()

    @staticmethod
    def _merge_mamba(mamba: dict[str, Any] | None, hidden_size: int) -> dict[str, Any]:
        unknown = set(mamba or {}) - set(MAMBA_DEFAULTS)
        if unknown:
            raise ValueError(f"unknown mamba config keys {sorted(unknown)}; known: {sorted(MAMBA_DEFAULTS)}")
        merged = {**copy.deepcopy(MAMBA_DEFAULTS), **(mamba or {})}
        if merged["dt_rank"] == "auto":
            merged["dt_rank"] = math.ceil(hidden_size / 16)
        return merged

    def _check(self) -> None:
        """Fail at construction rather than deep inside a forward pass."""
        bad = [t for t in self.layer_types if t not in LAYER_TYPES]
        if bad:
            raise ValueError(f"unknown layer_types entries {bad}; allowed: {list(LAYER_TYPES)}")
        if len(self.layer_types) != self.num_hidden_layers:
            raise ValueError(
                f"layer_types has {len(self.layer_types)} entries but num_hidden_layers={self.num_hidden_layers}"
            )
        if self.norm_type not in NORM_TYPES:
            raise ValueError(f"norm_type must be one of {list(NORM_TYPES)}, got {self.norm_type!r}")
        if self.num_attention_heads % self.num_key_value_heads != 0:
            raise ValueError(
                f"num_attention_heads={self.num_attention_heads} is not a multiple of "
                f"num_key_value_heads={self.num_key_value_heads}"
            )

    def validate(self) -> None:
        """Run transformers' validators with `layer_types` hidden from them, then ours.

        transformers' strict validator (run by __init__ and save_pretrained) accepts only its own layer-type names.
        """
        layer_types = self.__dict__.pop("layer_types", None)
        try:
            parent_validate = getattr(super(), "validate", None)
            if parent_validate is not None:
                parent_validate()
        finally:
            if layer_types is not None:
                self.layer_types = layer_types
        if layer_types is not None:  # None while super().__init__ runs, before layer_types is set
            self._check()
