"""The readable PyTorch SSM scans: the reference path of the xatl Mamba and Mamba2 mixers.

`selective_scan_reference` and `ssd_chunk_scan_reference` are written for clarity, not speed: they define what the
CUDA kernels must compute. Mamba (v1)'s reference path and kernel stand-in run `selective_scan_chunked`, the same
scan computed chunk by chunk with its own backward, fast enough to train on a CPU; tests hold it to the reference.
Self-contained (torch only): copied into every converted folder.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


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
    return_last_state: bool = False,
    initial_state: torch.Tensor | None = None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Readable PyTorch selective scan with mamba-ssm's `selective_scan_fn` signature and semantics.

    Shapes: u, delta, z (batch, d, L); A (d, n); B, C (batch, n, L); D, delta_bias (d,). Computed in fp32; the
    discretisation is vectorised over the sequence, only the recurrence h_t = exp(dt A) h_{t-1} + dt B_t x_t
    loops over time. Returns y (batch, d, L) in u's dtype, and with `return_last_state` also the final state h_L
    (batch, d, n) in fp32. `initial_state` (batch, d, n), an extension of ours, is h_0 (zeros when None).
    float64 inputs are computed in float64 (see `compute_dtype`).
    """
    dtype_in, ct = u.dtype, compute_dtype(u)
    u, delta, B, C = _scan_inputs(u, delta, B, C, delta_bias, delta_softplus)
    delta_A = torch.exp(delta.unsqueeze(-1) * A.to(ct)[:, None, :])  # (b, d, L, n)
    delta_B_u = (delta * u).unsqueeze(-1) * B.transpose(1, 2).unsqueeze(1)  # (b, d, L, n)
    h = u.new_zeros(u.shape[0], u.shape[1], A.shape[1]) if initial_state is None else initial_state.to(ct)
    ys = []
    # unbind, not [:, :, t]: indexing's backward writes a full-size gradient per step, which grows with L².
    for delta_A_t, delta_B_u_t, C_t in zip(delta_A.unbind(2), delta_B_u.unbind(2), C.unbind(2), strict=True):
        h = delta_A_t * h + delta_B_u_t
        ys.append(torch.einsum("bdn,bn->bd", h, C_t))
    y = _skip_and_gate(torch.stack(ys, dim=-1), u, D, z).to(dtype_in)
    return (y, h) if return_last_state else y


# Steps per chunk. Measured on a CPU (forward + backward): 4 to 32 are within 15% of each other at 4 × 256 tokens,
# d 576, n 16; longer chunks fall out of cache (64: +30%), shorter ones pay more per-chunk overhead on small states
# (d 8, n 4, 2048 tokens: 4 takes twice as long as 16).
SELECTIVE_SCAN_CHUNK = 16


def selective_scan_chunked(
    u: torch.Tensor,
    delta: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor | None = None,
    z: torch.Tensor | None = None,
    delta_bias: torch.Tensor | None = None,
    delta_softplus: bool = False,
    return_last_state: bool = False,
    initial_state: torch.Tensor | None = None,
    *,
    chunk_size: int = SELECTIVE_SCAN_CHUNK,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """`selective_scan_reference` computed chunk by chunk: the fast path for training and prefill.

    Same signature, shapes, dtypes and results (to fp32 rounding). The sequence is cut into chunks of `chunk_size`
    steps, taken in order, each starting from the state the previous one ended with. Within a chunk, the
    discretisation exp(dt A), dt B x and the output contraction with C are computed for all its steps at once, on
    (chunk_size, batch, d, n) tensors small enough to stay in cache; the recurrence itself is the reference's,
    h_t = exp(dt A) h_t-1 + dt B_t x_t, one step at a time, so the numerics are the reference's and nothing can
    overflow. The scan has its own backward, mamba-ssm's kernel's scheme: only the state entering each chunk is
    kept; backward recomputes a chunk's states from it and runs the adjoint recurrence back through the chunk.
    Nothing of size L x batch x d x n is ever held, and autograd records no per-step graph.
    """
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive number of steps, got {chunk_size}")
    dtype_in, ct = u.dtype, compute_dtype(u)
    u, delta, B, C = _scan_inputs(u, delta, B, C, delta_bias, delta_softplus)
    # Time first, (L, batch, ·), so that a chunk and a step are contiguous blocks.
    delta_t, B_t, C_t = (t.permute(2, 0, 1).contiguous() for t in (delta, B, C))
    delta_u = delta_t * u.permute(2, 0, 1)
    h0 = None if initial_state is None else initial_state.to(ct)
    y, last_state = _ChunkedSelectiveScan.apply(delta_t, A.to(ct), delta_u, B_t, C_t, h0, chunk_size)
    y = _skip_and_gate(y.permute(1, 2, 0).contiguous(), u, D, z).to(dtype_in)  # (b, d, L), as the reference's
    return (y, last_state) if return_last_state else y


class _ChunkedSelectiveScan(torch.autograd.Function):
    """y_t = C_t · h_t with h_t = exp(delta_t A) h_t-1 + delta_u_t B_t, chunk by chunk, and its backward.

    Time-first shapes: delta, delta_u (L, b, d); B, C (L, b, n); A (d, n); h0 (b, d, n) or None (zeros).
    Returns y (L, b, d) and the last state (b, d, n).
    """

    @staticmethod
    def forward(
        ctx: torch.autograd.function.FunctionCtx,
        delta: torch.Tensor,
        A: torch.Tensor,
        delta_u: torch.Tensor,
        B: torch.Tensor,
        C: torch.Tensor,
        h0: torch.Tensor | None,
        chunk_size: int,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        length, batch, d = delta.shape
        h = delta.new_zeros(batch, d, A.shape[1]) if h0 is None else h0
        entering = []
        y = delta.new_empty(length, batch, d)
        for start in range(0, length, chunk_size):
            chunk = slice(start, start + chunk_size)
            entering.append(h)
            _, states = _chunk_states(delta[chunk], A, delta_u[chunk], B[chunk], h)
            y[chunk] = torch.einsum("tbdn,tbn->tbd", states, C[chunk])
            h = states[-1].clone()  # not a view: the chunk's states are freed
        ctx.save_for_backward(delta, A, delta_u, B, C, torch.stack(entering))
        ctx.chunk_size = chunk_size
        return y, h

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(
        ctx: torch.autograd.function.FunctionCtx, grad_y: torch.Tensor, grad_last: torch.Tensor
    ) -> tuple[torch.Tensor | None, ...]:
        delta, A, delta_u, B, C, entering = ctx.saved_tensors
        grad_delta, grad_delta_u = torch.empty_like(delta), torch.empty_like(delta_u)
        grad_B, grad_C, grad_A = torch.empty_like(B), torch.empty_like(C), torch.zeros_like(A)
        # carried = dL/dh at the end of the chunk being processed, from every later step.
        carried = grad_last.clone()
        starts = range(0, delta.shape[0], ctx.chunk_size)
        for index, start in reversed(list(enumerate(starts))):
            chunk = slice(start, start + ctx.chunk_size)
            decay, states = _chunk_states(delta[chunk], A, delta_u[chunk], B[chunk], entering[index])
            grad_y_chunk = grad_y[chunk]
            grad_C[chunk] = torch.einsum("tbdn,tbd->tbn", states, grad_y_chunk)
            # The adjoint recurrence, backwards: g_t = dL/dh_t = grad_y_t C_t + exp(delta_t+1 A) g_t+1.
            g = grad_y_chunk.unsqueeze(-1) * C[chunk].unsqueeze(2)
            g[-1] += carried
            for step in range(g.shape[0] - 2, -1, -1):
                g[step].addcmul_(decay[step + 1], g[step + 1])
            carried = decay[0] * g[0]
            grad_delta_u[chunk] = torch.einsum("tbdn,tbn->tbd", g, B[chunk])
            grad_B[chunk] = torch.einsum("tbdn,tbd->tbn", g, delta_u[chunk])
            # dL/d(delta_t A) = g_t · h_t-1 · exp(delta_t A), reusing the states' memory for h_t-1.
            previous = torch.cat([entering[index][None], states[:-1]])
            grad_log_decay = previous.mul_(decay).mul_(g)
            grad_delta[chunk] = torch.einsum("tbdn,dn->tbd", grad_log_decay, A)
            grad_A += torch.einsum("tbdn,tbd->dn", grad_log_decay, delta[chunk])
        grad_h0 = carried if ctx.needs_input_grad[5] else None
        return grad_delta, grad_A, grad_delta_u, grad_B, grad_C, grad_h0, None


def _chunk_states(
    delta: torch.Tensor, A: torch.Tensor, delta_u: torch.Tensor, B: torch.Tensor, h: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """One chunk's decays exp(delta A) and states h_t (both (T, b, d, n)) from the state h entering it."""
    decay = torch.exp(delta.unsqueeze(-1) * A)
    states = delta_u.unsqueeze(-1) * B.unsqueeze(2)
    states[0].addcmul_(decay[0], h)
    for step in range(1, states.shape[0]):
        states[step].addcmul_(decay[step], states[step - 1])
    return decay, states


def _scan_inputs(
    u: torch.Tensor,
    delta: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    delta_bias: torch.Tensor | None,
    delta_softplus: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """u, delta, B, C in the compute dtype, delta with its bias and softplus: what both selective scans start from."""
    ct = compute_dtype(u)
    u, delta, B, C = u.to(ct), delta.to(ct), B.to(ct), C.to(ct)
    if delta_bias is not None:
        delta = delta + delta_bias.to(ct)[:, None]
    return u, (F.softplus(delta) if delta_softplus else delta), B, C


def _skip_and_gate(y: torch.Tensor, u: torch.Tensor, D: torch.Tensor | None, z: torch.Tensor | None) -> torch.Tensor:
    """The selective scans' output: y + D·u, gated by silu(z), in u's (compute) dtype."""
    if D is not None:
        y = y + u * D.to(u.dtype)[:, None]
    return y * F.silu(z.to(u.dtype)) if z is not None else y


def compute_dtype(tensor: torch.Tensor) -> torch.dtype:
    """The dtype the scans, steps and gated norm compute in: fp32 for 16- and 32-bit inputs, as mamba-ssm does,
    and float64 for float64 inputs, so that a float64 run separates a logic error from rounding."""
    return torch.promote_types(tensor.dtype, torch.float32)


def _segsum(x: torch.Tensor) -> torch.Tensor:
    """out[..., i, j] = sum(x[..., j+1 : i+1]) for j <= i, -inf above the diagonal (mamba-ssm's stable segsum)."""
    length = x.shape[-1]
    x = x[..., None].expand(*x.shape, length)  # x[..., i, j] = x[..., i]
    below = torch.ones(length, length, dtype=torch.bool, device=x.device).tril(-1)
    x_segsum = x.masked_fill(~below, 0).cumsum(dim=-2)
    on_or_below = torch.ones(length, length, dtype=torch.bool, device=x.device).tril()
    return x_segsum.masked_fill(~on_or_below, -torch.inf)


def ssd_chunk_scan_reference(
    x: torch.Tensor,
    dt: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    chunk_size: int,
    D: torch.Tensor | None = None,
    dt_bias: torch.Tensor | None = None,
    initial_states: torch.Tensor | None = None,
    dt_softplus: bool = False,
    return_final_states: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Chunked SSD scan (mamba-ssm's `ssd_minimal_discrete`) with `mamba_chunk_scan_combined`'s signature subset.

    Shapes: x (batch, L, heads, headdim); dt (batch, L, heads); A, D, dt_bias (heads,); B, C (batch, L, groups,
    d_state), shared by heads // groups consecutive heads; initial_states (batch, heads, headdim, d_state).
    The recurrence h_t = exp(dt_t A) h_{t-1} + dt_t x_t B_tᵀ, y_t = h_t C_t + D x_t is computed in fp32 (float64
    for float64 inputs) as quadratic attention-like blocks within chunks of `chunk_size` plus a state passed
    between chunks; L is padded up to a multiple of chunk_size (the padding has dt·A = 0 and x = 0, so it changes
    no state).
    Returns y (batch, L, heads, headdim) in x's dtype, and with `return_final_states` also h_L (batch, heads,
    headdim, d_state) in the compute dtype.
    """
    batch, length, heads, _ = x.shape
    dtype_in = x.dtype
    ct = compute_dtype(x)
    dt = dt.to(ct)
    if dt_bias is not None:
        dt = dt + dt_bias.to(ct)
    if dt_softplus:
        dt = F.softplus(dt)
    rep = heads // B.shape[2]
    B = B.to(ct).repeat_interleave(rep, dim=2)  # (b, L, h, n)
    C = C.to(ct).repeat_interleave(rep, dim=2)
    X = x.to(ct) * dt[..., None]  # x scaled by dt
    A_dt = A.to(ct) * dt  # (b, L, h)
    pad = (-length) % chunk_size
    if pad:
        X, B, C = (F.pad(t, (0, 0, 0, 0, 0, pad)) for t in (X, B, C))
        A_dt = F.pad(A_dt, (0, 0, 0, pad))
    chunks = (length + pad) // chunk_size
    X, B, C = (t.reshape(batch, chunks, chunk_size, heads, -1) for t in (X, B, C))  # (b, c, l, h, ·)
    A_dt = A_dt.reshape(batch, chunks, chunk_size, heads).permute(0, 3, 1, 2)  # (b, h, c, l)
    A_cumsum = A_dt.cumsum(dim=-1)

    # 1. Within each chunk: y_i = sum_{j <= i} C_i·B_j exp(A_i + ... + A_{j+1}) X_j.
    decay = torch.exp(_segsum(A_dt))  # (b, h, c, l, s)
    y_diag = torch.einsum("bclhn,bcshn,bhcls,bcshp->bclhp", C, B, decay, X)
    # 2. The state each chunk ends with, starting from zero.
    decay_states = torch.exp(A_cumsum[..., -1:] - A_cumsum)  # (b, h, c, l)
    states = torch.einsum("bclhn,bhcl,bclhp->bchpn", B, decay_states, X)
    # 3. Pass states between chunks: the state entering chunk c, and the final one.
    if initial_states is None:
        initial_states = torch.zeros_like(states[:, :1])
    else:
        initial_states = initial_states.to(ct)[:, None]
    states = torch.cat([initial_states, states], dim=1)  # (b, c+1, h, p, n)
    decay_chunk = torch.exp(_segsum(F.pad(A_cumsum[..., -1], (1, 0))))  # (b, h, c+1, c+1)
    new_states = torch.einsum("bhzc,bchpn->bzhpn", decay_chunk, states)
    states, final_state = new_states[:, :-1], new_states[:, -1]
    # 4. Each chunk's output from the state entering it.
    y_off = torch.einsum("bclhn,bchpn,bhcl->bclhp", C, states, torch.exp(A_cumsum))
    y = (y_diag + y_off).reshape(batch, chunks * chunk_size, heads, -1)[:, :length]
    if D is not None:
        y = y + x.to(ct) * D.to(ct)[:, None]
    y = y.to(dtype_in)
    return (y, final_state) if return_final_states else y
