"""The `xatl` decoder family: a Transformer block skeleton with a per-layer mixer (attention, Mamba or Mamba2).

Self-contained on purpose (torch, transformers and the stdlib only): this file, with the three it imports, is
copied into every converted model folder and loaded with `trust_remote_code=True` where `xatl_convert` is not
installed. Each Mamba / Mamba2 mixer has two paths: the readable reference path (`scans_xatl`) and the kernel call
path, which calls mamba-ssm's and causal-conv1d's functions exactly as mamba-ssm's modules do, through the one
dispatch point in `kernels_xatl` (real kernels on CUDA, signature-identical stand-ins elsewhere).
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers import GenerationMixin, PreTrainedModel
from transformers.activations import ACT2FN
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

from .configuration_xatl import XatlConfig
from .delta_rule_xatl import chunk_gated_delta_rule_reference, recurrent_gated_delta_rule_reference
from .kernels_xatl import (
    KernelSet,
    kernel_path,
    kernels_available,
    kernels_for,
    outside_kernel_limits,
    reference_path,
)
from .mixers_xatl import MIXERS
from .scans_xatl import compute_dtype, selective_scan_chunked, selective_scan_reference, ssd_chunk_scan_reference

# Marks set on nn.Linear modules so that `init_xatl_weights` can initialise each module on its own, in any order.
_INIT_ROLE = "_xatl_init_role"
_RESIDUAL_OUT = "residual_out"  # out_proj of a mixer, mlp.fc2: scaled down like mamba-ssm's prenorm rescale
_DT_PROJ = "dt_proj"  # Mamba's dt_proj: mamba-ssm's dt init, bias never zeroed


# --------------------------------------------------------------------------------------------------------------
# Inference cache
# --------------------------------------------------------------------------------------------------------------


class XatlCache:
    """Per-layer generation state of an `XatlForCausalLM`; what `forward(..., use_cache=True)` returns.

    Layer i holds, batch first (mamba-ssm's `allocate_inference_cache` layouts):
      - "mamba":     conv_states[i] (batch, d_inner, d_conv), ssm_states[i] (batch, d_inner, d_state);
      - "mamba2":    conv_states[i] (batch, conv_dim, d_conv), ssm_states[i] (batch, nheads, headdim, d_state),
                     conv_dim = d_inner + 2 * ngroups * d_state;
      - "gated_deltanet": conv_states[i] (batch, 2 * key_dim + value_dim, d_conv), ssm_states[i] (batch,
                     num_v_heads, head_k_dim, head_v_dim), fla's recurrent state;
      - "attention": key_cache[i], value_cache[i] (batch, kv_heads, seen_tokens, head_dim), keys after RoPE.
    Each mixer's shapes come from its registry entry (`state_shapes`).
    conv_states[i][..., -1] is the newest input. Recurrent states have a fixed size; only attention grows, by one
    column per token. `seen_tokens` counts the tokens processed; the rotary positions of new tokens start there.
    Conv and KV tensors use `dtype`, SSM states `ssm_dtype` (default: `dtype`, as mamba-ssm).
    """

    is_compileable = False  # read by transformers' generate
    is_croppable = False  # recurrent states cannot be rolled back (no assisted generation)

    def __init__(
        self,
        config: XatlConfig,
        batch_size: int,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
        ssm_dtype: torch.dtype | None = None,
    ) -> None:
        self.layer_types = list(config.layer_types)
        self.batch_size = batch_size
        self.seen_tokens = 0
        ssm_dtype = ssm_dtype or dtype
        n = len(self.layer_types)
        self.conv_states: list[torch.Tensor | None] = [None] * n
        self.ssm_states: list[torch.Tensor | None] = [None] * n
        self.key_cache: list[torch.Tensor | None] = [None] * n
        self.value_cache: list[torch.Tensor | None] = [None] * n
        for i, kind in enumerate(self.layer_types):
            if kind in MIXERS:
                conv_shape, ssm_shape = MIXERS[kind].state_shapes(getattr(config, kind), config.mixer_sizes)
            else:
                kv_shape = (batch_size, config.num_key_value_heads, 0, config.head_dim)
                self.key_cache[i] = torch.zeros(kv_shape, dtype=dtype, device=device)
                self.value_cache[i] = torch.zeros(kv_shape, dtype=dtype, device=device)
                continue
            self.conv_states[i] = torch.zeros(batch_size, *conv_shape, dtype=dtype, device=device)
            self.ssm_states[i] = torch.zeros(batch_size, *ssm_shape, dtype=ssm_dtype, device=device)

    @property
    def is_linear(self) -> list[bool]:
        """Per layer: True for a fixed-size recurrent state (read by transformers' generate)."""
        return [kind != "attention" for kind in self.layer_types]

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.seen_tokens

    def update_attention(
        self, layer_idx: int, key: torch.Tensor, value: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Append the new keys and values (batch, kv_heads, L, head_dim); return all of them so far."""
        keys = torch.cat([self.key_cache[layer_idx], key.to(self.key_cache[layer_idx].dtype)], dim=2)
        values = torch.cat([self.value_cache[layer_idx], value.to(self.value_cache[layer_idx].dtype)], dim=2)
        self.key_cache[layer_idx], self.value_cache[layer_idx] = keys, values
        return keys.to(key.dtype), values.to(value.dtype)

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        """Select batch rows (beam search)."""
        for states in (self.conv_states, self.ssm_states, self.key_cache, self.value_cache):
            for i, t in enumerate(states):
                if t is not None:
                    states[i] = t.index_select(0, beam_idx.to(t.device))
        self.batch_size = len(beam_idx)

    def _bytes(self, tensors: list[torch.Tensor | None], per_sequence: bool) -> int:
        total = sum(t.numel() * t.element_size() for t in tensors if t is not None)
        return total // max(self.batch_size, 1) if per_sequence else total

    def recurrent_bytes(self, per_sequence: bool = True) -> int:
        """Bytes of the LCI mixers' conv and recurrent states: fixed, whatever the number of tokens seen."""
        return self._bytes(self.conv_states + self.ssm_states, per_sequence)

    def kv_bytes(self, per_sequence: bool = True) -> int:
        """Bytes of the attention layers' keys and values: grows linearly with `seen_tokens`."""
        return self._bytes(self.key_cache + self.value_cache, per_sequence)

    def state_bytes(self, per_sequence: bool = True) -> int:
        """All the memory this cache holds now (recurrent + KV), per sequence by default or for the whole batch."""
        return self.recurrent_bytes(per_sequence) + self.kv_bytes(per_sequence)

    def __repr__(self) -> str:
        return (
            f"XatlCache(layers={self.layer_types}, batch_size={self.batch_size}, seen_tokens={self.seen_tokens}, "
            f"state_bytes_per_sequence={self.state_bytes()})"
        )


def new_cache(
    model_or_config: nn.Module | XatlConfig,
    batch_size: int,
    dtype: torch.dtype | None = None,
    device: torch.device | str | None = None,
) -> XatlCache:
    """An empty `XatlCache`; dtype and device default to the model's (fp32 / CPU for a config)."""
    if isinstance(model_or_config, nn.Module):
        param = next(model_or_config.parameters())
        config = model_or_config.config
        dtype, device = dtype or param.dtype, device or param.device
    else:
        config = model_or_config
    return XatlCache(config, batch_size, dtype=dtype or torch.float32, device=device)


# --------------------------------------------------------------------------------------------------------------
# Building blocks
# --------------------------------------------------------------------------------------------------------------


def causal_attention_mask(past: int, length: int, device: torch.device | str | None = None) -> torch.Tensor:
    """(1, 1, length, past + length) boolean mask for `length` new tokens after `past` cached ones: each query
    sees every cached key and the new keys up to its own position. True = may attend."""
    query_pos = torch.arange(past, past + length, device=device)[:, None]
    key_pos = torch.arange(past + length, device=device)[None, :]
    return (key_pos <= query_pos)[None, None]


class XatlRMSNorm(nn.Module):
    """RMSNorm computed in fp32, exactly as transformers' Llama does it; with a weight offset (Gemma's 1 + w, whose
    weights are stored as offsets from 1), exactly as Gemma does it: the weight is applied in fp32 before the cast."""

    def __init__(self, hidden_size: int, eps: float = 1e-6, weight_offset: float = 0.0) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.variance_epsilon = eps
        self.weight_offset = weight_offset

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        input_dtype = hidden_states.dtype
        hidden_states = hidden_states.to(torch.float32)
        variance = hidden_states.pow(2).mean(-1, keepdim=True)
        hidden_states = hidden_states * torch.rsqrt(variance + self.variance_epsilon)
        if self.weight_offset:
            return (hidden_states * (self.weight_offset + self.weight.float())).to(input_dtype)
        return self.weight * hidden_states.to(input_dtype)


class XatlGatedRMSNorm(nn.Module):
    """mamba-ssm's gated RMSNorm (`layernorm_gated.RMSNorm`), in fp32: rmsnorm(x * silu(z)) per group of channels.

    With norm_before_gate, rmsnorm(x) * silu(z) instead.
    """

    def __init__(self, hidden_size: int, group_size: int, eps: float = 1e-5, norm_before_gate: bool = False) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.group_size = group_size
        self.eps = eps
        self.norm_before_gate = norm_before_gate

    def forward(self, hidden_states: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
        dtype, ct = hidden_states.dtype, compute_dtype(hidden_states)
        x, gate = hidden_states.to(ct), F.silu(gate.to(ct))
        if not self.norm_before_gate:
            x = x * gate
        groups = x.unflatten(-1, (-1, self.group_size))
        x = (groups * torch.rsqrt(groups.pow(2).mean(-1, keepdim=True) + self.eps)).flatten(-2)
        x = x * self.weight.to(ct)
        if self.norm_before_gate:
            x = x * gate
        return x.to(dtype)


def _causal_conv_silu(x: torch.Tensor, conv: nn.Conv1d, previous: torch.Tensor | None) -> torch.Tensor:
    """silu(depthwise causal conv(x)) for x (batch, channels, L); `previous` (batch, channels, d_conv - 1) holds
    the inputs just before x (zeros when None). With L = 1 this is mamba-ssm's single-step conv update. Computed
    in fp32 (float64 for float64), as causal-conv1d accumulates (bf16 Mamba prefill on a CPU is also ~2x faster:
    benchmarks/cpu_conv_bench.py)."""
    width, ct = conv.kernel_size[0], compute_dtype(x)
    full = F.pad(x, (width - 1, 0)) if previous is None else torch.cat([previous.to(x.dtype), x], dim=-1)
    bias = None if conv.bias is None else conv.bias.to(ct)
    return F.silu(F.conv1d(full.to(ct), conv.weight.to(ct), bias, groups=conv.groups)).to(x.dtype)


def _depthwise_conv(channels: int, width: int, bias: bool) -> nn.Conv1d:
    """The short causal convolution of Mamba and Mamba2 (mamba-ssm's layout: one filter per channel)."""
    return nn.Conv1d(channels, channels, kernel_size=width, groups=channels, padding=width - 1, bias=bias)


def _short_conv(
    x: torch.Tensor,
    conv: nn.Conv1d,
    layer_idx: int,
    cache: XatlCache | None,
    padding_mask: torch.Tensor | None,
) -> torch.Tensor:
    """The Mamba / Mamba2 short convolution (reference path): silu(causal depthwise conv) over x (batch, channels, L).

    Padded positions are zeroed before and after, so they add no state. With a cache it continues from the
    cached window and leaves the newest d_conv inputs there.
    """
    x = _masked(x, padding_mask)
    previous = None
    if cache is not None:
        conv_state = cache.conv_states[layer_idx]
        if cache.seen_tokens > 0:
            previous = conv_state[..., 1:]
        width = conv.kernel_size[0]
        cache.conv_states[layer_idx] = torch.cat([conv_state, x.to(conv_state.dtype)], -1)[..., -width:]
    return _masked(_causal_conv_silu(x, conv, previous), padding_mask)


def _masked(x: torch.Tensor, padding_mask: torch.Tensor | None) -> torch.Tensor:
    """x (batch, channels, L) with padded positions zeroed (padding_mask (batch, L), 1 = token)."""
    return x if padding_mask is None else x * padding_mask[:, None, :].to(x.dtype)


def _short_conv_kernels(
    x: torch.Tensor,
    conv: nn.Conv1d,
    layer_idx: int,
    cache: XatlCache | None,
    padding_mask: torch.Tensor | None,
    ops: KernelSet,
) -> torch.Tensor:
    """The kernel call path's short convolution, as mamba-ssm's modules call causal-conv1d.

    x (batch, channels, L). Without earlier tokens: `causal_conv1d_fn` over a contiguous (channel-first) x, the
    cache's window set to the last d_conv inputs. After earlier tokens (one decoding step or a chunk continuing a
    cached prefix): `causal_conv1d_update`, which continues from the cached window and shifts it in place.
    """
    x = _masked(x, padding_mask)
    weight = conv.weight.squeeze(1)  # (channels, 1, width) -> (channels, width)
    if cache is not None and cache.seen_tokens > 0:
        x = ops.causal_conv1d_update(x, cache.conv_states[layer_idx], weight, conv.bias, "silu")
    else:
        if cache is not None:  # mamba-ssm: conv_state.copy_(F.pad(x, (d_conv - L, 0)))
            conv_state = cache.conv_states[layer_idx]
            conv_state.copy_(F.pad(x, (conv_state.shape[-1] - x.shape[-1], 0)))
        x = ops.causal_conv1d_fn(x.contiguous(), weight, conv.bias, activation="silu")
    return _masked(x, padding_mask)


def _make_norm(config: XatlConfig, width: int | None = None) -> nn.Module:
    width = config.hidden_size if width is None else width
    if config.norm_type == "rmsnorm":
        return XatlRMSNorm(width, eps=config.norm_eps, weight_offset=config.norm_weight_offset)
    return nn.LayerNorm(width, eps=config.norm_eps, bias=config.norm_bias)


class XatlMLP(nn.Module):
    """fc1 → act → fc2; gated: fc1 rows are [y; gate] and the output is fc2(y * act(gate)) (mamba-ssm GatedMLP)."""

    def __init__(self, config: XatlConfig) -> None:
        super().__init__()
        self.gated = config.mlp_gated
        fc1_out = 2 * config.intermediate_size if self.gated else config.intermediate_size
        self.fc1 = nn.Linear(config.hidden_size, fc1_out, bias=config.mlp_bias)
        self.fc2 = nn.Linear(config.intermediate_size, config.hidden_size, bias=config.mlp_bias)
        setattr(self.fc2, _INIT_ROLE, _RESIDUAL_OUT)
        self.act = ACT2FN[config.hidden_act]

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        hidden_states = self.fc1(hidden_states)
        if self.gated:
            y, gate = hidden_states.chunk(2, dim=-1)
            return self.fc2(y * self.act(gate))
        return self.fc2(self.act(hidden_states))


def compute_default_rope_parameters(
    config: XatlConfig, device: torch.device | None = None, **kwargs: Any
) -> tuple[torch.Tensor, float]:
    """The "default" RoPE inv_freq, a copy of transformers' GPT-NeoX `compute_default_rope_parameters`.

    transformers 5 keeps "default" out of `ROPE_INIT_FUNCTIONS` (it is a method of each rotary class). Unlike
    Llama's copy, this one honours `rope_parameters["partial_rotary_factor"]` (1.0 when absent), as GPT-NeoX needs.
    """
    base = config.rope_parameters["rope_theta"]
    partial_rotary_factor = config.rope_parameters.get("partial_rotary_factor", 1.0)
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    dim = int(head_dim * partial_rotary_factor)
    inv_freq = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.float) / dim))
    return inv_freq.to(device), 1.0


def _rope_init_fn(rope_type: str) -> Callable[..., tuple[torch.Tensor, float]]:
    if rope_type in ROPE_INIT_FUNCTIONS:  # also "default" in older transformers, which kept it there
        return ROPE_INIT_FUNCTIONS[rope_type]
    if rope_type == "default":
        return compute_default_rope_parameters
    raise ValueError(f"unsupported rope_type {rope_type!r}; known: {['default', *ROPE_INIT_FUNCTIONS]}")


def rope_inv_freq(config: XatlConfig, position_ids: torch.Tensor) -> tuple[torch.Tensor, float]:
    """(inv_freq, attention_scaling) exactly as transformers' Llama-style rotary module has them for this call.

    inv_freq comes from transformers' own `ROPE_INIT_FUNCTIONS[rope_type](config, device)`, called as the rotary
    module's __init__ does (fp32, on the CPU), so results match bit for bit. "dynamic" and "longrope" then follow
    `dynamic_rope_update` for a freshly built module: dynamic NTK recomputes inv_freq on the input's device for
    seq_len = max(position_ids) + 1 when that exceeds max_position_embeddings; longrope switches to its long
    factors when seq_len exceeds original_max_position_embeddings. Stateless: unlike transformers, a call never
    reuses the frequencies of an earlier, longer one.
    """
    rope_type = config.rope_parameters["rope_type"]
    init_fn = _rope_init_fn(rope_type)
    inv_freq, attention_scaling = init_fn(config)
    if "dynamic" in rope_type:
        seq_len = torch.max(position_ids) + 1
        if seq_len > config.max_position_embeddings:
            inv_freq, attention_scaling = init_fn(config, position_ids.device, seq_len=seq_len)
    elif rope_type == "longrope":
        seq_len = torch.max(position_ids) + 1
        original_max = config.rope_parameters["original_max_position_embeddings"]
        if seq_len > original_max:
            inv_freq, _ = init_fn(config, position_ids.device, seq_len=original_max + 1)
    return inv_freq, attention_scaling


def rotary_cos_sin(
    config: XatlConfig, position_ids: torch.Tensor, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin of shape (batch, L, rotary_dims), built exactly as transformers' GPT-NeoX / Llama rotary modules
    (or, with rope_interleaved, GPT-J's: each frequency repeated for its pair of dims).

    See `rope_inv_freq`; cos and sin are scaled by the rope type's attention_scaling (yarn, longrope), as Llama
    does. Nothing is stored in a buffer: a meta-device model made real by `to_empty` has nothing to re-initialise.
    """
    inv_freq, attention_scaling = rope_inv_freq(config, position_ids)
    freqs = position_ids[..., None].float() * inv_freq.to(device=position_ids.device, dtype=torch.float)
    if getattr(config, "rope_interleaved", False):
        emb = freqs.repeat_interleave(2, dim=-1)
    else:
        emb = torch.cat((freqs, freqs), dim=-1)
    cos = emb.cos() * attention_scaling
    sin = emb.sin() * attention_scaling
    return cos.to(dtype), sin.to(dtype)


def rotary_tables(
    config: XatlConfig, position_ids: torch.Tensor, dtype: torch.dtype
) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """(cos, sin) per RoPE an attention layer may use: "full_attention" from rope_parameters and, when the config has
    sliding_rope_parameters (Gemma 3's local RoPE), "sliding_attention" from those."""
    tables = {"full_attention": rotary_cos_sin(config, position_ids, dtype)}
    if getattr(config, "sliding_rope_parameters", None) is not None:
        tables["sliding_attention"] = rotary_cos_sin(_sliding_rope_config(config), position_ids, dtype)
    return tables


def _sliding_rope_config(config: XatlConfig) -> XatlConfig:
    """A shallow copy of the config whose rope_parameters are the sliding layers' (transformers' RoPE functions read
    config.rope_parameters). Not cached on the config, which would then save it to config.json."""
    local = copy.copy(config)
    local.__dict__["rope_parameters"] = config.sliding_rope_parameters
    return local


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x[..., : x.shape[-1] // 2], x[..., x.shape[-1] // 2 :]
    return torch.cat((-x2, x1), dim=-1)


def _rotate_every_two(x: torch.Tensor) -> torch.Tensor:
    """GPT-J's rotation: each pair (2k, 2k+1) becomes (-x[2k+1], x[2k])."""
    x1, x2 = x[..., ::2], x[..., 1::2]
    return torch.stack((-x2, x1), dim=-1).flatten(-2)


def _apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, interleaved: bool = False) -> torch.Tensor:
    """Rotate the first cos.shape[-1] dims of x (batch, heads, L, head_dim); pass the rest through."""
    rot = cos.shape[-1]
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    x_rot, x_pass = x[..., :rot], x[..., rot:]
    rotated = _rotate_every_two(x_rot) if interleaved else _rotate_half(x_rot)
    return torch.cat((x_rot * cos + rotated * sin, x_pass), dim=-1)


class XatlAttention(nn.Module):
    """Causal softmax attention with (partial) RoPE and GQA; q/k/v stored blocked, like Llama.

    Per the config: q/k norms (per head or full width, before RoPE), the softmax scale (attention_multiplier),
    score soft-capping, a sliding window on this layer, interleaved or no RoPE.
    """

    def __init__(self, config: XatlConfig, layer_idx: int) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.head_dim = config.head_dim
        h, q_dim, kv_dim = config.hidden_size, self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        self.q_proj = nn.Linear(h, q_dim, bias=config.attention_bias)
        self.k_proj = nn.Linear(h, kv_dim, bias=config.attention_bias)
        self.v_proj = nn.Linear(h, kv_dim, bias=config.attention_bias)
        self.out_proj = nn.Linear(q_dim, h, bias=config.attention_out_bias)
        setattr(self.out_proj, _INIT_ROLE, _RESIDUAL_OUT)
        self.qk_norm = config.qk_norm
        if self.qk_norm is not None:
            full = self.qk_norm == "full"
            self.q_norm = _make_norm(config, q_dim if full else self.head_dim)
            self.k_norm = _make_norm(config, kv_dim if full else self.head_dim)
        self.scale = config.attention_multiplier or self.head_dim**-0.5
        self.softcap = config.attn_logit_softcapping
        self.attention_type = attention_type(config, layer_idx)
        self.window = config.sliding_window if self.attention_type == "sliding_attention" else None
        self.rope = uses_rope(config, layer_idx)
        self.rope_interleaved = config.rope_interleaved

    def forward(
        self,
        hidden_states: torch.Tensor,
        position_embeddings: dict[str, tuple[torch.Tensor, torch.Tensor]] | None,
        attn_mask: torch.Tensor | None = None,
        cache: XatlCache | None = None,
    ) -> torch.Tensor:
        """attn_mask: None (plain causal, or all keys for one new token) or a boolean (batch, 1, L, past + L) mask,
        True = may attend. With a cache, the new keys and values are appended to it and attend with the old ones.
        position_embeddings: (cos, sin) per RoPE kind, from `rotary_tables`."""
        b, length, _ = hidden_states.shape
        q, k = self.q_proj(hidden_states), self.k_proj(hidden_states)
        if self.qk_norm == "full":
            q, k = self.q_norm(q), self.k_norm(k)
        q = q.view(b, length, self.num_heads, self.head_dim)
        k = k.view(b, length, self.num_kv_heads, self.head_dim)
        if self.qk_norm == "head":
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = q.transpose(1, 2), k.transpose(1, 2)
        v = self.v_proj(hidden_states).view(b, length, self.num_kv_heads, self.head_dim).transpose(1, 2)
        if self.rope and position_embeddings is not None:
            cos, sin = position_embeddings.get(self.attention_type) or position_embeddings["full_attention"]
            if cos.shape[-1] > 0:
                q = _apply_rotary(q, cos, sin, self.rope_interleaved)
                k = _apply_rotary(k, cos, sin, self.rope_interleaved)
        if cache is not None:
            k, v = cache.update_attention(self.layer_idx, k, v)
        if self.num_kv_heads != self.num_heads:  # GQA: each kv head serves a consecutive group of query heads
            k = k.repeat_interleave(self.num_heads // self.num_kv_heads, dim=1)
            v = v.repeat_interleave(self.num_heads // self.num_kv_heads, dim=1)
        out = self._attend(q, k, v, attn_mask)
        return self.out_proj(out.transpose(1, 2).reshape(b, length, self.num_heads * self.head_dim))

    def _attend(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, attn_mask: torch.Tensor | None
    ) -> torch.Tensor:
        length, total = q.shape[2], k.shape[2]
        if self.window is not None:  # a query sees the `window` newest keys, itself included (transformers' rule)
            if attn_mask is None:
                attn_mask = causal_attention_mask(total - length, length, q.device)
            query_pos = torch.arange(total - length, total, device=q.device)[:, None]
            key_pos = torch.arange(total, device=q.device)[None, :]
            attn_mask = attn_mask & (key_pos > query_pos - self.window)
        if self.softcap is None:
            is_causal = attn_mask is None and total == length  # else one new token, which sees every key
            return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, is_causal=is_causal, scale=self.scale)
        # Soft-capped scores (Gemma 2) need the scores themselves: transformers' eager attention, step for step.
        scores = torch.matmul(q, k.transpose(2, 3)) * self.scale
        scores = torch.tanh(scores / self.softcap) * self.softcap
        if attn_mask is None and total == length:
            attn_mask = causal_attention_mask(0, length, q.device)
        if attn_mask is not None:
            scores = scores.masked_fill(~attn_mask, torch.finfo(scores.dtype).min)
        weights = F.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype)
        return torch.matmul(weights, v)


def attention_type(config: XatlConfig, layer_idx: int) -> str:
    """ "sliding_attention" where layer `layer_idx` attends within a window, else "full_attention"."""
    if getattr(config, "sliding_window", None) is None:
        return "full_attention"
    types = getattr(config, "attention_types", None)
    return "sliding_attention" if types is None else types[layer_idx]


def uses_rope(config: XatlConfig, layer_idx: int) -> bool:
    """Whether layer `layer_idx`'s attention rotates q and k: not with learned positions, not on NoPE layers."""
    if getattr(config, "position_embedding_type", "rope") != "rope":
        return False
    flags = getattr(config, "no_rope_layers", None)
    return flags is None or bool(flags[layer_idx])


class XatlMamba(nn.Module):
    """Selective SSM mixer with mamba-ssm's Mamba (v1) parameter names and shapes.

    Two paths (see `kernels_xatl.kernels_for`): the kernel call path (`_forward_kernels`) where a kernel serves the
    inputs, else the reference path: `selective_scan_chunked`, which computes what the readable
    `selective_scan_reference` defines, chunk by chunk.
    """

    def __init__(self, config: XatlConfig, layer_idx: int) -> None:
        super().__init__()
        m = config.mamba
        self.layer_idx = layer_idx
        self.d_state, self.d_conv, self.dt_rank = m["d_state"], m["d_conv"], m["dt_rank"]
        self.d_inner = m["expand"] * config.hidden_size
        self.in_proj = nn.Linear(config.hidden_size, 2 * self.d_inner, bias=m["proj_bias"])
        self.conv1d = _depthwise_conv(self.d_inner, self.d_conv, m["conv_bias"])
        self.x_proj = nn.Linear(self.d_inner, self.dt_rank + 2 * self.d_state, bias=False)
        self.dt_proj = nn.Linear(self.dt_rank, self.d_inner, bias=True)
        setattr(self.dt_proj, _INIT_ROLE, _DT_PROJ)
        self.A_log = nn.Parameter(torch.empty(self.d_inner, self.d_state))
        self.D = nn.Parameter(torch.empty(self.d_inner))
        self.outside_kernels = outside_kernel_limits("mamba", m)
        self.out_proj = nn.Linear(self.d_inner, config.hidden_size, bias=m["out_proj_bias"])
        setattr(self.out_proj, _INIT_ROLE, _RESIDUAL_OUT)

    @torch.no_grad()
    def init_own_parameters(self, config: XatlConfig) -> None:
        """mamba-ssm's init: S4D-real A = -(1..d_state) in every channel, D = 1 (dt_proj has its own role)."""
        if _fresh(self.A_log):
            a = torch.arange(1, self.d_state + 1, dtype=torch.float32, device=self.A_log.device)
            self.A_log.copy_(torch.log(a).expand(self.d_inner, -1))
        if _fresh(self.D):
            nn.init.ones_(self.D)

    def forward(
        self,
        hidden_states: torch.Tensor,
        padding_mask: torch.Tensor | None = None,
        cache: XatlCache | None = None,
    ) -> torch.Tensor:
        """padding_mask (batch, L), 1 = token, 0 = padding: padded inputs are zeroed so they add no state.

        With a cache, continues from its states and leaves the final ones there: one new token takes mamba-ssm's
        single-step update (O(1), the prefix is never re-read); several run the scan from the cached state.
        """
        ops = kernels_for(hidden_states, self.outside_kernels)
        if ops is not None:
            return self._forward_kernels(hidden_states, padding_mask, cache, ops)
        length = hidden_states.shape[1]
        x, z = self.in_proj(hidden_states).transpose(1, 2).chunk(2, dim=1)  # (b, d_inner, L) each
        x = _short_conv(x, self.conv1d, self.layer_idx, cache, padding_mask)

        dt, B, C = self._dt_B_C(x)
        B, C = B.transpose(1, 2).contiguous(), C.transpose(1, 2).contiguous()  # (b, d_state, L)
        ct = compute_dtype(x)
        A = -torch.exp(self.A_log.to(ct))
        if cache is not None and length == 1:  # mamba-ssm's Mamba.step
            ssm_state = cache.ssm_states[self.layer_idx]
            delta = F.softplus(dt[..., 0].to(ct) + self.dt_proj.bias.to(ct))  # (b, d_inner)
            u = x[..., 0].to(ct)
            h = ssm_state.to(ct) * torch.exp(delta[..., None] * A)
            h = h + (delta * u)[..., None] * B[..., 0].to(ct)[:, None]
            y = torch.einsum("bdn,bn->bd", h, C[..., 0].to(ct)) + self.D.to(ct) * u
            y = (y * F.silu(z[..., 0].to(ct))).to(x.dtype)[..., None]
            cache.ssm_states[self.layer_idx] = h.to(ssm_state.dtype)
            return self.out_proj(y.transpose(1, 2))
        y = selective_scan_chunked(
            x,
            dt,
            A,
            B,
            C,
            self.D.to(ct),
            z=z,
            delta_bias=self.dt_proj.bias.to(ct),
            delta_softplus=True,
            return_last_state=cache is not None,
            initial_state=cache.ssm_states[self.layer_idx] if cache is not None and cache.seen_tokens > 0 else None,
        )
        if cache is not None:
            y, last_state = y
            cache.ssm_states[self.layer_idx] = last_state.to(cache.ssm_states[self.layer_idx].dtype)
        return self.out_proj(y.transpose(1, 2))

    def _dt_B_C(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """From the conv's output x (b, d_inner, L): dt (b, d_inner, L) before its bias and softplus (both paths
        add them in the scan), and B, C (b, L, d_state)."""
        dt, B, C = self.x_proj(x.transpose(1, 2)).split([self.dt_rank, self.d_state, self.d_state], dim=-1)
        return F.linear(dt, self.dt_proj.weight).transpose(1, 2), B, C

    def _forward_kernels(
        self, hidden_states: torch.Tensor, padding_mask: torch.Tensor | None, cache: XatlCache | None, ops: KernelSet
    ) -> torch.Tensor:
        """The kernel call path: mamba-ssm's Mamba.forward (non-fused) and Mamba.step, call for call.

        Without earlier tokens: causal_conv1d_fn, then selective_scan_fn (raw dt; the fp32 bias and the softplus are
        applied in the kernel), the cache taking its last state. After earlier tokens: causal_conv1d_update, then
        one selective_state_update per new token (mamba-ssm's scan kernel takes no initial state).
        """
        x, z = self.in_proj(hidden_states).transpose(1, 2).chunk(2, dim=1)  # (b, d_inner, L) each
        x = _short_conv_kernels(x, self.conv1d, self.layer_idx, cache, padding_mask, ops)
        dt, B, C = self._dt_B_C(x)
        A = -torch.exp(self.A_log.float())  # (d_inner, d_state), fp32
        if cache is not None and cache.seen_tokens > 0:
            state = cache.ssm_states[self.layer_idx]  # (b, d_inner, d_state), updated in place
            # One step updates the cache's state in place, as Mamba.step. A chunk keeps its running state in fp32
            # and rounds it once, as a scan does: 100 steps through a bf16 state drift by several percent.
            running = state if x.shape[-1] == 1 else state.float()
            steps = [
                ops.selective_state_update(
                    running,
                    x[..., t],
                    dt[..., t],
                    A,
                    B[:, t],
                    C[:, t],
                    self.D,
                    z=z[..., t],
                    dt_bias=self.dt_proj.bias,
                    dt_softplus=True,
                )
                for t in range(x.shape[-1])
            ]
            if running is not state:
                state.copy_(running)
            y = torch.stack(steps, dim=-1)
        else:
            y = ops.selective_scan_fn(
                x,
                dt,
                A,
                B.transpose(1, 2).contiguous(),  # (b, d_state, L)
                C.transpose(1, 2).contiguous(),
                self.D.float(),
                z=z,
                delta_bias=self.dt_proj.bias.float(),
                delta_softplus=True,
                return_last_state=cache is not None,
            )
            if cache is not None:
                y, last_state = y
                cache.ssm_states[self.layer_idx].copy_(last_state)
        return self.out_proj(y.transpose(1, 2))


class XatlMamba2(nn.Module):
    """SSD mixer with mamba-ssm's Mamba2 parameter names, shapes and semantics.

    in_proj rows are [z (d_inner), x (d_inner), B (ngroups * d_state), C (ngroups * d_state), dt (nheads)];
    conv1d is depthwise over x‖B‖C (conv_dim channels) followed by SiLU; B and C are shared by nheads / ngroups
    consecutive heads; the output is out_proj(rmsnorm(y * silu(z))), the norm taken per group of d_inner / ngroups
    channels. Two paths, as `XatlMamba`: the kernel call path (`_forward_kernels`) or `ssd_chunk_scan_reference`.
    """

    def __init__(self, config: XatlConfig, layer_idx: int) -> None:
        super().__init__()
        m, dims = config.mamba2, config.mixer_dims("mamba2")
        self.layer_idx = layer_idx
        self.d_state, self.d_conv, self.headdim = m["d_state"], m["d_conv"], m["headdim"]
        self.ngroups, self.chunk_size = m["ngroups"], m["chunk_size"]
        self.d_inner, self.nheads, self.conv_dim = dims["d_inner"], dims["nheads"], dims["conv_dim"]
        self.in_proj = nn.Linear(config.hidden_size, self.d_inner + self.conv_dim + self.nheads, bias=m["proj_bias"])
        self.conv1d = _depthwise_conv(self.conv_dim, self.d_conv, m["conv_bias"])
        self.dt_bias = nn.Parameter(torch.empty(self.nheads))
        self.outside_kernels = outside_kernel_limits("mamba2", m)
        self.A_log = nn.Parameter(torch.empty(self.nheads))
        self.D = nn.Parameter(torch.empty(self.nheads))
        self.norm = XatlGatedRMSNorm(
            self.d_inner, self.d_inner // self.ngroups, eps=m["norm_eps"], norm_before_gate=m["norm_before_gate"]
        )
        self.out_proj = nn.Linear(self.d_inner, config.hidden_size, bias=m["out_proj_bias"])
        setattr(self.out_proj, _INIT_ROLE, _RESIDUAL_OUT)

    @torch.no_grad()
    def init_own_parameters(self, config: XatlConfig) -> None:
        """mamba-ssm's init: dt log-uniform in [dt_min, dt_max] (floored), dt_bias = softplus⁻¹(dt); A ~ U(A_init_range)
        per head; D = 1."""
        m = config.mamba2
        if _fresh(self.dt_bias):
            self.dt_bias.copy_(_inverse_softplus_dt(self.nheads, m, self.dt_bias.device))
        if _fresh(self.A_log):
            a = torch.empty(self.nheads, dtype=torch.float32, device=self.A_log.device).uniform_(*m["A_init_range"])
            self.A_log.copy_(torch.log(a))
        if _fresh(self.D):
            nn.init.ones_(self.D)

    def forward(
        self,
        hidden_states: torch.Tensor,
        padding_mask: torch.Tensor | None = None,
        cache: XatlCache | None = None,
    ) -> torch.Tensor:
        """As `XatlMamba.forward`: padding zeroed; with a cache, one token takes mamba-ssm's Mamba2.step."""
        ops = kernels_for(hidden_states, self.outside_kernels)
        if ops is not None:
            return self._forward_kernels(hidden_states, padding_mask, cache, ops)
        b, length, _ = hidden_states.shape
        fresh = cache is None or cache.seen_tokens == 0
        z, xBC, dt = self.in_proj(hidden_states).split([self.d_inner, self.conv_dim, self.nheads], dim=-1)
        xBC = _short_conv(xBC.transpose(1, 2), self.conv1d, self.layer_idx, cache, padding_mask)
        n_bc = self.ngroups * self.d_state
        x, B, C = xBC.transpose(1, 2).split([self.d_inner, n_bc, n_bc], dim=-1)
        x = x.reshape(b, length, self.nheads, self.headdim)
        B = B.reshape(b, length, self.ngroups, self.d_state)
        C = C.reshape(b, length, self.ngroups, self.d_state)
        ct = compute_dtype(x)
        A = -torch.exp(self.A_log.to(ct))

        if cache is not None and length == 1:  # mamba-ssm's Mamba2.step: h = exp(dt A) h + dt x Bᵀ, y = h C + D x
            ssm_state = cache.ssm_states[self.layer_idx]  # (b, nheads, headdim, d_state)
            rep = self.nheads // self.ngroups
            B1, C1 = (t[:, 0].to(ct).repeat_interleave(rep, dim=1) for t in (B, C))  # (b, nheads, d_state)
            delta = F.softplus(dt[:, 0].to(ct) + self.dt_bias.to(ct))  # (b, nheads)
            u = x[:, 0].to(ct)  # (b, nheads, headdim)
            h = ssm_state.to(ct) * torch.exp(delta * A)[..., None, None]
            h = h + (delta[..., None] * u)[..., None] * B1[:, :, None, :]
            y = torch.einsum("bhpn,bhn->bhp", h, C1) + self.D.to(ct)[:, None] * u
            cache.ssm_states[self.layer_idx] = h.to(ssm_state.dtype)
            y = y.to(x.dtype)[:, None]
        else:
            y = ssd_chunk_scan_reference(
                x,
                dt,
                A,
                B,
                C,
                chunk_size=self.chunk_size,
                D=self.D,
                dt_bias=self.dt_bias,
                initial_states=None if fresh else cache.ssm_states[self.layer_idx],
                dt_softplus=True,
                return_final_states=cache is not None,
            )
            if cache is not None:
                y, final_state = y
                cache.ssm_states[self.layer_idx] = final_state.to(cache.ssm_states[self.layer_idx].dtype)
        y = self.norm(y.reshape(b, length, self.d_inner), z)
        return self.out_proj(y)

    def _forward_kernels(
        self, hidden_states: torch.Tensor, padding_mask: torch.Tensor | None, cache: XatlCache | None, ops: KernelSet
    ) -> torch.Tensor:
        """The kernel call path: mamba-ssm's Mamba2.forward (non-fused, z gated by the norm) and Mamba2.step.

        The conv as `_short_conv_kernels`; then one token after earlier ones takes selective_state_update in the
        multi-head layout (A, dt, dt_bias and D broadcast over headdim, as Mamba2.step); anything else takes
        mamba_chunk_scan_combined (raw dt, fp32 A), from the cached state when continuing a prefix.
        """
        b, length, _ = hidden_states.shape
        z, xBC, dt = self.in_proj(hidden_states).split([self.d_inner, self.conv_dim, self.nheads], dim=-1)
        xBC = _short_conv_kernels(xBC.transpose(1, 2), self.conv1d, self.layer_idx, cache, padding_mask, ops)
        n_bc, heads, p, n = self.ngroups * self.d_state, self.nheads, self.headdim, self.d_state
        x, B, C = xBC.transpose(1, 2).split([self.d_inner, n_bc, n_bc], dim=-1)  # (b, L, ·)
        A = -torch.exp(self.A_log.float())  # (nheads,), fp32
        continuing = cache is not None and cache.seen_tokens > 0
        if continuing and length == 1:
            y = ops.selective_state_update(
                cache.ssm_states[self.layer_idx],  # (b, nheads, headdim, d_state), updated in place
                x[:, 0].reshape(b, heads, p),
                dt[:, 0, :, None].expand(b, heads, p),
                A[:, None, None].expand(heads, p, n),
                B[:, 0].reshape(b, self.ngroups, n),
                C[:, 0].reshape(b, self.ngroups, n),
                self.D[:, None].expand(heads, p),
                z=None,
                dt_bias=self.dt_bias[:, None].expand(heads, p),
                dt_softplus=True,
            )
        else:
            y = ops.mamba_chunk_scan_combined(
                x.reshape(b, length, heads, p),
                dt,
                A,
                B.reshape(b, length, self.ngroups, n),
                C.reshape(b, length, self.ngroups, n),
                chunk_size=self.chunk_size,
                D=self.D,
                z=None,
                dt_bias=self.dt_bias,
                initial_states=cache.ssm_states[self.layer_idx] if continuing else None,
                dt_softplus=True,
                return_final_states=cache is not None,
            )
            if cache is not None:
                y, final_state = y
                cache.ssm_states[self.layer_idx].copy_(final_state)
        return self.out_proj(self.norm(y.reshape(b, length, self.d_inner), z))


class XatlHeadGatedRMSNorm(nn.Module):
    """Qwen3-Next's and fla's gated output norm: rmsnorm(x) · weight · silu(z) over each head, one weight of
    head_dim shared by every head; normalised in fp32, weighted in the input's dtype, gated in fp32, as there."""

    def __init__(self, head_dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(head_dim))
        self.eps = eps

    def forward(self, hidden_states: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
        dtype, ct = hidden_states.dtype, compute_dtype(hidden_states)
        x = hidden_states.to(ct)
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        x = self.weight * x.to(dtype)
        return (x.to(ct) * F.silu(gate.to(ct))).to(dtype)


class XatlGatedDeltaNet(nn.Module):
    """Gated DeltaNet (delta-rule linear attention) with Qwen3-Next's and fla's semantics.

    in_proj rows are [q (key_dim), k (key_dim), v (value_dim), z (value_dim), b (num_v_heads), a (num_v_heads)],
    key_dim = num_heads · head_k_dim, value_dim = num_v_heads · head_v_dim: so W_Q, W_K and W_V of an attention
    layer fill the q, k and v blocks (`part:` rules) and W_O fills out_proj. conv1d is depthwise over q‖k‖v, then
    SiLU; q and k are L2-normalised per head; β = sigmoid(b); the log decay is g = −exp(A_log) · softplus(a + dt_bias);
    the output is out_proj(rmsnorm(o) · weight · silu(z)) per value head. Two paths, as the Mamba mixers: fla's
    `chunk_gated_delta_rule` / `fused_recurrent_gated_delta_rule` (kernel path), or the readable chunked (prefill,
    training) and recurrent (one token after a cached prefix) references of `delta_rule_xatl`.
    """

    def __init__(self, config: XatlConfig, layer_idx: int) -> None:
        super().__init__()
        g, dims = config.gated_deltanet, config.mixer_dims("gated_deltanet")
        self.layer_idx = layer_idx
        self.num_heads, self.num_v_heads = g["num_heads"], g["num_v_heads"]
        self.head_k_dim, self.head_v_dim = g["head_k_dim"], g["head_v_dim"]
        self.key_dim, self.value_dim, self.conv_dim = dims["key_dim"], dims["value_dim"], dims["conv_dim"]
        self.d_conv, self.chunk_size = g["d_conv"], g["chunk_size"]
        projected = self.conv_dim + self.value_dim + 2 * self.num_v_heads
        self.in_proj = nn.Linear(config.hidden_size, projected, bias=g["proj_bias"])
        self.conv1d = _depthwise_conv(self.conv_dim, self.d_conv, g["conv_bias"])
        self.dt_bias = nn.Parameter(torch.empty(self.num_v_heads))
        self.A_log = nn.Parameter(torch.empty(self.num_v_heads))
        self.norm = XatlHeadGatedRMSNorm(self.head_v_dim, eps=g["norm_eps"])
        self.out_proj = nn.Linear(self.value_dim, config.hidden_size, bias=g["out_proj_bias"])
        setattr(self.out_proj, _INIT_ROLE, _RESIDUAL_OUT)
        self.outside_kernels = outside_kernel_limits("gated_deltanet", g)

    def forward(
        self,
        hidden_states: torch.Tensor,
        padding_mask: torch.Tensor | None = None,
        cache: XatlCache | None = None,
    ) -> torch.Tensor:
        """As `XatlMamba.forward`: padded positions add nothing to the state (their β and g are zeroed); with a
        cache, one token after earlier ones takes the recurrent step, anything else the chunked form from the
        cached state."""
        ops = kernels_for(hidden_states, self.outside_kernels, scan="chunk_gated_delta_rule")
        b, length, _ = hidden_states.shape
        qkv, z, beta_logits, a = self.in_proj(hidden_states).split(
            [self.conv_dim, self.value_dim, self.num_v_heads, self.num_v_heads], dim=-1
        )
        if ops is not None:
            qkv = _short_conv_kernels(qkv.transpose(1, 2), self.conv1d, self.layer_idx, cache, padding_mask, ops)
        else:
            qkv = _short_conv(qkv.transpose(1, 2), self.conv1d, self.layer_idx, cache, padding_mask)
        q, k, v = qkv.transpose(1, 2).split([self.key_dim, self.key_dim, self.value_dim], dim=-1)
        q = q.reshape(b, length, self.num_heads, self.head_k_dim)
        k = k.reshape(b, length, self.num_heads, self.head_k_dim)
        v = v.reshape(b, length, self.num_v_heads, self.head_v_dim)
        beta = beta_logits.sigmoid()
        g = -self.A_log.float().exp() * F.softplus(a.float() + self.dt_bias.float())  # fp32, as Qwen3-Next
        if padding_mask is not None:
            keep = padding_mask[:, :, None].to(g.dtype)
            g, beta = g * keep, beta * keep.to(beta.dtype)
        continuing = cache is not None and cache.seen_tokens > 0
        state = cache.ssm_states[self.layer_idx] if continuing else None
        arguments = {"initial_state": state, "output_final_state": cache is not None, "use_qk_l2norm_in_kernel": True}
        if ops is not None:
            scan = ops.fused_recurrent_gated_delta_rule if continuing and length == 1 else ops.chunk_gated_delta_rule
            o, final_state = scan(q, k, v, g=g, beta=beta, **arguments)
        elif continuing and length == 1:
            o, final_state = recurrent_gated_delta_rule_reference(q, k, v, g, beta, **arguments)
        else:
            o, final_state = chunk_gated_delta_rule_reference(q, k, v, g, beta, chunk_size=self.chunk_size, **arguments)
        if cache is not None:
            cache.ssm_states[self.layer_idx] = final_state.to(cache.ssm_states[self.layer_idx].dtype)
        o = self.norm(o, z.reshape(b, length, self.num_v_heads, self.head_v_dim))
        return self.out_proj(o.reshape(b, length, self.value_dim))

    @torch.no_grad()
    def init_own_parameters(self, config: XatlConfig) -> None:
        """fla's init: dt log-uniform in [dt_min, dt_max] (floored), dt_bias = softplus⁻¹(dt); A ~ U(A_init_range)."""
        g = config.gated_deltanet
        if _fresh(self.dt_bias):
            self.dt_bias.copy_(_inverse_softplus_dt(self.num_v_heads, g, self.dt_bias.device))
        if _fresh(self.A_log):
            a = torch.empty(self.num_v_heads, dtype=torch.float32, device=self.A_log.device)
            self.A_log.copy_(torch.log(a.uniform_(*g["A_init_range"])))


def _inverse_softplus_dt(count: int, settings: dict[str, Any], device: torch.device) -> torch.Tensor:
    """softplus⁻¹(dt) for dt log-uniform in [dt_min, dt_max], floored at dt_init_floor (mamba-ssm's and fla's)."""
    log_lo, log_hi = math.log(settings["dt_min"]), math.log(settings["dt_max"])
    u = torch.rand(count, dtype=torch.float32, device=device)
    dt = torch.exp(u * (log_hi - log_lo) + log_lo).clamp(min=settings["dt_init_floor"])
    return dt + torch.log(-torch.expm1(-dt))


# Each registered mixer's module, by the class name its registry entry gives.
MIXER_MODULES: dict[str, type[nn.Module]] = {name: globals()[spec.module] for name, spec in MIXERS.items()}


class XatlBlock(GradientCheckpointingLayer):
    """norm → mixer and norm → MLP, with a parallel (GPT-NeoX) or sequential (Llama) residual.

    `norm_layout` "post" normalises each sublayer's output instead of its input (OLMo2: `post_mixer_norm`,
    `post_mlp_norm`), "sandwich" does both (Gemma 2 and 3); `residual_multiplier` scales what each sublayer adds
    (Granite).
    """

    def __init__(self, config: XatlConfig, layer_idx: int) -> None:
        super().__init__()
        self.layer_type = config.layer_types[layer_idx]
        self.parallel_residual = config.parallel_residual
        self.residual_multiplier = config.residual_multiplier
        self.pre_norm = config.norm_layout in ("pre", "sandwich")
        self.post_norm = config.norm_layout in ("post", "sandwich")
        if self.pre_norm:
            self.input_norm = _make_norm(config)
        if self.layer_type == "attention":
            self.mixer: nn.Module = XatlAttention(config, layer_idx)
        else:  # the class that the mixer's registry entry names
            self.mixer = MIXER_MODULES[self.layer_type](config, layer_idx)
        if self.post_norm:
            self.post_mixer_norm = _make_norm(config)
        if self.pre_norm:
            self.mlp_norm = _make_norm(config)
        self.mlp = XatlMLP(config)
        if self.post_norm:
            self.post_mlp_norm = _make_norm(config)

    def mixer_input(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """What the mixer reads: the normed stream (or, with post norms only, the stream itself)."""
        return self.input_norm(hidden_states) if self.pre_norm else hidden_states

    def mix(
        self,
        normed: torch.Tensor,
        position_embeddings: dict[str, tuple[torch.Tensor, torch.Tensor]] | None = None,
        attn_mask: torch.Tensor | None = None,
        padding_mask: torch.Tensor | None = None,
        cache: XatlCache | None = None,
    ) -> torch.Tensor:
        """The mixer's output for its inputs (`mixer_input`): the only part of a block that a cache changes, which is
        what verify's incremental-decoding check compares, free of the residual stream."""
        if self.layer_type == "attention":
            return self.mixer(normed, position_embeddings, attn_mask, cache=cache)
        return self.mixer(normed, padding_mask, cache=cache)

    def _mlp_branch(self, hidden_states: torch.Tensor) -> torch.Tensor:
        out = self.mlp(self.mlp_norm(hidden_states) if self.pre_norm else hidden_states)
        return self.post_mlp_norm(out) if self.post_norm else out

    def _scaled(self, branch: torch.Tensor) -> torch.Tensor:
        return branch * self.residual_multiplier if self.residual_multiplier != 1.0 else branch

    def forward(
        self,
        hidden_states: torch.Tensor,
        position_embeddings: dict[str, tuple[torch.Tensor, torch.Tensor]] | None = None,
        attn_mask: torch.Tensor | None = None,
        padding_mask: torch.Tensor | None = None,
        cache: XatlCache | None = None,
    ) -> torch.Tensor:
        mixed = self.mix(self.mixer_input(hidden_states), position_embeddings, attn_mask, padding_mask, cache)
        if self.post_norm:
            mixed = self.post_mixer_norm(mixed)
        if self.parallel_residual:
            return hidden_states + self._scaled(mixed) + self._scaled(self._mlp_branch(hidden_states))
        hidden_states = hidden_states + self._scaled(mixed)
        return hidden_states + self._scaled(self._mlp_branch(hidden_states))


# --------------------------------------------------------------------------------------------------------------
# Initialisation
# --------------------------------------------------------------------------------------------------------------


def _fresh(t: torch.Tensor | None) -> bool:
    """True if t should be initialised: it exists and transformers has not loaded it from a checkpoint."""
    return t is not None and not getattr(t, "_is_hf_initialized", False)


@torch.no_grad()
def init_xatl_weights(module: nn.Module, config: XatlConfig) -> None:
    """Initialise the parameters that `module` owns directly (not its children), as mamba-ssm does.

    Fully determines every such parameter (safe after `to_empty`), and each module's result does not depend
    on the order modules are visited in. Tensors marked `_is_hf_initialized` (loaded by transformers) are kept.
    """
    if isinstance(module, nn.Linear):
        role = getattr(module, _INIT_ROLE, None)
        if role == _DT_PROJ:
            _init_dt_proj(module, config)
            return
        if _fresh(module.weight):
            nn.init.kaiming_uniform_(module.weight, a=math.sqrt(5))  # torch's default Linear init
            if role == _RESIDUAL_OUT:  # mamba-ssm's rescale_prenorm_residual (two residual adds per layer)
                module.weight.div_(math.sqrt(2 * config.num_hidden_layers))
        if _fresh(module.bias):
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.Conv1d):  # same as nn.Conv1d.reset_parameters(), tensor by tensor
        if _fresh(module.weight):
            nn.init.kaiming_uniform_(module.weight, a=math.sqrt(5))
        if _fresh(module.bias):
            fan_in = module.weight.shape[1] * module.weight.shape[2]
            bound = 1 / math.sqrt(fan_in) if fan_in > 0 else 0.0
            nn.init.uniform_(module.bias, -bound, bound)
    elif isinstance(module, nn.Embedding):
        if _fresh(module.weight):
            nn.init.normal_(module.weight, mean=0.0, std=config.initializer_range)
    elif isinstance(module, (nn.LayerNorm, XatlRMSNorm, XatlGatedRMSNorm, XatlHeadGatedRMSNorm)):
        if _fresh(module.weight):  # a scale of 1: with Gemma's (offset + w), w = 1 - offset
            nn.init.constant_(module.weight, 1.0 - getattr(module, "weight_offset", 0.0))
        if _fresh(getattr(module, "bias", None)):
            nn.init.zeros_(module.bias)
    elif isinstance(module, tuple(MIXER_MODULES.values())):  # each mixer initialises its own parameters
        module.init_own_parameters(config)


def _init_dt_proj(linear: nn.Linear, config: XatlConfig) -> None:
    """mamba-ssm's dt_proj init: weight U(±dt_rank^-0.5 · dt_scale); bias = softplus^-1(dt), dt log-uniform."""
    m = config.mamba
    if _fresh(linear.weight):
        std = linear.in_features**-0.5 * m["dt_scale"]
        nn.init.uniform_(linear.weight, -std, std)
    if _fresh(linear.bias):
        linear.bias.copy_(_inverse_softplus_dt(linear.out_features, m, linear.bias.device))


# --------------------------------------------------------------------------------------------------------------
# Models
# --------------------------------------------------------------------------------------------------------------

# transformers 5 renamed the outputs' `past_key_values` field to `cache` (keeping `past_key_values` as a property).
_CACHE_FIELD = "cache" if "cache" in getattr(CausalLMOutputWithPast, "__dataclass_fields__", {}) else "past_key_values"


def _pick_cache(cache: XatlCache | None, past_key_values: XatlCache | None) -> XatlCache | None:
    if cache is not None and past_key_values is not None and cache is not past_key_values:
        raise ValueError("pass the cache once, as cache= or as past_key_values=")
    return cache if cache is not None else past_key_values


class XatlPreTrainedModel(PreTrainedModel):
    config_class = XatlConfig
    config: XatlConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = True
    _no_split_modules = ["XatlBlock"]  # noqa: RUF012 (transformers' convention)

    def _init_weights(self, module: nn.Module) -> None:
        """Called by transformers on every module it has not loaded; see `init_xatl_weights`."""
        init_xatl_weights(module, self.config)


class XatlModel(XatlPreTrainedModel):
    """Embeddings → blocks → final norm; returns the final hidden states."""

    def __init__(self, config: XatlConfig) -> None:
        super().__init__(config)
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        if config.position_embedding_type == "learned":  # GPT-2, OPT (whose table starts `offset` rows in)
            rows = config.max_position_embeddings + config.position_embedding_offset
            self.embed_positions = nn.Embedding(rows, config.hidden_size)
        self.layers = nn.ModuleList([XatlBlock(config, i) for i in range(config.num_hidden_layers)])
        self.final_norm = _make_norm(config)
        self.gradient_checkpointing = False
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.embed_tokens

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.embed_tokens = value

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        cache: XatlCache | None = None,
        use_cache: bool | None = None,
        past_key_values: XatlCache | None = None,
        **kwargs: Any,
    ) -> BaseModelOutputWithPast | tuple:
        """attention_mask: optional (batch, L) or, with a cache, (batch, seen + L) 1/0 padding mask.

        cache (or its older name past_key_values): an `XatlCache`; the call then processes only the new tokens, after
        the `cache.seen_tokens` already seen, and updates the cache in place. use_cache=True (default:
        config.use_cache outside training) creates one when none is given. The cache is returned when present.
        """
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids or inputs_embeds")
        cache = _pick_cache(cache, past_key_values)
        if output_hidden_states is None:
            output_hidden_states = self.config.output_hidden_states
        return_dict = return_dict if return_dict is not None else self.config.return_dict
        if use_cache is None:
            use_cache = bool(self.config.use_cache) and not self.training
        hidden_states = self.embed_tokens(input_ids) if inputs_embeds is None else inputs_embeds
        if self.config.embedding_multiplier != 1.0:  # cast first, as Gemma does (its sqrt(hidden) is rounded to bf16)
            hidden_states = hidden_states * torch.tensor(self.config.embedding_multiplier, dtype=hidden_states.dtype)
        batch, length = hidden_states.shape[:2]
        device = hidden_states.device
        if cache is None and use_cache:
            cache = XatlCache(self.config, batch, dtype=hidden_states.dtype, device=device)
        if cache is not None and not isinstance(cache, XatlCache):
            raise TypeError(f"cache must be an XatlCache (see new_cache), got {type(cache).__name__}")
        past = cache.seen_tokens if cache is not None else 0
        total = past + length

        if attention_mask is not None:
            if attention_mask.shape[-1] == length and past > 0:  # a mask of the new tokens only: the past is real
                attention_mask = F.pad(attention_mask, (past, 0), value=1)
            elif attention_mask.shape[-1] != total:
                raise ValueError(f"attention_mask has {attention_mask.shape[-1]} columns, expected {length} or {total}")
            if bool(attention_mask.all()):
                attention_mask = None  # no padding: take the plain causal path
        attn_mask = None
        padding_mask = None
        if attention_mask is not None or (past > 0 and length > 1):
            attn_mask = causal_attention_mask(past, length, device)
            if attention_mask is not None:
                query_pos = torch.arange(past, total, device=device)[:, None]
                key_pos = torch.arange(total, device=device)[None, :]
                padding_mask = attention_mask[:, -length:]
                attn_mask = attn_mask & attention_mask.bool()[:, None, None, :]
                # Let every query see itself, so fully padded rows give finite (ignored) outputs instead of NaN.
                attn_mask = attn_mask | (key_pos == query_pos)

        position_embeddings = None
        if position_ids is None:
            position_ids = torch.arange(past, total, device=device).unsqueeze(0)
        if self.config.position_embedding_type == "learned":
            hidden_states = hidden_states + self.embed_positions(position_ids + self.config.position_embedding_offset)
        elif "attention" in self.config.layer_types:
            position_embeddings = rotary_tables(self.config, position_ids, hidden_states.dtype)

        all_hidden_states: tuple[torch.Tensor, ...] = ()
        for layer in self.layers:
            if output_hidden_states:
                all_hidden_states += (hidden_states,)
            hidden_states = layer(hidden_states, position_embeddings, attn_mask, padding_mask, cache=cache)
        hidden_states = self.final_norm(hidden_states)
        if output_hidden_states:
            all_hidden_states += (hidden_states,)
        if cache is not None:
            cache.seen_tokens += length

        out = BaseModelOutputWithPast(
            last_hidden_state=hidden_states,
            hidden_states=all_hidden_states if output_hidden_states else None,
            **{_CACHE_FIELD: cache},
        )
        return out if return_dict else out.to_tuple()


class XatlForCausalLM(XatlPreTrainedModel, GenerationMixin):
    """XatlModel plus an LM head (tied to the embeddings when config.tie_word_embeddings).

    Generation: `model.generate(ids, max_new_tokens=k)` keeps an `XatlCache` (created on the first forward with
    use_cache=True, then passed back by transformers under the name `cache`). By hand:
    `out = model(ids, use_cache=True)`, then `out = model(next_ids, past_key_values=out.past_key_values)`
    (`cache=` / `out.cache` are transformers 5's names for the same thing).
    """

    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}  # noqa: RUF012
    _is_stateful = True  # recurrent states cannot be cropped: transformers then refuses assisted generation

    @classmethod
    def _supports_default_dynamic_cache(cls) -> bool:
        """False: generate must not build its DynamicCache (our layer types are not its); forward builds ours."""
        return False

    def __init__(self, config: XatlConfig) -> None:
        super().__init__(config)
        self.model = XatlModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=config.lm_head_bias)
        self.post_init()
        # transformers copies config.use_cache (False by default here: plain forwards build no cache) into the
        # generation config, which would make `generate` re-read the whole prefix at every step. Generation
        # uses the cache unless `generate(..., use_cache=False)` asks otherwise.
        if self.generation_config is not None and not self.generation_config.use_cache:
            self.generation_config.use_cache = True

    def get_input_embeddings(self) -> nn.Embedding:
        return self.model.embed_tokens

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.model.embed_tokens = value

    def get_output_embeddings(self) -> nn.Linear:
        return self.lm_head

    def set_output_embeddings(self, new_embeddings: nn.Linear) -> None:
        self.lm_head = new_embeddings

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        return_dict: bool | None = None,
        position_ids: torch.LongTensor | None = None,
        output_hidden_states: bool | None = None,
        cache: XatlCache | None = None,
        use_cache: bool | None = None,
        past_key_values: XatlCache | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        **kwargs: Any,
    ) -> CausalLMOutputWithPast | tuple:
        """labels: next-token targets aligned with input_ids (shifted inside, -100 ignored), as transformers does.

        cache / past_key_values / use_cache: see `XatlModel.forward`; the output carries the cache (transformers 5
        names the field `cache`; `out.past_key_values` reads it too). logits_to_keep: as transformers (0 = all).
        """
        return_dict = return_dict if return_dict is not None else self.config.return_dict
        outputs = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            inputs_embeds=inputs_embeds,
            position_ids=position_ids,
            output_hidden_states=output_hidden_states,
            return_dict=True,
            cache=_pick_cache(cache, past_key_values),
            use_cache=use_cache,
        )
        hidden_states = outputs.last_hidden_state
        keep = slice(-logits_to_keep, None) if isinstance(logits_to_keep, int) else logits_to_keep
        logits = self.lm_head(hidden_states[:, keep])
        if self.config.logits_scaling != 1.0:  # Granite divides
            logits = logits / self.config.logits_scaling
        if self.config.final_logit_softcapping is not None:  # Gemma 2
            cap = self.config.final_logit_softcapping
            logits = torch.tanh(logits / cap) * cap
        loss = None
        if labels is not None:
            num_items = kwargs.get("num_items_in_batch")
            loss = self.loss_function(
                logits=logits, labels=labels, vocab_size=self.config.vocab_size, num_items_in_batch=num_items
            )
        out = CausalLMOutputWithPast(
            loss=loss,
            logits=logits,
            hidden_states=outputs.hidden_states,
            **{_CACHE_FIELD: getattr(outputs, _CACHE_FIELD)},
        )
        return out if return_dict else out.to_tuple()


__all__ = [
    "XatlAttention",
    "XatlBlock",
    "XatlCache",
    "XatlForCausalLM",
    "XatlGatedRMSNorm",
    "XatlMLP",
    "XatlMamba",
    "XatlMamba2",
    "XatlModel",
    "XatlPreTrainedModel",
    "XatlRMSNorm",
    "attention_type",
    "causal_attention_mask",
    "compute_default_rope_parameters",
    "compute_dtype",
    "init_xatl_weights",
    "kernel_path",
    "kernels_available",
    "kernels_for",
    "new_cache",
    "reference_path",
    "rope_inv_freq",
    "rotary_cos_sin",
    "rotary_tables",
    "selective_scan_reference",
    "ssd_chunk_scan_reference",
    "uses_rope",
]
