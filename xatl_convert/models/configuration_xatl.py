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
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

LAYER_TYPES: tuple[str, ...] = ("attention", "mamba", "mamba2")
NORM_TYPES: tuple[str, ...] = ("layernorm", "rmsnorm")

DEFAULT_ROPE_THETA = 10000.0
# RoPE variants computed by transformers' own functions (`modeling_rope_utils.ROPE_INIT_FUNCTIONS`; "default" is a
# method of each model's rotary class there, so ours is a copy of GPT-NeoX's). "dynamic" and "longrope" recompute
# inv_freq from the sequence length, as transformers' `dynamic_rope_update` does on a freshly loaded model.
SUPPORTED_ROPE_TYPES: tuple[str, ...] = tuple(dict.fromkeys(("default", *ROPE_INIT_FUNCTIONS)))

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

# mamba-ssm's Mamba2 mixer arguments (its defaults). d_inner = expand * hidden_size, nheads = d_inner // headdim;
# in_proj rows are [z (d_inner), x (d_inner), B (ngroups*d_state), C (ngroups*d_state), dt (nheads)].
MAMBA2_DEFAULTS: dict[str, Any] = {
    "d_state": 128,
    "d_conv": 4,
    "expand": 2,
    "headdim": 64,
    "ngroups": 1,
    "chunk_size": 256,
    "A_init_range": [1, 16],
    "dt_min": 0.001,
    "dt_max": 0.1,
    "dt_init_floor": 1e-4,
    "conv_bias": True,
    "proj_bias": False,
    "out_proj_bias": False,
    "norm_before_gate": False,
}


class XatlConfig(PreTrainedConfig):
    """Embeddings → blocks (norm → mixer, norm → MLP, parallel or sequential residual) → final norm → head.

    `layer_types[i]` picks layer i's mixer ("attention", "mamba" or "mamba2"). `mamba` holds mamba-ssm's Mamba (v1)
    mixer arguments, merged over `MAMBA_DEFAULTS` and with `dt_rank` resolved, so config.json is explicit about every
    shape. `mamba2` holds mamba-ssm's Mamba2 mixer arguments, merged over `MAMBA2_DEFAULTS`; when a layer is
    "mamba2", expand * hidden_size must be divisible by `headdim` and by `ngroups`.

    RoPE is described by a flat transformers-style `rope_parameters` dict (`rope_type`, `rope_theta`, optional
    `partial_rotary_factor`, and the type's own keys, e.g. llama3's `factor`, `low_freq_factor`, `high_freq_factor`,
    `original_max_position_embeddings`); it is what config.json stores. The legacy `rope_theta=` and
    `partial_rotary_factor=` arguments (older config.json files) build the default one, `rope_scaling=` is read as
    an alias of `rope_parameters`; `rope_theta` and `partial_rotary_factor` stay readable as properties.
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
        partial_rotary_factor: float | None = None,
        rope_theta: float | None = None,
        rope_parameters: dict[str, Any] | None = None,
        rope_scaling: dict[str, Any] | None = None,
        max_position_embeddings: int = 2048,
        mamba: dict[str, Any] | None = None,
        mamba2: dict[str, Any] | None = None,
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
        self.attention_bias = attention_bias
        self.attention_out_bias = attention_out_bias
        self.max_position_embeddings = max_position_embeddings
        # Set before super().__init__, which standardises it (e.g. fills llama3/yarn/longrope's
        # `original_max_position_embeddings` from max_position_embeddings when absent) and validates it.
        self.rope_parameters = self._build_rope_parameters(
            rope_parameters if rope_parameters is not None else rope_scaling, rope_theta, partial_rotary_factor
        )
        self.mamba = self._merge_mamba(mamba, hidden_size)
        self.mamba2 = self._merge_mamba2(mamba2)
        self.initializer_range = initializer_range
        self.use_cache = use_cache
        self.tie_word_embeddings = tie_word_embeddings
        try:
            super().__init__(
                pad_token_id=pad_token_id,
                bos_token_id=bos_token_id,
                eos_token_id=eos_token_id,
                tie_word_embeddings=tie_word_embeddings,
                **kwargs,
            )
        except KeyError as error:  # transformers' RoPE validation raises KeyError for missing rope_parameters keys
            raise ValueError(f"invalid rope_parameters {self.rope_parameters}: {error}") from error
        # Set after super().__init__: transformers 5 rewrites a config's `layer_types` there into its own
        # vocabulary ("mamba" → "linear_attention", "attention" → "full_attention"), which would lose ours.
        self.layer_types = list(layer_types) if layer_types is not None else ["mamba"] * num_hidden_layers
        # Also after super().__init__, whose RoPE validation rejects an odd head_dim; see `validate`.
        self.head_dim = head_dim or hidden_size // num_attention_heads
        self.validate()

    @property
    def rope_theta(self) -> float:
        return self.rope_parameters.get("rope_theta", DEFAULT_ROPE_THETA)

    @rope_theta.setter
    def rope_theta(self, value: float) -> None:
        self.rope_parameters["rope_theta"] = value

    @property
    def partial_rotary_factor(self) -> float:
        return self.rope_parameters.get("partial_rotary_factor", 1.0)

    @partial_rotary_factor.setter
    def partial_rotary_factor(self, value: float) -> None:
        self.rope_parameters["partial_rotary_factor"] = value

    @staticmethod
    def _build_rope_parameters(
        rope_parameters: dict[str, Any] | None, rope_theta: float | None, partial_rotary_factor: float | None
    ) -> dict[str, Any]:
        """A fresh flat dict: `rope_parameters` (copied) or the default RoPE, legacy arguments merged in."""
        if rope_parameters is None:
            return {
                "rope_type": "default",
                "rope_theta": DEFAULT_ROPE_THETA if rope_theta is None else rope_theta,
                "partial_rotary_factor": 1.0 if partial_rotary_factor is None else partial_rotary_factor,
            }
        if not isinstance(rope_parameters, dict) or any(isinstance(v, dict) for v in rope_parameters.values()):
            raise ValueError(
                f"rope_parameters must be one flat dict (per-layer-type RoPE is not supported), got {rope_parameters!r}"
            )
        params = copy.deepcopy(rope_parameters)
        if "type" in params:  # the pre-4.45 spelling of rope_type
            legacy_type = params.pop("type")
            params.setdefault("rope_type", legacy_type)
        params.setdefault("rope_type", "default")
        for key, value in (("rope_theta", rope_theta), ("partial_rotary_factor", partial_rotary_factor)):
            if value is None:
                continue
            if key in params and params[key] != value:
                raise ValueError(f"{key}={value} conflicts with rope_parameters[{key!r}]={params[key]}")
            params[key] = value
        params.setdefault("rope_theta", DEFAULT_ROPE_THETA)
        if params["rope_type"] not in SUPPORTED_ROPE_TYPES:
            raise ValueError(
                f"unsupported rope_parameters['rope_type']={params['rope_type']!r}; "
                f"supported: {list(SUPPORTED_ROPE_TYPES)}"
            )
        return params

    @staticmethod
    def _merge_mamba(mamba: dict[str, Any] | None, hidden_size: int) -> dict[str, Any]:
        unknown = set(mamba or {}) - set(MAMBA_DEFAULTS)
        if unknown:
            raise ValueError(f"unknown mamba config keys {sorted(unknown)}; known: {sorted(MAMBA_DEFAULTS)}")
        merged = {**copy.deepcopy(MAMBA_DEFAULTS), **(mamba or {})}
        if merged["dt_rank"] == "auto":
            merged["dt_rank"] = math.ceil(hidden_size / 16)
        return merged

    @staticmethod
    def _merge_mamba2(mamba2: dict[str, Any] | None) -> dict[str, Any]:
        unknown = set(mamba2 or {}) - set(MAMBA2_DEFAULTS)
        if unknown:
            raise ValueError(f"unknown mamba2 config keys {sorted(unknown)}; known: {sorted(MAMBA2_DEFAULTS)}")
        merged = {**copy.deepcopy(MAMBA2_DEFAULTS), **copy.deepcopy(mamba2 or {})}
        merged["A_init_range"] = list(merged["A_init_range"])  # a tuple would not survive a JSON round trip
        return merged

    def _check_mamba2(self) -> None:
        m = self.mamba2
        d_inner = m["expand"] * self.hidden_size
        if m["headdim"] <= 0 or d_inner % m["headdim"] != 0:
            raise ValueError(
                f"mamba2: d_inner = expand * hidden_size = {m['expand']} * {self.hidden_size} = {d_inner} "
                f"is not divisible by headdim={m['headdim']}"
            )
        if m["ngroups"] <= 0 or d_inner % m["ngroups"] != 0:
            raise ValueError(f"mamba2: d_inner={d_inner} is not divisible by ngroups={m['ngroups']}")
        nheads = d_inner // m["headdim"]
        if nheads % m["ngroups"] != 0:
            raise ValueError(
                f"mamba2: nheads = d_inner / headdim = {nheads} is not divisible by ngroups={m['ngroups']}"
            )
        lo, hi = m["A_init_range"]
        if not 0 < lo <= hi:
            raise ValueError(f"mamba2: A_init_range must satisfy 0 < low <= high, got {m['A_init_range']}")
        if m["chunk_size"] <= 0:
            raise ValueError(f"mamba2: chunk_size must be positive, got {m['chunk_size']}")

    def _check(self) -> None:
        """Fail at construction rather than deep inside a forward pass."""
        bad = [t for t in self.layer_types if t not in LAYER_TYPES]
        if bad:
            raise ValueError(f"unknown layer_types entries {bad}; allowed: {list(LAYER_TYPES)}")
        if len(self.layer_types) != self.num_hidden_layers:
            raise ValueError(
                f"layer_types has {len(self.layer_types)} entries but num_hidden_layers={self.num_hidden_layers}"
            )
        if "mamba2" in self.layer_types:
            self._check_mamba2()
        if self.norm_type not in NORM_TYPES:
            raise ValueError(f"norm_type must be one of {list(NORM_TYPES)}, got {self.norm_type!r}")
        rope_type = self.rope_parameters.get("rope_type")
        if rope_type not in SUPPORTED_ROPE_TYPES:
            raise ValueError(
                f"unsupported rope_parameters['rope_type']={rope_type!r}; supported: {list(SUPPORTED_ROPE_TYPES)}"
            )
        if self.num_attention_heads % self.num_key_value_heads != 0:
            raise ValueError(
                f"num_attention_heads={self.num_attention_heads} is not a multiple of "
                f"num_key_value_heads={self.num_key_value_heads}"
            )

    def validate(self) -> None:
        """Run transformers' validators with `layer_types` hidden from them, then ours.

        transformers' strict validator (run by __init__ and save_pretrained) accepts only its own layer-type names.
        Its RoPE check (an even rotary dimension) reads `head_dim`, which is hidden too when no layer is attention:
        RoPE is unused then, and Mamba-only configs may have any hidden_size / num_attention_heads.
        """
        if "attention" in getattr(self, "layer_types", ()) and "head_dim" in self.__dict__:
            rotary_dim = int(self.head_dim * self.rope_parameters.get("partial_rotary_factor", 1.0))
            if rotary_dim + rotary_dim % 2 > self.head_dim:  # inv_freq has ceil(rotary_dim / 2) entries
                raise ValueError(
                    f"RoPE needs an even rotary dimension: head_dim={self.head_dim} with partial_rotary_factor="
                    f"{self.rope_parameters.get('partial_rotary_factor', 1.0)} rotates {rotary_dim} dims"
                )
        layer_types = self.__dict__.pop("layer_types", None)
        hidden: dict[str, Any] = {}
        if layer_types is not None and "attention" not in layer_types and "head_dim" in self.__dict__:
            hidden["head_dim"] = self.__dict__.pop("head_dim")
        try:
            parent_validate = getattr(super(), "validate", None)
            if parent_validate is not None:
                parent_validate()
        except KeyError as error:  # transformers' RoPE validation raises KeyError for missing rope_parameters keys
            raise ValueError(f"invalid rope_parameters {self.rope_parameters}: {error}") from error
        finally:
            self.__dict__.update(hidden)
            if layer_types is not None:
                self.layer_types = layer_types
        if layer_types is not None:  # None while super().__init__ runs, before layer_types is set
            self._check()
