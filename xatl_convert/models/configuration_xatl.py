"""Configuration of the `xatl` decoder family: a Transformer block skeleton whose mixer is chosen per layer.

Self-contained on purpose (torch, transformers and the stdlib only): this file is copied into every converted
model folder and loaded with `trust_remote_code=True` where `xatl_convert` is not installed.
"""

from __future__ import annotations

import copy
import difflib
from typing import Any

try:  # transformers >= 5 spells it PreTrainedConfig; the old alias is kept for safety.
    from transformers import PreTrainedConfig
except ImportError:  # pragma: no cover
    from transformers import PretrainedConfig as PreTrainedConfig
from transformers.activations import ACT2FN
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

from .config_keys_xatl import (
    ATTENTION_TYPES,
    CONSTRUCTION_ONLY,
    MODEL_KEYS,
    NORM_LAYOUTS,
    NORM_TYPES,
    POSITION_EMBEDDINGS,
    QK_NORMS,
)
from .mixers_xatl import LAYER_TYPES, MIXERS, Check, XatlConfigError
from .mixers_xatl import boolean as _bool
from .mixers_xatl import is_int as _is_int
from .mixers_xatl import is_number as _is_number
from .mixers_xatl import optional as _optional
from .mixers_xatl import positive_int as _positive_int
from .mixers_xatl import positive_number as _positive_number
from .mixers_xatl import shown as _shown


def _register_layer_types_with_transformers() -> None:
    """Let transformers read our config.json as a plain `PreTrainedConfig`, as the Trainer does when it resumes.

    `Trainer._load_from_checkpoint` reads a checkpoint's config.json with the base class (for its version warning),
    whose strict validator accepts only transformers' own layer-type names, after mapping legacy ones: "attention"
    and "mamba" are mapped there ("full_attention", "linear_attention"), "mamba2" is not, so every resume of a Mamba2
    student failed. Each recurrent mixer is mapped the way transformers maps "mamba"; XatlConfig keeps our names.
    """
    try:
        from transformers import configuration_utils
    except ImportError:  # pragma: no cover
        return
    remap = getattr(configuration_utils, "_LEGACY_LAYER_TYPE_REMAP", None)
    allowed = getattr(configuration_utils, "ALLOWED_LAYER_TYPES", ())
    if not isinstance(remap, dict) or "linear_attention" not in allowed:
        return  # another transformers: nothing validates layer types this way
    for kind in LAYER_TYPES:
        if kind not in allowed:
            remap.setdefault(kind, "full_attention" if kind == "attention" else "linear_attention")


_register_layer_types_with_transformers()
DEFAULT_ROPE_THETA = 10000.0
# RoPE variants computed by transformers' own functions (`modeling_rope_utils.ROPE_INIT_FUNCTIONS`; "default" is a
# method of each model's rotary class there, so ours is a copy of GPT-NeoX's). "dynamic" and "longrope" recompute
# inv_freq from the sequence length, as transformers' `dynamic_rope_update` does on a freshly loaded model.
SUPPORTED_ROPE_TYPES: tuple[str, ...] = tuple(dict.fromkeys(("default", *ROPE_INIT_FUNCTIONS)))

# The mixers' settings are declared in the registry (mixers_xatl); these names stay for older imports.
MAMBA_DEFAULTS: dict[str, Any] = MIXERS["mamba"].defaults
MAMBA2_DEFAULTS: dict[str, Any] = MIXERS["mamba2"].defaults


MAX_LAYERS = 4096
MAX_PARAMETERS = 2**41  # ~2.2e12, above the largest dense model


def _non_negative_number(key: str, value: Any) -> None:
    if not _is_number(value) or value < 0:
        raise XatlConfigError(f"{key} must be a number >= 0, got {_shown(value)}", key)


def _fraction(key: str, value: Any) -> None:
    if not _is_number(value) or not 0 <= value <= 1:
        raise XatlConfigError(f"{key} must be a number from 0 to 1, got {_shown(value)}", key)


def _token_id(key: str, value: Any) -> None:
    ids = value if isinstance(value, list) else [value]
    if value is not None and not all(_is_int(item) for item in ids):
        raise XatlConfigError(f"{key} must be a token id, a list of them, or null; got {_shown(value)}", key)


def _settings(key: str, value: Any) -> None:
    if value is not None and not isinstance(value, dict):
        raise XatlConfigError(f"{key} must be a mapping of settings, got {_shown(value)}", key)


def _norm_type(key: str, value: Any) -> None:
    if value not in NORM_TYPES:
        raise XatlConfigError(f"{key} must be one of {list(NORM_TYPES)}, got {_shown(value)}", key)


def _activation(key: str, value: Any) -> None:
    if isinstance(value, str) and value in ACT2FN:
        return
    near = difflib.get_close_matches(str(value), list(ACT2FN), n=1)
    hint = f"did you mean {near[0]!r}?" if near else "e.g. gelu, silu, relu"
    raise XatlConfigError(f"{key} {_shown(value)} is not an activation that transformers knows; {hint}", key)


def _layer_kinds(key: str, value: Any) -> None:
    if value is not None and not (isinstance(value, list) and all(isinstance(kind, str) for kind in value)):
        raise XatlConfigError(f"{key} must be a list of {list(LAYER_TYPES)}, got {_shown(value)}", key)


def _choice(choices: tuple[str, ...], optional: bool = False) -> Check:
    def check(key: str, value: Any) -> None:
        if (value is None and optional) or value in choices:
            return
        near = difflib.get_close_matches(str(value), choices, n=1)
        hint = f"; did you mean {near[0]!r}?" if near else ""
        allowed = [*choices, "null"] if optional else list(choices)
        raise XatlConfigError(f"{key} must be one of {allowed}, got {_shown(value)}{hint}", key)

    return check


def _list_of(kinds: tuple[str, ...] | None) -> Check:
    """A list per layer: of the given names, or (kinds None) of 0/1 flags; None means 'the default for every layer'."""

    def check(key: str, value: Any) -> None:
        if value is None:
            return
        if kinds is None:
            if isinstance(value, list) and all(_is_int(item) and item in (0, 1) for item in value):
                return
            raise XatlConfigError(
                f"{key} must be a list of 0/1 flags (one per layer) or null, got {_shown(value)}", key
            )
        if not (isinstance(value, list) and all(item in kinds for item in value)):
            raise XatlConfigError(f"{key} must be a list of {list(kinds)} (one per layer) or null, got {_shown(value)}",
                                  key)  # fmt: skip

    return check


def _non_negative_int(key: str, value: Any) -> None:
    if not _is_int(value) or value < 0:
        raise XatlConfigError(f"{key} must be an integer >= 0, got {_shown(value)}", key)


# The check of each kind of value (config_keys_xatl declares each key's kind once).
KIND_CHECKS: dict[str, Check] = {
    "int": _positive_int(),
    "layers": _positive_int(MAX_LAYERS),
    "int?": _optional(_positive_int()),
    "int>=0": _non_negative_int,
    "number": _positive_number,
    "number?": _optional(_positive_number),
    "number>=0": _non_negative_number,
    "fraction?": _optional(_fraction),
    "bool": _bool,
    "norm": _norm_type,
    "norm_layout": _choice(NORM_LAYOUTS),
    "qk_norm": _choice(QK_NORMS, optional=True),
    "positions": _choice(POSITION_EMBEDDINGS),
    "attention_types": _list_of(ATTENTION_TYPES),
    "flags?": _list_of(None),
    "dict?": _settings,
    "token": _token_id,
    "activation": _activation,
}
# Every top-level key XatlConfig takes, with the check of its value on its own (the rules that relate keys are in
# XatlConfig._check): the declared keys by their kind, layer_types, and each registered mixer's settings group.
CONFIG_CHECKS: dict[str, Check] = {
    **{key: KIND_CHECKS[declared.kind] for key, declared in MODEL_KEYS.items()},
    "layer_types": _layer_kinds,
    **{name: _settings for name in MIXERS},  # each mixer's settings, as its registry entry declares them
}
# Arguments read only at construction (legacy spellings and layer_types, checked on their own in _check).
_CONSTRUCTION_ONLY = ("layer_types", *CONSTRUCTION_ONLY)
# What a too-large parameter count can come from, in the order a caller should suspect them.
_SIZE_KEYS = ("hidden_size", "intermediate_size", "num_hidden_layers", "vocab_size",
              *(key for spec in MIXERS.values() for key in spec.size_keys))  # fmt: skip


def check_config_values(values: dict[str, Any]) -> None:
    """Refuse a wrong type or range for each key given, in the order given, so the first error is the first bad key.

    Mappings and `--set` run this on their values before building a config, and `XatlConfig` on its arguments, so
    that a bad value is named as such rather than failing later as an arithmetic error or a model that cannot run.
    Keys it does not declare (transformers' own) are left to transformers.
    """
    for key, value in values.items():
        if key in CONFIG_CHECKS:
            CONFIG_CHECKS[key](key, value)
        if key in MIXERS and isinstance(value, dict):
            MIXERS[key].check_values(value)


class XatlConfig(PreTrainedConfig):
    """Embeddings → blocks (norm → mixer, norm → MLP, parallel or sequential residual) → final norm → head.

    `layer_types[i]` picks layer i's mixer ("attention", "mamba" or "mamba2"). `mamba` holds mamba-ssm's Mamba (v1)
    mixer arguments, merged over `MAMBA_DEFAULTS` and with `dt_rank` resolved, so config.json is explicit about every
    shape. `mamba2` holds mamba-ssm's Mamba2 mixer arguments, merged over `MAMBA2_DEFAULTS`; when a layer is
    "mamba2", expand * hidden_size must be divisible by `headdim` and by `ngroups`.

    Family features (each off by default): `norm_weight_offset` (Gemma's (1 + w) norms), `norm_layout` (pre, post or
    sandwich norms), `qk_norm` (per head or full width), `attention_multiplier` (the softmax scale, default
    head_dim ** -0.5), `attn_logit_softcapping` and `final_logit_softcapping` (Gemma 2), `sliding_window` with
    `attention_types` (per layer "full_attention" or "sliding_attention"; every attention layer slides when
    attention_types is null), `position_embedding_type` "learned" with `position_embedding_offset` (GPT-2, OPT),
    `rope_interleaved` (GPT-J), `no_rope_layers` (SmolLM3's per-layer flags: 1 = RoPE, 0 = none),
    `sliding_rope_parameters` (Gemma 3's RoPE of sliding layers), `lm_head_bias`, and Granite's
    `embedding_multiplier`, `residual_multiplier`, `logits_scaling` (logits are divided by it).

    RoPE is described by a flat transformers-style `rope_parameters` dict (`rope_type`, `rope_theta`, optional
    `partial_rotary_factor`, and the type's own keys, e.g. llama3's `factor`, `low_freq_factor`, `high_freq_factor`,
    `original_max_position_embeddings`); it is what config.json stores. The legacy `rope_theta=` and
    `partial_rotary_factor=` arguments (older config.json files) build the default one, `rope_scaling=` is read as
    an alias of `rope_parameters`; `rope_theta` and `partial_rotary_factor` stay readable as properties.

    Every value is checked at construction and on save (sizes are positive integers within sane bounds, flags are
    real booleans, ...): a bad one raises XatlConfigError, a ValueError that names the key.
    """

    model_type = "xatl"

    def __init__(self, **kwargs: Any) -> None:
        """Each key of `MODEL_KEYS` (its default where not given), `layer_types`, each registered mixer's settings
        group (`mamba`, `mamba2`, `gated_deltanet`, ...), and transformers' own keys, all as keywords."""
        # Before any value is used: `hidden_size // num_attention_heads` or `[...] * num_hidden_layers` must not be
        # where a bad value first shows. Checked in the declared order, so the first bad key given is named.
        values = {key: kwargs.pop(key, copy.deepcopy(declared.default)) for key, declared in MODEL_KEYS.items()}
        layer_types = kwargs.pop("layer_types", None)
        mixer_settings = {name: kwargs.pop(name, None) for name in MIXERS}
        check_config_values({**values, "layer_types": layer_types, **mixer_settings})
        stored = {key: value for key, value in values.items() if key not in CONSTRUCTION_ONLY}
        token_ids = {key: stored.pop(key) for key in ("pad_token_id", "bos_token_id", "eos_token_id")}
        head_dim = stored.pop("head_dim")
        for key, value in stored.items():
            setattr(
                self, key, list(value) if isinstance(value, list | tuple) else value
            )  # the caller's list kept apart
        self.num_key_value_heads = values["num_key_value_heads"] or values["num_attention_heads"]
        if self.sliding_rope_parameters is not None:
            self.sliding_rope_parameters = self._build_rope_parameters(self.sliding_rope_parameters, None, None)
        # Set before super().__init__, which standardises it (e.g. fills llama3/yarn/longrope's
        # `original_max_position_embeddings` from max_position_embeddings when absent) and validates it.
        rope = values["rope_parameters"] if values["rope_parameters"] is not None else values["rope_scaling"]
        self.rope_parameters = self._build_rope_parameters(rope, values["rope_theta"], values["partial_rotary_factor"])
        hidden_size, heads = values["hidden_size"], values["num_attention_heads"]
        sizes = {"hidden_size": hidden_size, "num_attention_heads": heads, "head_dim": head_dim}
        for name, given in mixer_settings.items():
            setattr(self, name, MIXERS[name].merge(given, sizes))
        try:
            super().__init__(**token_ids, tie_word_embeddings=values["tie_word_embeddings"], **kwargs)
        except KeyError as error:  # transformers' RoPE validation raises KeyError for missing rope_parameters keys
            raise XatlConfigError(
                f"invalid rope_parameters {self.rope_parameters}: {error}", "rope_parameters"
            ) from error
        # Set after super().__init__: transformers 5 rewrites a config's `layer_types` there into its own
        # vocabulary ("mamba" → "linear_attention", "attention" → "full_attention"), which would lose ours.
        self.layer_types = list(layer_types) if layer_types is not None else ["mamba"] * values["num_hidden_layers"]
        # Also after super().__init__, whose RoPE validation rejects an odd head_dim; see `validate`.
        self.head_dim = head_dim or hidden_size // heads
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
            raise XatlConfigError(
                "rope_parameters must be one flat dict (per-layer-type RoPE is not supported), "
                f"got {_shown(rope_parameters)}",
                "rope_parameters",
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
                raise XatlConfigError(f"{key}={value} conflicts with rope_parameters[{key!r}]={params[key]}",
                                      key, "rope_parameters")  # fmt: skip
            params[key] = value
        params.setdefault("rope_theta", DEFAULT_ROPE_THETA)
        if params["rope_type"] not in SUPPORTED_ROPE_TYPES:
            raise XatlConfigError(
                f"unsupported rope_parameters['rope_type']={params['rope_type']!r}; "
                f"supported: {list(SUPPORTED_ROPE_TYPES)}",
                "rope_parameters",
            )
        _positive_number("rope_parameters.rope_theta", params["rope_theta"])
        _fraction("rope_parameters.partial_rotary_factor", params.get("partial_rotary_factor", 1.0))
        return params

    @property
    def mixer_sizes(self) -> dict[str, Any]:
        """The model-level values the mixers' sizes derive from (the registry's `Sizes`)."""
        return {"hidden_size": self.hidden_size, "num_attention_heads": self.num_attention_heads,
                "head_dim": self.head_dim}  # fmt: skip

    def mixer_dims(self, kind: str) -> dict[str, int]:
        """Derived sizes of mixer `kind` (d_inner, nheads, conv_dim, ...), from the registry."""
        return MIXERS[kind].dims(getattr(self, kind), self.mixer_sizes)

    def _parameter_estimate(self) -> int:
        """Roughly how many parameters the config describes: embeddings, head, and per layer its mixer and MLP."""
        h, layers = self.hidden_size, self.num_hidden_layers
        mixers = {"attention": h * self.head_dim * (2 * self.num_attention_heads + 2 * self.num_key_value_heads)}
        for name, spec in MIXERS.items():
            mixers[name] = spec.parameters(getattr(self, name), self.mixer_sizes)
        per_layer = 3 * h * self.intermediate_size + max(mixers[kind] for kind in set(self.layer_types) or {"mamba"})
        return 2 * self.vocab_size * h + layers * per_layer

    def _check_size(self) -> None:
        estimate = self._parameter_estimate()
        if estimate > MAX_PARAMETERS:
            raise XatlConfigError(
                f"the config describes about {estimate:.2g} parameters, more than any model this tool can write "
                f"({MAX_PARAMETERS:.2g}): check hidden_size={self.hidden_size}, intermediate_size="
                f"{self.intermediate_size}, num_hidden_layers={self.num_hidden_layers}, vocab_size={self.vocab_size} "
                "and the mixer's d_state and expand",
                *_SIZE_KEYS,
            )  # fmt: skip

    def _check(self) -> None:
        """Fail at construction rather than deep inside a forward pass (or on save, after attributes changed)."""
        stored = [key for key in CONFIG_CHECKS if key not in _CONSTRUCTION_ONLY and hasattr(self, key)]
        check_config_values({key: getattr(self, key) for key in stored})
        _layer_kinds("layer_types", self.layer_types)
        bad = [t for t in self.layer_types if t not in LAYER_TYPES]
        if bad:
            raise XatlConfigError(f"unknown layer_types entries {bad}; allowed: {list(LAYER_TYPES)}")
        if len(self.layer_types) != self.num_hidden_layers:
            raise XatlConfigError(
                f"layer_types has {len(self.layer_types)} entries but num_hidden_layers={self.num_hidden_layers}",
                "num_hidden_layers",
            )
        for kind in dict.fromkeys(self.layer_types):
            if kind in MIXERS:
                MIXERS[kind].validate(getattr(self, kind), self.mixer_sizes)
        for key in ("attention_types", "no_rope_layers"):
            value = getattr(self, key, None)
            if value is not None and len(value) != self.num_hidden_layers:
                raise XatlConfigError(f"{key} has {len(value)} entries but num_hidden_layers={self.num_hidden_layers}",
                                      key, "num_hidden_layers")  # fmt: skip
        if self.qk_norm == "full" and self.norm_type != "rmsnorm":
            raise XatlConfigError("qk_norm: full needs norm_type: rmsnorm (OLMo2's q/k norm)", "qk_norm", "norm_type")
        rope_type = self.rope_parameters.get("rope_type")
        if rope_type not in SUPPORTED_ROPE_TYPES:
            raise XatlConfigError(
                f"unsupported rope_parameters['rope_type']={rope_type!r}; supported: {list(SUPPORTED_ROPE_TYPES)}",
                "rope_parameters",
            )
        if self.num_attention_heads % self.num_key_value_heads != 0:
            raise XatlConfigError(
                f"num_attention_heads={self.num_attention_heads} is not a multiple of "
                f"num_key_value_heads={self.num_key_value_heads}",
                "num_key_value_heads", "num_attention_heads",
            )  # fmt: skip
        self._check_size()

    def validate(self) -> None:
        """Run transformers' validators with `layer_types` hidden from them, then ours.

        transformers' strict validator (run by __init__ and save_pretrained) accepts only its own layer-type names.
        Its RoPE check (an even rotary dimension) reads `head_dim`, which is hidden too when no layer is attention:
        RoPE is unused then, and Mamba-only configs may have any hidden_size / num_attention_heads.
        """
        if "attention" in getattr(self, "layer_types", ()) and "head_dim" in self.__dict__:
            rotary_dim = int(self.head_dim * self.rope_parameters.get("partial_rotary_factor", 1.0))
            if rotary_dim + rotary_dim % 2 > self.head_dim:  # inv_freq has ceil(rotary_dim / 2) entries
                raise XatlConfigError(
                    f"RoPE needs an even rotary dimension: head_dim={self.head_dim} with partial_rotary_factor="
                    f"{self.rope_parameters.get('partial_rotary_factor', 1.0)} rotates {rotary_dim} dims",
                    "head_dim", "partial_rotary_factor", "rope_parameters",
                )  # fmt: skip
        layer_types = self.__dict__.pop("layer_types", None)
        hidden: dict[str, Any] = {}
        if layer_types is not None and "attention" not in layer_types and "head_dim" in self.__dict__:
            hidden["head_dim"] = self.__dict__.pop("head_dim")
        try:
            parent_validate = getattr(super(), "validate", None)
            if parent_validate is not None:
                parent_validate()
        except KeyError as error:  # transformers' RoPE validation raises KeyError for missing rope_parameters keys
            raise XatlConfigError(
                f"invalid rope_parameters {self.rope_parameters}: {error}", "rope_parameters"
            ) from error
        finally:
            self.__dict__.update(hidden)
            if layer_types is not None:
                self.layer_types = layer_types
        if layer_types is not None:  # None while super().__init__ runs, before layer_types is set
            self._check()
