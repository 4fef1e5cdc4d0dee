"""The readable PyTorch SSM scans: the reference path of the xatl Mamba and Mamba2 mixers.

Written for clarity, not speed: they define what the CUDA kernels must compute, and the kernel stand-ins
(`kernels_xatl`) compute with them. Self-contained (torch only): copied into every converted folder.
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
    dtype_in = u.dtype
    ct = compute_dtype(u)
    u, delta, B, C = u.to(ct), delta.to(ct), B.to(ct), C.to(ct)
    if delta_bias is not None:
        delta = delta + delta_bias.to(ct)[:, None]
    if delta_softplus:
        delta = F.softplus(delta)
    delta_A = torch.exp(delta.unsqueeze(-1) * A.to(ct)[:, None, :])  # (b, d, L, n)
    delta_B_u = (delta * u).unsqueeze(-1) * B.transpose(1, 2).unsqueeze(1)  # (b, d, L, n)
    h = u.new_zeros(u.shape[0], u.shape[1], A.shape[1]) if initial_state is None else initial_state.to(ct)
    ys = []
    for t in range(u.shape[-1]):
        h = delta_A[:, :, t] * h + delta_B_u[:, :, t]
        ys.append(torch.einsum("bdn,bn->bd", h, C[:, :, t]))
    y = torch.stack(ys, dim=-1)
    if D is not None:
        y = y + u * D.to(ct)[:, None]
    if z is not None:
        y = y * F.silu(z.to(ct))
    return (y.to(dtype_in), h) if return_last_state else y.to(dtype_in)


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
