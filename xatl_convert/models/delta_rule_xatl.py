"""The readable PyTorch gated delta rule (Gated DeltaNet, Yang et al., ICLR 2025), and CPU stand-ins for fla's kernels.

The gated delta rule keeps, per value head, a state S (K × V) that decays and is corrected towards each new value:

    S_t = exp(g_t) S_t-1 + β_t k_t (v_t − exp(g_t) S_t-1ᵀ k_t)ᵀ        o_t = scale · S_tᵀ q_t

that is S_t = exp(g_t) (I − β_t k_t k_tᵀ) S_t-1 + β_t k_t v_tᵀ: g_t ≤ 0 is the log decay, β_t ∈ (0, 1) (up to 2
with fla's `allow_neg_eigval`) the step size of one online regression step of S towards v_t at k_t.
`recurrent_gated_delta_rule_reference` runs it token by token (decoding); `chunk_gated_delta_rule_reference`
computes the same thing chunk by chunk (prefill, training): within a chunk the updates are solved all at once by
the UT transform (one triangular solve), across chunks the state is carried in order. Both are plain autograd.

Layout as fla's (`head_first` removed there): batch first, q, k [B, T, H, K]; v [B, T, HV, V] with HV a multiple of
H (grouped value heads: q/k head h serves value heads h·HV/H to (h+1)·HV/H − 1); g, beta [B, T, HV]; states
[B, HV, K, V]. The stand-ins `chunk_gated_delta_rule` and `fused_recurrent_gated_delta_rule` take fla's public
signatures (fla.ops.gated_delta_rule, checked against fla-org/flash-linear-attention bc3b101d) and refuse, with
`DeltaRuleArgumentError`, what fla refuses and what they do not implement (varlen `cu_seqlens`, context parallelism,
per-key/per-value decays, per-value beta), so that a call fails on a CPU where it would fail on a GPU.

Self-contained (torch and the stdlib only): copied into every converted folder and loaded with trust_remote_code.
"""

from __future__ import annotations

import math
import warnings
from typing import Any

import torch
import torch.nn.functional as F

# fla's default and largest chunk (its kernels take 16, 32 or 64).
DELTA_RULE_CHUNK = 64
# fla's l2norm epsilon (fla.modules.l2norm), inside the square root.
L2NORM_EPS = 1e-6
_FLA_CHUNK_SIZES = (16, 32, 64)


class DeltaRuleArgumentError(ValueError):
    """A gated delta rule call that fla's kernels refuse, or that the stand-ins do not implement, refused on any
    device, with a message naming the argument."""


def _require(condition: bool, function: str, message: str) -> None:
    if not condition:
        raise DeltaRuleArgumentError(f"{function}: {message}")


def l2norm(x: torch.Tensor, eps: float = L2NORM_EPS) -> torch.Tensor:
    """fla's l2norm over the last dimension: x · rsqrt(Σx² + eps), so that a zero vector stays zero."""
    return x * torch.rsqrt((x * x).sum(dim=-1, keepdim=True) + eps)


def _compute_dtype(tensor: torch.Tensor) -> torch.dtype:
    """fp32 for 16- and 32-bit inputs (fla's kernels accumulate in fp32), float64 for float64 (logic, not rounding)."""
    return torch.promote_types(tensor.dtype, torch.float32)


def _check_inputs(
    function: str,
    q: Any,
    k: Any,
    v: Any,
    g: Any,
    beta: Any,
    initial_state: Any,
    state_v_first: bool = False,
) -> None:
    """Ranks, shapes and dtypes of one call (g and beta may be None where the caller allows it)."""
    named = (("q", q), ("k", k), ("v", v), ("g", g), ("beta", beta), ("initial_state", initial_state))
    for label, tensor in named:
        if tensor is None and label in ("g", "beta", "initial_state"):
            continue
        got = tensor.dtype if isinstance(tensor, torch.Tensor) else type(tensor).__name__
        ok = isinstance(tensor, torch.Tensor) and tensor.is_floating_point()
        _require(ok, function, f"{label} must be a floating-point tensor, got {got}")
    _require(q.dim() == 4, function, f"q must be [B, T, H, K] (batch first), got shape {tuple(q.shape)}")
    batch, length, heads, k_dim = q.shape
    _require(k.shape == q.shape, function, f"k must have q's shape {tuple(q.shape)}, got {tuple(k.shape)}")
    _require(
        v.dim() == 4 and tuple(v.shape[:2]) == (batch, length),
        function,
        f"v must be [B={batch}, T={length}, HV, V], got shape {tuple(v.shape)}",
    )
    v_heads, v_dim = v.shape[2], v.shape[3]
    _require(
        heads > 0 and v_heads % heads == 0,
        function,
        f"v's heads must be a multiple of q's and k's (grouped value heads), got HV={v_heads} for H={heads}",
    )
    for label, tensor in (("g", g), ("beta", beta)):
        if tensor is not None:
            expected = (batch, length, v_heads)
            _require(
                tuple(tensor.shape) == expected, function, f"{label} must be {expected}, got {tuple(tensor.shape)}"
            )
    if initial_state is not None:
        expected = (batch, v_heads, v_dim, k_dim) if state_v_first else (batch, v_heads, k_dim, v_dim)
        layout = "[B, HV, V, K]" if state_v_first else "[B, HV, K, V]"
        _require(
            tuple(initial_state.shape) == expected,
            function,
            f"initial_state must be {layout} = {expected}, got {tuple(initial_state.shape)}",
        )


def _prepare(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    beta: torch.Tensor,
    scale: float | None,
    initial_state: torch.Tensor | None,
    use_qk_l2norm_in_kernel: bool,
) -> tuple[torch.Tensor, ...]:
    """Both references' inputs, head first [B, HV, T, ·] in the compute dtype: q normalised and scaled, q and k
    repeated onto the value heads they serve; and the state entering the sequence (zeros without initial_state)."""
    ct = _compute_dtype(q)
    heads, v_heads, k_dim = q.shape[2], v.shape[2], q.shape[3]
    q, k = q.to(ct), k.to(ct)
    if use_qk_l2norm_in_kernel:
        q, k = l2norm(q), l2norm(k)
    q = q * (k_dim**-0.5 if scale is None else scale)
    if v_heads != heads:
        q, k = (t.repeat_interleave(v_heads // heads, dim=2) for t in (q, k))
    q, k, v = (t.transpose(1, 2).to(ct) for t in (q, k, v))
    g, beta = (t.transpose(1, 2).to(ct) for t in (g, beta))
    if initial_state is None:
        state = q.new_zeros(q.shape[0], v_heads, k_dim, v.shape[-1])
    else:
        state = initial_state.to(ct)
    return q, k, v, g, beta, state


def chunk_gated_delta_rule_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    beta: torch.Tensor,
    scale: float | None = None,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
    use_qk_l2norm_in_kernel: bool = False,
    chunk_size: int = DELTA_RULE_CHUNK,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The gated delta rule chunk by chunk: the prefill and training path (fla's chunked algorithm, in PyTorch).

    q, k [B, T, H, K]; v [B, T, HV, V]; g (log decay, ≤ 0), beta [B, T, HV]; initial_state [B, HV, K, V].
    `scale` defaults to K**-0.5; `use_qk_l2norm_in_kernel` applies fla's l2norm to q and k first. Computed in fp32
    (float64 in float64); returns o [B, T, HV, V] in q's dtype and, with `output_final_state`, the final state
    [B, HV, K, V] in fp32 (else None). Differentiable by autograd in every input, initial_state included.

    Within a chunk, with G_i the log decay summed from the chunk's start to step i and Γ_ij = exp(G_i − G_j) (j ≤ i),
    the corrections u_i = β_i (v_i − exp(g_i) S_i-1ᵀ k_i) satisfy (I + A) u = βv − β exp(G) K S_0 with A_ij =
    β_i Γ_ij k_i·k_j for j < i: one unit lower triangular solve per chunk (the UT transform) gives them all from
    the state S_0 entering it. Then o = exp(G) Q S_0 + (QKᵀ ⊙ Γ) u and S = exp(G_last) S_0 + (exp(G_last − G) K)ᵀ u.
    Only the state is carried from chunk to chunk; every exponent is ≤ 0, so nothing overflows. A last, shorter
    chunk is padded with steps that leave the state unchanged (g = 0, β = 0, k = v = 0).
    """
    name = "chunk_gated_delta_rule_reference"
    _check_inputs(name, q, k, v, g, beta, initial_state)
    _require(
        isinstance(chunk_size, int) and chunk_size >= 1, name, f"chunk_size must be a positive int, got {chunk_size!r}"
    )
    dtype_in, length = q.dtype, q.shape[1]
    q, k, v, g, beta, state = _prepare(q, k, v, g, beta, scale, initial_state, use_qk_l2norm_in_kernel)
    batch, v_heads, _, k_dim = k.shape
    v_dim = v.shape[-1]
    size = max(1, min(chunk_size, length))  # a shorter sequence is one chunk: no padding to compute
    pad = -length % size
    if pad:
        q, k, v = (F.pad(t, (0, 0, 0, pad)) for t in (q, k, v))
        g, beta = (F.pad(t, (0, pad)) for t in (g, beta))
    chunks = (length + pad) // size
    q, k, v = (t.reshape(batch, v_heads, chunks, size, t.shape[-1]) for t in (q, k, v))
    g, beta = (t.reshape(batch, v_heads, chunks, size) for t in (g, beta))

    log_decay = g.cumsum(dim=-1)  # G_i
    causal = torch.ones(size, size, dtype=torch.bool, device=q.device).tril()
    # Γ_ij = exp(G_i − G_j) for j ≤ i; the masked entries (positive exponents) never reach exp.
    pairwise = (log_decay[..., :, None] - log_decay[..., None, :]).masked_fill(~causal, -math.inf).exp()
    k_beta = k * beta[..., None]
    ut_system = ((k_beta @ k.transpose(-1, -2)) * pairwise).tril(-1)
    right = torch.cat([v * beta[..., None], k_beta * log_decay.exp()[..., None]], dim=-1)
    solved = torch.linalg.solve_triangular(ut_system, right, upper=False, unitriangular=True)
    new_values, state_reads = solved.split([v_dim, k_dim], dim=-1)  # u = new_values − state_reads S_0
    intra = (q @ k.transpose(-1, -2)) * pairwise
    q_decayed = q * log_decay.exp()[..., None]
    k_decayed = k * (log_decay[..., -1:] - log_decay).exp()[..., None]
    chunk_decay = log_decay[..., -1].exp()[..., None, None]

    outputs = []
    # unbind, not [:, :, i]: indexing's backward writes a full-size gradient per chunk.
    for new_values_c, state_reads_c, intra_c, q_c, k_c, decay_c in zip(
        *(t.unbind(2) for t in (new_values, state_reads, intra, q_decayed, k_decayed, chunk_decay)), strict=True
    ):
        corrections = new_values_c - state_reads_c @ state
        outputs.append(q_c @ state + intra_c @ corrections)
        state = state * decay_c + k_c.transpose(-1, -2) @ corrections
    if outputs:
        o = torch.cat(outputs, dim=2)[:, :, :length]
    else:
        o = v.new_zeros(batch, v_heads, 0, v_dim)
    o = o.transpose(1, 2).contiguous().to(dtype_in)
    return o, (state if output_final_state else None)


def recurrent_gated_delta_rule_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    beta: torch.Tensor,
    scale: float | None = None,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
    use_qk_l2norm_in_kernel: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The gated delta rule token by token, as written: the decoding path, and the definition the chunked form
    must match. Same arguments, shapes, dtypes and results as `chunk_gated_delta_rule_reference`.

    Per step: S ← exp(g_t) S; S ← S + k_t ⊗ β_t (v_t − Sᵀk_t); o_t = scale · Sᵀq_t.
    """
    _check_inputs("recurrent_gated_delta_rule_reference", q, k, v, g, beta, initial_state)
    dtype_in = q.dtype
    q, k, v, g, beta, state = _prepare(q, k, v, g, beta, scale, initial_state, use_qk_l2norm_in_kernel)
    outputs = []
    for q_t, k_t, v_t, g_t, beta_t in zip(*(t.unbind(2) for t in (q, k, v, g, beta)), strict=True):
        state = state * g_t.exp()[..., None, None]
        correction = beta_t[..., None] * (v_t - torch.einsum("bhk,bhkv->bhv", k_t, state))
        state = state + k_t[..., :, None] * correction[..., None, :]
        outputs.append(torch.einsum("bhk,bhkv->bhv", q_t, state))
    if outputs:
        o = torch.stack(outputs, dim=2)
    else:
        o = v.new_zeros(*v.shape[:2], 0, v.shape[-1])
    o = o.transpose(1, 2).contiguous().to(dtype_in)
    return o, (state if output_final_state else None)


# --------------------------------------------------------------------------------------------------------------
# Stand-ins: fla's public signatures, argument checks and semantics (fla.ops.gated_delta_rule)
# --------------------------------------------------------------------------------------------------------------


def _state_layout(function: str, state_v_first: bool, kwargs: dict[str, Any]) -> bool:
    """fla's `state_v_first`, with its deprecated alias `transpose_state_layout` (warned, as fla does)."""
    if "transpose_state_layout" in kwargs:
        _require(
            not state_v_first,
            function,
            "Cannot pass both `state_v_first` and the deprecated `transpose_state_layout`.",
        )
        warnings.warn(
            "`transpose_state_layout` is deprecated and renamed to `state_v_first`.", DeprecationWarning, stacklevel=3
        )
        state_v_first = bool(kwargs.pop("transpose_state_layout"))
    return state_v_first


def _check_no_varlen(function: str, **given: Any) -> None:
    """Variable-length batches (`cu_seqlens` and what goes with it) and context parallelism: not implemented."""
    for label, value in given.items():
        _require(
            value is None,
            function,
            f"{label} is not supported by the stand-in (no variable-length or context-parallel batches); "
            "pass equal-length sequences as [B, T, ...] instead",
        )


def _gate_and_beta(
    function: str,
    g: torch.Tensor | None,
    beta: torch.Tensor,
    use_gate_in_kernel: bool,
    A_log: torch.Tensor | None,
    dt_bias: torch.Tensor | None,
    use_beta_sigmoid_in_kernel: bool,
    allow_neg_eigval: bool,
) -> tuple[torch.Tensor | None, torch.Tensor]:
    """The activations fla can fuse into its kernels, done before the reference: the GDN gate
    g = −exp(A_log) · softplus(g + dt_bias) (A_log, dt_bias [HV]) and beta = sigmoid(beta), times 2 with
    `allow_neg_eigval`. Computed in fp32, as the kernels."""
    _require(
        not allow_neg_eigval or use_beta_sigmoid_in_kernel,
        function,
        "`allow_neg_eigval=True` requires `use_beta_sigmoid_in_kernel=True`.",
    )
    if use_gate_in_kernel:
        _require(A_log is not None, function, "A_log must be provided when use_gate_in_kernel=True.")
        _require(g is not None, function, "`g` (raw pre-activation) must be provided when `use_gate_in_kernel=True`.")
        v_heads = g.shape[-1]
        for label, tensor in (("A_log", A_log), ("dt_bias", dt_bias)):
            if tensor is not None:
                _require(
                    isinstance(tensor, torch.Tensor)
                    and tensor.is_floating_point()
                    and tuple(tensor.shape) == (v_heads,),
                    function,
                    f"{label} must be a floating-point tensor of shape ({v_heads},) (one per value head)",
                )
        ct = _compute_dtype(g)
        raw = g.to(ct) if dt_bias is None else g.to(ct) + dt_bias.to(ct)
        g = -A_log.to(ct).exp() * F.softplus(raw)  # fla's softplus: x above 20, as torch's default threshold
    if use_beta_sigmoid_in_kernel:
        beta = torch.sigmoid(beta.to(_compute_dtype(beta))) * (2.0 if allow_neg_eigval else 1.0)
    return g, beta


def _to_layout(state: torch.Tensor | None, state_v_first: bool) -> torch.Tensor | None:
    """A state between fla's V-first layout [N, HV, V, K] and the references' [N, HV, K, V] (its own inverse)."""
    return state.transpose(-1, -2).contiguous() if state is not None and state_v_first else state


def chunk_gated_delta_rule(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    beta: torch.Tensor,
    scale: float | None = None,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
    use_qk_l2norm_in_kernel: bool = False,
    use_beta_sigmoid_in_kernel: bool = False,
    allow_neg_eigval: bool = False,
    state_v_first: bool = False,
    cu_seqlens: torch.LongTensor | None = None,
    cu_seqlens_cpu: torch.LongTensor | None = None,
    chunk_indices: torch.LongTensor | None = None,
    cp_context: Any | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Stand-in for fla's `chunk_gated_delta_rule`: its signature (keywords `chunk_size`, `use_gate_in_kernel`,
    `A_log`, `dt_bias`, `transpose_state_layout` through **kwargs, as there; other keywords ignored, as there),
    its checks, and its results computed by `chunk_gated_delta_rule_reference`.

    Returns o [B, T, HV, V] in q's dtype and the final state in fp32 ([B, HV, K, V], or [B, HV, V, K] with
    `state_v_first`) or None. Refused: `head_first` (removed from fla), chunk_size other than 16, 32, 64, and what
    the stand-in does not implement: `cu_seqlens` (with `cu_seqlens_cpu`, `chunk_indices`) and `cp_context`.
    """
    name = "chunk_gated_delta_rule"
    state_v_first = _state_layout(name, state_v_first, kwargs)
    _require(
        "head_first" not in kwargs,
        name,
        "head_first has been removed. Inputs must be in `[B, T, H, ...]` format.",
    )
    chunk_size = kwargs.pop("chunk_size", DELTA_RULE_CHUNK)
    _require(
        chunk_size in _FLA_CHUNK_SIZES,
        name,
        f"`chunk_size` must be 16, 32, or 64 for Gated Delta Rule, got {chunk_size}.",
    )
    _check_no_varlen(
        name, cu_seqlens=cu_seqlens, cu_seqlens_cpu=cu_seqlens_cpu, chunk_indices=chunk_indices, cp_context=cp_context
    )
    _require(g is not None, name, "g (the log decay [B, T, HV]) is required")
    _require(beta is not None, name, "beta ([B, T, HV]) is required")
    _check_inputs(name, q, k, v, g, beta, initial_state, state_v_first)
    g, beta = _gate_and_beta(
        name,
        g,
        beta,
        bool(kwargs.get("use_gate_in_kernel", False)),
        kwargs.get("A_log"),
        kwargs.get("dt_bias"),
        use_beta_sigmoid_in_kernel,
        allow_neg_eigval,
    )
    o, final_state = chunk_gated_delta_rule_reference(
        q,
        k,
        v,
        g,
        beta,
        scale=scale,
        initial_state=_to_layout(initial_state, state_v_first),
        output_final_state=output_final_state,
        use_qk_l2norm_in_kernel=use_qk_l2norm_in_kernel,
        chunk_size=chunk_size,
    )
    return o, _to_layout(final_state, state_v_first)


class _NoBackward(torch.autograd.Function):
    """Passes a result through; its backward raises, as fla's fused recurrent kernel (forward only) does."""

    @staticmethod
    def forward(ctx: torch.autograd.function.FunctionCtx, result: torch.Tensor, *inputs: torch.Tensor) -> torch.Tensor:
        return result.clone()

    @staticmethod
    def backward(ctx: torch.autograd.function.FunctionCtx, *grads: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        raise NotImplementedError(
            "fused_recurrent_gated_delta_rule: fla implements no backward pass for the fused recurrent kernel; "
            "train with chunk_gated_delta_rule"
        )


def fused_recurrent_gated_delta_rule(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor | None = None,
    gk: torch.Tensor | None = None,
    gv: torch.Tensor | None = None,
    beta: torch.Tensor | None = None,
    scale: float | None = None,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
    use_qk_l2norm_in_kernel: bool = False,
    use_gate_in_kernel: bool = False,
    A_log: torch.Tensor | None = None,
    dt_bias: torch.Tensor | None = None,
    use_beta_sigmoid_in_kernel: bool = False,
    allow_neg_eigval: bool = False,
    state_v_first: bool = False,
    cu_seqlens: torch.LongTensor | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Stand-in for fla's `fused_recurrent_gated_delta_rule` (decoding): its signature, checks and results,
    computed by `recurrent_gated_delta_rule_reference`; forward only, as fla's kernel, whose backward raises.

    g None: no decay; beta None: ones. Returns o [B, T, HV, V] in v's dtype (fla allocates it like v) and the final
    state in fp32 or None. Refused: what the stand-in does not implement: `cu_seqlens`, the per-key and per-value
    decays `gk`, `gv`, a per-value beta [B, T, HV, V], and `head_first=True` (fla ignores it: its inputs are
    always [B, T, H, ...]); other keywords are ignored, as there.
    """
    name = "fused_recurrent_gated_delta_rule"
    state_v_first = _state_layout(name, state_v_first, kwargs)
    _require(
        not kwargs.get("head_first", False),
        name,
        "head_first=True is not supported: inputs must be in `[B, T, H, ...]` format.",
    )
    _check_no_varlen(name, cu_seqlens=cu_seqlens)
    for label, tensor in (("gk", gk), ("gv", gv)):
        _require(tensor is None, name, f"{label} (per-key / per-value decays) is not implemented by the stand-in")
    if isinstance(beta, torch.Tensor):
        _require(
            beta.dim() != 4,
            name,
            "beta must be [B, T, HV]: the stand-in does not implement a per-value beta [B, T, HV, V]",
        )
    _check_inputs(name, q, k, v, g, beta, initial_state, state_v_first)
    if beta is None:
        beta = v.new_ones(v.shape[:3])  # fla: ones (like q's [B, T, H]; one per value head here)
    g, beta = _gate_and_beta(
        name, g, beta, use_gate_in_kernel, A_log, dt_bias, use_beta_sigmoid_in_kernel, allow_neg_eigval
    )
    if g is None:
        g = v.new_zeros(v.shape[:3])  # no decay
    inputs = tuple(t for t in (q, k, v, g, beta, initial_state, A_log, dt_bias) if isinstance(t, torch.Tensor))
    with torch.no_grad():
        o, final_state = recurrent_gated_delta_rule_reference(
            q,
            k,
            v,
            g,
            beta,
            scale=scale,
            initial_state=_to_layout(initial_state, state_v_first),
            output_final_state=output_final_state,
            use_qk_l2norm_in_kernel=use_qk_l2norm_in_kernel,
        )
    o = _NoBackward.apply(o.to(v.dtype), *inputs)
    if final_state is not None:
        final_state = _NoBackward.apply(_to_layout(final_state, state_v_first), *inputs)
    return o, final_state
