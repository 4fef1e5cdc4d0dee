"""The `xatl` decoder family: a Transformer block skeleton with a per-layer mixer (attention or Mamba).

Self-contained on purpose (torch, transformers and the stdlib only): this file is copied into every converted
model folder and loaded with `trust_remote_code=True` where `xatl_convert` is not installed. mamba_ssm and
causal_conv1d are optional and imported lazily, per call, only for CUDA inputs.
"""

from __future__ import annotations

import functools
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

# Marks set on nn.Linear modules so that `init_xatl_weights` can initialise each module on its own, in any order.
_INIT_ROLE = "_xatl_init_role"
_RESIDUAL_OUT = "residual_out"  # out_proj of a mixer, mlp.fc2: scaled down like mamba-ssm's prenorm rescale
_DT_PROJ = "dt_proj"  # Mamba's dt_proj: mamba-ssm's dt init, bias never zeroed


# --------------------------------------------------------------------------------------------------------------
# Optional CUDA kernels
# --------------------------------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=1)
def _mamba_kernels() -> tuple[Callable[..., torch.Tensor], Callable[..., torch.Tensor]] | None:
    """(causal_conv1d_fn, selective_scan_fn) if both packages import, else None. Tried once, on first use."""
    try:
        from causal_conv1d import causal_conv1d_fn
        from mamba_ssm.ops.selective_scan_interface import selective_scan_fn
    except Exception:  # ImportError, or a broken CUDA build raising something else
        return None
    return causal_conv1d_fn, selective_scan_fn


def selective_scan_reference(
    u: torch.Tensor,
    delta: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor | None = None,
    z: torch.Tensor | None = None,
    delta_bias: torch.Tensor | None = None,
    delta_softplus: bool = False,
) -> torch.Tensor:
    """Readable PyTorch selective scan with mamba-ssm's `selective_scan_fn` signature and semantics.

    Shapes: u, delta, z (batch, d, L); A (d, n); B, C (batch, n, L); D, delta_bias (d,). Computed in fp32; the
    discretisation is vectorised over the sequence, only the recurrence h_t = exp(dt A) h_{t-1} + dt B_t x_t
    loops over time. Returns y (batch, d, L) in u's dtype.
    """
    dtype_in = u.dtype
    u, delta, B, C = u.float(), delta.float(), B.float(), C.float()
    if delta_bias is not None:
        delta = delta + delta_bias.float()[:, None]
    if delta_softplus:
        delta = F.softplus(delta)
    delta_A = torch.exp(delta.unsqueeze(-1) * A.float()[:, None, :])  # (b, d, L, n)
    delta_B_u = (delta * u).unsqueeze(-1) * B.transpose(1, 2).unsqueeze(1)  # (b, d, L, n)
    h = u.new_zeros(u.shape[0], u.shape[1], A.shape[1])  # (b, d, n)
    ys = []
    for t in range(u.shape[-1]):
        h = delta_A[:, :, t] * h + delta_B_u[:, :, t]
        ys.append(torch.einsum("bdn,bn->bd", h, C[:, :, t]))
    y = torch.stack(ys, dim=-1)
    if D is not None:
        y = y + u * D.float()[:, None]
    if z is not None:
        y = y * F.silu(z.float())
    return y.to(dtype_in)


# --------------------------------------------------------------------------------------------------------------
# Building blocks
# --------------------------------------------------------------------------------------------------------------


class XatlRMSNorm(nn.Module):
    """RMSNorm computed in fp32, exactly as transformers' Llama does it."""

    def __init__(self, hidden_size: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.variance_epsilon = eps

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        input_dtype = hidden_states.dtype
        hidden_states = hidden_states.to(torch.float32)
        variance = hidden_states.pow(2).mean(-1, keepdim=True)
        hidden_states = hidden_states * torch.rsqrt(variance + self.variance_epsilon)
        return self.weight * hidden_states.to(input_dtype)


def _make_norm(config: XatlConfig) -> nn.Module:
    if config.norm_type == "rmsnorm":
        return XatlRMSNorm(config.hidden_size, eps=config.norm_eps)
    return nn.LayerNorm(config.hidden_size, eps=config.norm_eps, bias=config.norm_bias)


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
    """cos, sin of shape (batch, L, rotary_dims), built exactly as transformers' GPT-NeoX / Llama rotary modules.

    See `rope_inv_freq`; cos and sin are scaled by the rope type's attention_scaling (yarn, longrope), as Llama
    does. Nothing is stored in a buffer: a meta-device model made real by `to_empty` has nothing to re-initialise.
    """
    inv_freq, attention_scaling = rope_inv_freq(config, position_ids)
    freqs = position_ids[..., None].float() * inv_freq.to(device=position_ids.device, dtype=torch.float)
    emb = torch.cat((freqs, freqs), dim=-1)
    cos = emb.cos() * attention_scaling
    sin = emb.sin() * attention_scaling
    return cos.to(dtype), sin.to(dtype)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x[..., : x.shape[-1] // 2], x[..., x.shape[-1] // 2 :]
    return torch.cat((-x2, x1), dim=-1)


def _apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate the first cos.shape[-1] dims of x (batch, heads, L, head_dim); pass the rest through."""
    rot = cos.shape[-1]
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    x_rot, x_pass = x[..., :rot], x[..., rot:]
    return torch.cat((x_rot * cos + _rotate_half(x_rot) * sin, x_pass), dim=-1)


class XatlAttention(nn.Module):
    """Causal softmax attention with (partial) RoPE and GQA; q/k/v stored blocked, like Llama."""

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

    def forward(
        self,
        hidden_states: torch.Tensor,
        position_embeddings: tuple[torch.Tensor, torch.Tensor],
        attn_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """attn_mask: None (plain causal) or a boolean (batch, 1, L, L) mask, True = may attend."""
        b, length, _ = hidden_states.shape
        q = self.q_proj(hidden_states).view(b, length, self.num_heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(hidden_states).view(b, length, self.num_kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(hidden_states).view(b, length, self.num_kv_heads, self.head_dim).transpose(1, 2)
        cos, sin = position_embeddings
        if cos.shape[-1] > 0:
            q, k = _apply_rotary(q, cos, sin), _apply_rotary(k, cos, sin)
        if self.num_kv_heads != self.num_heads:  # GQA: each kv head serves a consecutive group of query heads
            k = k.repeat_interleave(self.num_heads // self.num_kv_heads, dim=1)
            v = v.repeat_interleave(self.num_heads // self.num_kv_heads, dim=1)
        out = F.scaled_dot_product_attention(
            q, k, v, attn_mask=attn_mask, is_causal=attn_mask is None, scale=self.head_dim**-0.5
        )
        return self.out_proj(out.transpose(1, 2).reshape(b, length, self.num_heads * self.head_dim))


class XatlMamba(nn.Module):
    """Selective SSM mixer with mamba-ssm's Mamba (v1) parameter names and shapes.

    Runs the mamba-ssm / causal-conv1d kernels for CUDA inputs when they import, else `selective_scan_reference`.
    """

    def __init__(self, config: XatlConfig, layer_idx: int) -> None:
        super().__init__()
        m = config.mamba
        self.layer_idx = layer_idx
        self.d_state, self.d_conv, self.dt_rank = m["d_state"], m["d_conv"], m["dt_rank"]
        self.d_inner = m["expand"] * config.hidden_size
        self.in_proj = nn.Linear(config.hidden_size, 2 * self.d_inner, bias=m["proj_bias"])
        self.conv1d = nn.Conv1d(
            self.d_inner,
            self.d_inner,
            kernel_size=self.d_conv,
            groups=self.d_inner,
            padding=self.d_conv - 1,
            bias=m["conv_bias"],
        )
        self.x_proj = nn.Linear(self.d_inner, self.dt_rank + 2 * self.d_state, bias=False)
        self.dt_proj = nn.Linear(self.dt_rank, self.d_inner, bias=True)
        setattr(self.dt_proj, _INIT_ROLE, _DT_PROJ)
        self.A_log = nn.Parameter(torch.empty(self.d_inner, self.d_state))
        self.D = nn.Parameter(torch.empty(self.d_inner))
        self.out_proj = nn.Linear(self.d_inner, config.hidden_size, bias=m["out_proj_bias"])
        setattr(self.out_proj, _INIT_ROLE, _RESIDUAL_OUT)

    def forward(self, hidden_states: torch.Tensor, padding_mask: torch.Tensor | None = None) -> torch.Tensor:
        """padding_mask (batch, L), 1 = token, 0 = padding: padded inputs are zeroed so they add no state."""
        length = hidden_states.shape[1]
        kernels = _mamba_kernels() if hidden_states.is_cuda else None
        x, z = self.in_proj(hidden_states).transpose(1, 2).chunk(2, dim=1)  # (b, d_inner, L) each
        if padding_mask is not None:
            x = x * padding_mask[:, None, :].to(x.dtype)
        if kernels is not None:
            causal_conv1d_fn, _ = kernels
            w = self.conv1d.weight.squeeze(1)  # (d_inner, d_conv)
            x = causal_conv1d_fn(x.contiguous(), w, self.conv1d.bias, activation="silu")
        else:
            x = F.silu(self.conv1d(x)[..., :length])
        if padding_mask is not None:
            x = x * padding_mask[:, None, :].to(x.dtype)

        dt, B, C = self.x_proj(x.transpose(1, 2)).split([self.dt_rank, self.d_state, self.d_state], dim=-1)
        dt = F.linear(dt, self.dt_proj.weight).transpose(1, 2)  # (b, d_inner, L); the bias is added in the scan
        B, C = B.transpose(1, 2).contiguous(), C.transpose(1, 2).contiguous()  # (b, d_state, L)
        A = -torch.exp(self.A_log.float())
        scan = kernels[1] if kernels is not None else selective_scan_reference
        y = scan(
            x,
            dt,
            A,
            B,
            C,
            self.D.float(),
            z=z,
            delta_bias=self.dt_proj.bias.float(),
            delta_softplus=True,
        )
        return self.out_proj(y.transpose(1, 2))


class XatlBlock(GradientCheckpointingLayer):
    """norm → mixer and norm → MLP, with a parallel (GPT-NeoX) or sequential (Llama) residual."""

    def __init__(self, config: XatlConfig, layer_idx: int) -> None:
        super().__init__()
        self.layer_type = config.layer_types[layer_idx]
        self.parallel_residual = config.parallel_residual
        self.input_norm = _make_norm(config)
        if self.layer_type == "attention":
            self.mixer: nn.Module = XatlAttention(config, layer_idx)
        else:
            self.mixer = XatlMamba(config, layer_idx)
        self.mlp_norm = _make_norm(config)
        self.mlp = XatlMLP(config)

    def forward(
        self,
        hidden_states: torch.Tensor,
        position_embeddings: tuple[torch.Tensor, torch.Tensor] | None = None,
        attn_mask: torch.Tensor | None = None,
        padding_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        normed = self.input_norm(hidden_states)
        if self.layer_type == "attention":
            mixed = self.mixer(normed, position_embeddings, attn_mask)
        else:
            mixed = self.mixer(normed, padding_mask)
        if self.parallel_residual:
            return hidden_states + mixed + self.mlp(self.mlp_norm(hidden_states))
        hidden_states = hidden_states + mixed
        return hidden_states + self.mlp(self.mlp_norm(hidden_states))


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
    elif isinstance(module, (nn.LayerNorm, XatlRMSNorm)):
        if _fresh(module.weight):
            nn.init.ones_(module.weight)
        if _fresh(getattr(module, "bias", None)):
            nn.init.zeros_(module.bias)
    elif isinstance(module, XatlMamba):
        if _fresh(module.A_log):  # S4D-real: A = -(1..d_state) in every channel
            a = torch.arange(1, module.d_state + 1, dtype=torch.float32, device=module.A_log.device)
            module.A_log.copy_(torch.log(a).expand(module.d_inner, -1))
        if _fresh(module.D):
            nn.init.ones_(module.D)


def _init_dt_proj(linear: nn.Linear, config: XatlConfig) -> None:
    """mamba-ssm's dt_proj init: weight U(±dt_rank^-0.5 · dt_scale); bias = softplus^-1(dt), dt log-uniform."""
    m = config.mamba
    if _fresh(linear.weight):
        std = linear.in_features**-0.5 * m["dt_scale"]
        nn.init.uniform_(linear.weight, -std, std)
    if _fresh(linear.bias):
        log_lo, log_hi = math.log(m["dt_min"]), math.log(m["dt_max"])
        u = torch.rand(linear.out_features, dtype=torch.float32, device=linear.bias.device)
        dt = torch.exp(u * (log_hi - log_lo) + log_lo).clamp(min=m["dt_init_floor"])
        linear.bias.copy_(dt + torch.log(-torch.expm1(-dt)))  # inverse of softplus


# --------------------------------------------------------------------------------------------------------------
# Models
# --------------------------------------------------------------------------------------------------------------


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
        **kwargs: Any,
    ) -> BaseModelOutputWithPast | tuple:
        """attention_mask: optional (batch, L) 1/0 padding mask. No cache yet: every call sees the whole sequence."""
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids or inputs_embeds")
        if output_hidden_states is None:
            output_hidden_states = self.config.output_hidden_states
        return_dict = return_dict if return_dict is not None else self.config.return_dict
        hidden_states = self.embed_tokens(input_ids) if inputs_embeds is None else inputs_embeds
        length = hidden_states.shape[1]
        device = hidden_states.device

        if attention_mask is not None and bool(attention_mask.all()):
            attention_mask = None  # no padding: take the plain causal path
        attn_mask = None
        if attention_mask is not None:
            causal = torch.ones(length, length, dtype=torch.bool, device=device).tril()
            attn_mask = causal & attention_mask.bool()[:, None, None, :]
            # Let every query see itself, so fully padded rows give finite (ignored) outputs instead of NaN.
            attn_mask = attn_mask | torch.eye(length, dtype=torch.bool, device=device)

        position_embeddings = None
        if "attention" in self.config.layer_types:
            if position_ids is None:
                position_ids = torch.arange(length, device=device).unsqueeze(0)
            position_embeddings = rotary_cos_sin(self.config, position_ids, hidden_states.dtype)

        all_hidden_states: tuple[torch.Tensor, ...] = ()
        for layer in self.layers:
            if output_hidden_states:
                all_hidden_states += (hidden_states,)
            hidden_states = layer(hidden_states, position_embeddings, attn_mask, attention_mask)
        hidden_states = self.final_norm(hidden_states)
        if output_hidden_states:
            all_hidden_states += (hidden_states,)

        out = BaseModelOutputWithPast(
            last_hidden_state=hidden_states, hidden_states=all_hidden_states if output_hidden_states else None
        )
        return out if return_dict else out.to_tuple()


class XatlForCausalLM(XatlPreTrainedModel, GenerationMixin):
    """XatlModel plus an LM head (tied to the embeddings when config.tie_word_embeddings)."""

    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}  # noqa: RUF012

    def __init__(self, config: XatlConfig) -> None:
        super().__init__(config)
        self.model = XatlModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

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
        **kwargs: Any,
    ) -> CausalLMOutputWithPast | tuple:
        """labels: next-token targets aligned with input_ids (shifted inside, -100 ignored), as transformers does.

        Cache arguments (cache, past_key_values, use_cache) are accepted and ignored: no cache yet.
        """
        return_dict = return_dict if return_dict is not None else self.config.return_dict
        outputs = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            inputs_embeds=inputs_embeds,
            position_ids=position_ids,
            output_hidden_states=output_hidden_states,
            return_dict=True,
        )
        logits = self.lm_head(outputs.last_hidden_state)
        loss = None
        if labels is not None:
            num_items = kwargs.get("num_items_in_batch")
            loss = self.loss_function(
                logits=logits, labels=labels, vocab_size=self.config.vocab_size, num_items_in_batch=num_items
            )
        out = CausalLMOutputWithPast(loss=loss, logits=logits, hidden_states=outputs.hidden_states)
        return out if return_dict else out.to_tuple()


__all__ = [
    "XatlAttention",
    "XatlBlock",
    "XatlForCausalLM",
    "XatlMLP",
    "XatlMamba",
    "XatlModel",
    "XatlPreTrainedModel",
    "XatlRMSNorm",
    "compute_default_rope_parameters",
    "init_xatl_weights",
    "rope_inv_freq",
    "rotary_cos_sin",
    "selective_scan_reference",
]
