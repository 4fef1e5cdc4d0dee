"""The LCI mixers of the xatl family, each declared once: the registry that configuration, mapping schema, plan,
cache, kernel dispatch, verify and the exports read.

An entry says everything about a mixer that is not its PyTorch code: its config settings (default, kind, meaning,
check), the cross-key rules, its derived dimensions, the named row blocks of its fused tensors (the transfers it
accepts: a `part:` rule may fill only a block declared here, e.g. Gated DeltaNet's q, k, v from W_Q, W_K, W_V), its
generation state shapes, the kernel functions of its kernel path (and where the packages keep them), and the export
formats that hold it (an allow-list: a format not named here refuses the mixer). Its module is the class of that
name in modeling_xatl, which owns its init.

Self-contained (the stdlib only, no torch): copied into every converted folder beside configuration_xatl, and read
by the mapping schema without importing torch.
"""

from __future__ import annotations

import difflib
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

# Sanity bounds, far above any real model: a typo or a runaway expression must fail here, not as a 38 TB allocation.
MAX_DIMENSION = 2**24
MAX_D_STATE = 2**16

Check = Callable[[str, Any], None]
Sizes = Mapping[str, Any]  # the model-level values a mixer's sizes derive from: hidden_size, num_attention_heads, ...


class XatlConfigError(ValueError):
    """A config value the model cannot be built with; `keys` (dotted, e.g. mamba.d_conv) say which to change."""

    def __init__(self, message: str, *keys: str) -> None:
        super().__init__(message)
        self.keys = keys


# --------------------------------------------------------------------------------------------------------------
# Value checks, by kind (the kinds are also the mapping schema's JSON types)
# --------------------------------------------------------------------------------------------------------------


def shown(value: Any) -> str:
    """A value as a user would type it: short floats, true/false, quoted strings."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return f"{value:.6g}"
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)  # true/false are not sizes


def is_number(value: Any) -> bool:
    return (is_int(value) or isinstance(value, float)) and math.isfinite(value)


def positive_int(limit: int = MAX_DIMENSION) -> Check:
    def check(key: str, value: Any) -> None:
        if not is_int(value) or value <= 0:
            raise XatlConfigError(f"{key} must be a positive integer, got {shown(value)}", key)
        if value > limit:
            raise XatlConfigError(f"{key}={value} is larger than any real model's (at most {limit})", key)

    return check


def optional(check: Check) -> Check:
    """None means 'derive it' (head_dim, num_key_value_heads, a mixer's heads, ...)."""
    return lambda key, value: None if value is None else check(key, value)


def positive_number(key: str, value: Any) -> None:
    if not is_number(value) or value <= 0:
        raise XatlConfigError(f"{key} must be a positive number, got {shown(value)}", key)


def boolean(key: str, value: Any) -> None:
    if not isinstance(value, bool):
        raise XatlConfigError(f"{key} must be true or false, got {shown(value)}", key)


def init_range(key: str, value: Any) -> None:
    if not (isinstance(value, list | tuple) and len(value) == 2 and all(is_number(item) for item in value)):
        raise XatlConfigError(f"{key} must be two numbers [low, high], got {shown(value)}", key)


def dt_rank(key: str, value: Any) -> None:
    if value != "auto":
        positive_int()(key, value)


SETTING_CHECKS: dict[str, Check] = {
    "int": positive_int(),
    "int?": optional(positive_int()),
    "state": positive_int(MAX_D_STATE),
    "number": positive_number,
    "bool": boolean,
    "range": init_range,
    "dt_rank": dt_rank,
}


@dataclass(frozen=True)
class Setting:
    """One mixer setting: its default, its kind (a key of SETTING_CHECKS), and what it means (shown in the schema)."""

    default: Any
    kind: str
    meaning: str
    follows: str | None = None  # a model-level key whose value a conversion gives it unless set (norm_eps)

    def check(self, key: str, value: Any) -> None:
        SETTING_CHECKS[self.kind](key, value)


def _blocks(sizes: list[tuple[str, int]]) -> dict[str, tuple[int, int]]:
    """name → (first row, end row) for consecutive row blocks of the given sizes."""
    blocks, start = {}, 0
    for name, size in sizes:
        blocks[name] = (start, start + size)
        start += size
    return blocks


@dataclass(frozen=True)
class MixerSpec:
    """One LCI mixer. The callables take the mixer's merged settings and the model-level sizes (`Sizes`)."""

    name: str  # the layer type, and the config key of its settings
    title: str  # how a message or a recipe names it
    module: str  # its class in modeling_xatl
    settings: dict[str, Setting]
    dims: Callable[[dict[str, Any], Sizes], dict[str, int]]
    parts: Callable[[dict[str, Any], Sizes], dict[str, dict[str, tuple[int, int]]]]
    state_shapes: Callable[[dict[str, Any], Sizes], tuple[tuple[int, ...], tuple[int, ...]]]  # conv, recurrent
    parameters: Callable[[dict[str, Any], Sizes], int]  # per layer, roughly: what a too-large config is told
    kernels: dict[str, tuple[str, str]]  # kernel function → (package, module inside it) that defines it
    scan_kernel: str  # the function whose presence means real kernels serve this mixer
    formats: tuple[str, ...]  # export formats that hold it
    resolve: Callable[[dict[str, Any], Sizes], dict[str, Any]] = lambda settings, sizes: settings
    validate: Callable[[dict[str, Any], Sizes], None] = lambda settings, sizes: None
    size_keys: tuple[str, ...] = ()
    kernel_limits: dict[str, int] = field(default_factory=dict)  # setting → the largest value the kernels take
    # The sibling file (models/NAME.py, shipped with the model) whose functions of the kernels' own names are their
    # CPU stand-ins; the shared causal-conv1d kernels' stand-ins are kernels_xatl's.
    stand_ins: str = "kernels_xatl"

    @property
    def defaults(self) -> dict[str, Any]:
        return {key: setting.default for key, setting in self.settings.items()}

    def check_values(self, settings: Mapping[str, Any]) -> None:
        """Each known value on its own (unknown keys are refused by `merge`)."""
        for key, value in settings.items():
            if key in self.settings:
                self.settings[key].check(f"{self.name}.{key}", value)
        low, high = settings.get("dt_min"), settings.get("dt_max")
        if is_number(low) and is_number(high) and high < low:
            raise XatlConfigError(f"{self.name}.dt_max={shown(high)} is below {self.name}.dt_min={shown(low)}",
                                  f"{self.name}.dt_max", f"{self.name}.dt_min")  # fmt: skip

    def merge(self, given: Mapping[str, Any] | None, sizes: Sizes) -> dict[str, Any]:
        """The defaults with `given` over them, derived settings resolved; an unknown key is refused by name."""
        unknown = sorted(set(given or {}) - set(self.settings))
        if unknown:
            near = difflib.get_close_matches(unknown[0], list(self.settings), n=1)
            hint = f"; did you mean {near[0]!r}?" if near else ""
            raise XatlConfigError(f"unknown {self.name} config keys {unknown}{hint}; known: {sorted(self.settings)}",
                                  *(f"{self.name}.{key}" for key in unknown))  # fmt: skip
        merged = {key: _plain(value) for key, value in {**self.defaults, **(given or {})}.items()}
        self.check_values(merged)
        return self.resolve(merged, sizes)

    def outside_kernel_limits(self, settings: Mapping[str, Any]) -> str | None:
        """Why the kernels cannot run a mixer of these settings (causal-conv1d takes widths 2 to 4), or None."""
        d_conv = settings.get("d_conv")
        if d_conv is not None and not 2 <= d_conv <= 4:
            return f"{self.name}.d_conv {d_conv} is outside causal-conv1d's widths 2 to 4"
        for key, limit in self.kernel_limits.items():
            if settings.get(key, 0) > limit:
                return f"{self.name}.{key} {settings[key]} is above the {limit} the {self.title} kernels take"
        return None


def _plain(value: Any) -> Any:
    """A list of its own (a tuple would not survive JSON; a shared default list must not be changed through one)."""
    return list(value) if isinstance(value, list | tuple) else value


def _dt_settings() -> dict[str, Setting]:
    return {
        "dt_min": Setting(0.001, "number", "smallest initial step size dt"),
        "dt_max": Setting(0.1, "number", "largest initial step size dt (at least dt_min)"),
        "dt_init_floor": Setting(1e-4, "number", "floor of the initial dt"),
    }


_CONV = ("causal_conv1d", "causal_conv1d_interface")
CONV_KERNELS = {"causal_conv1d_fn": _CONV, "causal_conv1d_update": _CONV}


# --------------------------------------------------------------------------------------------------------------
# Mamba (v1): mamba-ssm's selective SSM
# --------------------------------------------------------------------------------------------------------------


def _mamba_resolve(settings: dict[str, Any], sizes: Sizes) -> dict[str, Any]:
    if settings["dt_rank"] == "auto":
        settings["dt_rank"] = math.ceil(sizes["hidden_size"] / 16)
    return settings


def _mamba_dims(m: dict[str, Any], sizes: Sizes) -> dict[str, int]:
    return {"d_inner": m["expand"] * sizes["hidden_size"]}


def _mamba_parts(m: dict[str, Any], sizes: Sizes) -> dict[str, dict[str, tuple[int, int]]]:
    d_inner = _mamba_dims(m, sizes)["d_inner"]
    return {"in_proj.weight": _blocks([("x", d_inner), ("z", d_inner)])}


def _mamba_parameters(m: dict[str, Any], sizes: Sizes) -> int:
    h = sizes["hidden_size"]
    rank = m["dt_rank"] if is_int(m["dt_rank"]) else math.ceil(h / 16)
    return m["expand"] * h * (3 * h + m["d_conv"] + 2 * rank + 3 * m["d_state"])


MAMBA = MixerSpec(
    name="mamba",
    title="Mamba (v1)",
    module="XatlMamba",
    settings={
        "d_state": Setting(16, "state", "SSM state size per channel (N)"),
        "d_conv": Setting(4, "int", "width of the causal depthwise convolution"),
        "expand": Setting(2, "int", "d_inner = expand * hidden_size (1 lets W_O fill out_proj)"),
        "dt_rank": Setting("auto", "dt_rank", "rank of the dt projection; auto = ceil(hidden_size / 16)"),
        **_dt_settings(),
        "dt_scale": Setting(1.0, "number", "scale of the dt projection's initial weights"),
        "conv_bias": Setting(True, "bool", "the convolution has a bias"),
        "proj_bias": Setting(False, "bool", "in_proj has a bias"),
        "out_proj_bias": Setting(False, "bool", "out_proj has a bias (true to hold the attention output's bias)"),
    },
    dims=_mamba_dims,
    parts=_mamba_parts,
    state_shapes=lambda m, sizes: (
        (_mamba_dims(m, sizes)["d_inner"], m["d_conv"]),
        (_mamba_dims(m, sizes)["d_inner"], m["d_state"]),
    ),
    parameters=_mamba_parameters,
    kernels={
        **CONV_KERNELS,
        "selective_scan_fn": ("mamba_ssm", "ops.selective_scan_interface"),
        "selective_state_update": ("mamba_ssm", "ops.triton.selective_state_update"),
    },
    scan_kernel="selective_scan_fn",
    formats=("mamba-ssm",),
    resolve=_mamba_resolve,
    size_keys=("mamba.d_state", "mamba.expand", "mamba.d_conv"),
    kernel_limits={"d_state": 256},
)


# --------------------------------------------------------------------------------------------------------------
# Mamba2: mamba-ssm's SSD mixer
# --------------------------------------------------------------------------------------------------------------


def _mamba2_dims(m: dict[str, Any], sizes: Sizes) -> dict[str, int]:
    d_inner = m["expand"] * sizes["hidden_size"]
    return {
        "d_inner": d_inner,
        "nheads": d_inner // m["headdim"],
        "conv_dim": d_inner + 2 * m["ngroups"] * m["d_state"],
    }


def _mamba2_validate(m: dict[str, Any], sizes: Sizes) -> None:
    hidden = sizes["hidden_size"]
    d_inner = m["expand"] * hidden
    if d_inner % m["headdim"] != 0:
        raise XatlConfigError(
            f"mamba2: d_inner = expand * hidden_size = {m['expand']} * {hidden} = {d_inner} "
            f"is not divisible by headdim={m['headdim']}",
            "mamba2.headdim", "mamba2.expand", "hidden_size",
        )  # fmt: skip
    if d_inner % m["ngroups"] != 0:
        raise XatlConfigError(f"mamba2: d_inner={d_inner} is not divisible by ngroups={m['ngroups']}",
                              "mamba2.ngroups", "mamba2.expand", "hidden_size")  # fmt: skip
    nheads = d_inner // m["headdim"]
    if nheads % m["ngroups"] != 0:
        raise XatlConfigError(
            f"mamba2: nheads = d_inner / headdim = {nheads} is not divisible by ngroups={m['ngroups']}",
            "mamba2.ngroups", "mamba2.headdim",
        )  # fmt: skip
    _check_init_range("mamba2", m["A_init_range"])


def _check_init_range(name: str, value: list[float]) -> None:
    low, high = value
    if not 0 < low <= high:
        raise XatlConfigError(f"{name}: A_init_range must satisfy 0 < low <= high, got {value}",
                              f"{name}.A_init_range")  # fmt: skip


def _mamba2_parts(m: dict[str, Any], sizes: Sizes) -> dict[str, dict[str, tuple[int, int]]]:
    dims = _mamba2_dims(m, sizes)
    d_inner, group_rows = dims["d_inner"], m["ngroups"] * m["d_state"]
    in_proj = _blocks([("z", d_inner), ("x", d_inner), ("B", group_rows), ("C", group_rows), ("dt", dims["nheads"])])
    conv = _blocks([("x", d_inner), ("B", group_rows), ("C", group_rows)])
    return {"in_proj.weight": in_proj, "conv1d.weight": conv, "conv1d.bias": conv}


def _mamba2_parameters(m: dict[str, Any], sizes: Sizes) -> int:
    dims = _mamba2_dims(m, sizes)
    return (
        sizes["hidden_size"] * (2 * dims["d_inner"] + dims["conv_dim"] + dims["nheads"])
        + dims["conv_dim"] * m["d_conv"]
    )


MAMBA2 = MixerSpec(
    name="mamba2",
    title="Mamba2",
    module="XatlMamba2",
    settings={
        "d_state": Setting(128, "state", "SSM state size per group (N)"),
        "d_conv": Setting(4, "int", "width of the causal depthwise convolution"),
        "expand": Setting(2, "int", "d_inner = expand * hidden_size, which headdim and ngroups must divide"),
        "headdim": Setting(64, "int", "channels per SSM head (nheads = d_inner / headdim)"),
        "ngroups": Setting(1, "int", "groups sharing B and C; must divide nheads"),
        "chunk_size": Setting(256, "int", "chunk length of the SSD scan"),
        "A_init_range": Setting([1, 16], "range", "[low, high] of the initial A, 0 < low <= high"),
        **_dt_settings(),
        "conv_bias": Setting(True, "bool", "the convolution has a bias"),
        "proj_bias": Setting(False, "bool", "in_proj has a bias"),
        "out_proj_bias": Setting(False, "bool", "out_proj has a bias (true to hold the attention output's bias)"),
        "norm_before_gate": Setting(False, "bool", "normalise before the z gate rather than after"),
        # mamba-ssm fixes 1e-5, transformers' Mamba2 hybrids use the model's rms_norm_eps. A conversion sets the
        # source's norm_eps; 1e-5 is what folders written before the key existed computed.
        "norm_eps": Setting(
            1e-5,
            "number",
            "epsilon of the gated RMSNorm; a conversion sets the source's norm eps (1e-5: older folders)",
            follows="norm_eps",
        ),
    },
    dims=_mamba2_dims,
    parts=_mamba2_parts,
    state_shapes=lambda m, sizes: (
        (_mamba2_dims(m, sizes)["conv_dim"], m["d_conv"]),
        (_mamba2_dims(m, sizes)["nheads"], m["headdim"], m["d_state"]),
    ),
    parameters=_mamba2_parameters,
    kernels={
        **CONV_KERNELS,
        "selective_state_update": ("mamba_ssm", "ops.triton.selective_state_update"),
        "mamba_chunk_scan_combined": ("mamba_ssm", "ops.triton.ssd_combined"),
    },
    scan_kernel="mamba_chunk_scan_combined",
    formats=("granitemoehybrid", "bamba", "mamba-ssm", "gguf"),
    validate=_mamba2_validate,
    size_keys=("mamba2.d_state", "mamba2.expand", "mamba2.ngroups", "mamba2.d_conv"),
)


# --------------------------------------------------------------------------------------------------------------
# Gated DeltaNet: delta-rule linear attention (Yang, Kautz, Hatamizadeh 2025), as Qwen3-Next and fla compute it
# --------------------------------------------------------------------------------------------------------------


def _gdn_resolve(g: dict[str, Any], sizes: Sizes) -> dict[str, Any]:
    """Heads left null take the attention's shape, so W_Q, W_K, W_V and W_O fit without reshaping."""
    heads = sizes["num_attention_heads"]
    head_dim = sizes.get("head_dim") or sizes["hidden_size"] // heads
    g["num_heads"] = g["num_heads"] or heads
    g["head_k_dim"] = g["head_k_dim"] or head_dim
    g["num_v_heads"] = g["num_v_heads"] or g["num_heads"]
    g["head_v_dim"] = g["head_v_dim"] or g["head_k_dim"]
    return g


def _gdn_dims(g: dict[str, Any], sizes: Sizes) -> dict[str, int]:
    key_dim, value_dim = g["num_heads"] * g["head_k_dim"], g["num_v_heads"] * g["head_v_dim"]
    return {"key_dim": key_dim, "value_dim": value_dim, "conv_dim": 2 * key_dim + value_dim}


def _gdn_validate(g: dict[str, Any], sizes: Sizes) -> None:
    if g["num_v_heads"] % g["num_heads"] != 0:
        raise XatlConfigError(
            f"gated_deltanet: num_v_heads={g['num_v_heads']} is not a multiple of num_heads={g['num_heads']} "
            "(each query/key head serves num_v_heads / num_heads value heads)",
            "gated_deltanet.num_v_heads", "gated_deltanet.num_heads",
        )  # fmt: skip
    _check_init_range("gated_deltanet", g["A_init_range"])


def _gdn_parts(g: dict[str, Any], sizes: Sizes) -> dict[str, dict[str, tuple[int, int]]]:
    dims = _gdn_dims(g, sizes)
    key, value, heads = dims["key_dim"], dims["value_dim"], g["num_v_heads"]
    in_proj = _blocks([("q", key), ("k", key), ("v", value), ("z", value), ("b", heads), ("a", heads)])
    conv = _blocks([("q", key), ("k", key), ("v", value)])
    return {"in_proj.weight": in_proj, "in_proj.bias": in_proj, "conv1d.weight": conv, "conv1d.bias": conv}


def _gdn_parameters(g: dict[str, Any], sizes: Sizes) -> int:
    dims = _gdn_dims(g, sizes)
    projected = dims["conv_dim"] + 2 * dims["value_dim"] + 2 * g["num_v_heads"]
    return sizes["hidden_size"] * projected + dims["conv_dim"] * g["d_conv"] + g["head_v_dim"]


GATED_DELTANET = MixerSpec(
    name="gated_deltanet",
    title="Gated DeltaNet",
    module="XatlGatedDeltaNet",
    settings={
        "num_heads": Setting(None, "int?", "query/key heads; null: the attention's num_attention_heads"),
        "head_k_dim": Setting(None, "int?", "width of a query/key head; null: the attention's head_dim"),
        "num_v_heads": Setting(None, "int?", "value heads, a multiple of num_heads; null: num_heads"),
        "head_v_dim": Setting(None, "int?", "width of a value head; null: head_k_dim"),
        "d_conv": Setting(4, "int", "width of the causal depthwise convolution over q, k and v"),
        "chunk_size": Setting(64, "int", "chunk length of the chunked delta rule (prefill and training)"),
        "A_init_range": Setting([0.01, 16], "range", "[low, high] of the initial decay rate A, 0 < low <= high"),
        **_dt_settings(),
        "conv_bias": Setting(False, "bool", "the convolution has a bias (Qwen3-Next's has none)"),
        "proj_bias": Setting(False, "bool", "in_proj has a bias (true to hold the attention's q/k/v biases)"),
        "out_proj_bias": Setting(False, "bool", "out_proj has a bias (true to hold the attention output's bias)"),
        "norm_eps": Setting(
            1e-5, "number", "epsilon of the gated output RMSNorm; a conversion sets the source's", follows="norm_eps"
        ),
    },
    dims=_gdn_dims,
    parts=_gdn_parts,
    state_shapes=lambda g, sizes: (
        (_gdn_dims(g, sizes)["conv_dim"], g["d_conv"]),
        (g["num_v_heads"], g["head_k_dim"], g["head_v_dim"]),
    ),
    parameters=_gdn_parameters,
    kernels={
        **CONV_KERNELS,
        "chunk_gated_delta_rule": ("fla", "ops.gated_delta_rule"),
        "fused_recurrent_gated_delta_rule": ("fla", "ops.gated_delta_rule"),
    },
    scan_kernel="chunk_gated_delta_rule",
    stand_ins="delta_rule_xatl",
    formats=("qwen3_next",),
    resolve=_gdn_resolve,
    validate=_gdn_validate,
    size_keys=("gated_deltanet.num_heads", "gated_deltanet.num_v_heads", "gated_deltanet.head_v_dim"),
)


MIXERS: dict[str, MixerSpec] = {spec.name: spec for spec in (MAMBA, MAMBA2, GATED_DELTANET)}
ATTENTION = "attention"
LAYER_TYPES: tuple[str, ...] = (ATTENTION, *MIXERS)
KERNEL_MODULES: dict[str, tuple[str, str]] = {
    name: where for spec in MIXERS.values() for name, where in spec.kernels.items()
}


def formats_refusing(layer_types: list[str], format: str) -> list[str]:
    """One reason per mixer kind in `layer_types` that `format` does not hold (the allow-list), or []."""
    reasons = []
    for kind in dict.fromkeys(layer_types):
        spec = MIXERS.get(kind)
        if spec is not None and format not in spec.formats:
            holders = ", ".join(spec.formats) or "none yet"
            reasons.append(f"it has {spec.title} layers, which {format} cannot hold (formats that can: {holders})")
    return reasons
