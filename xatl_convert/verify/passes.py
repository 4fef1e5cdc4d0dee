"""The streamed forward passes of verify: the converted model (with incremental decoding per block), a
from-scratch model of the same config, and the source beside its all-attention twin.

Each pass loads one unit at a time (see `streaming`); what the checks need (logits, per-layer errors) is kept,
nothing else.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from xatl_convert.models import XatlConfig, XatlForCausalLM
from xatl_convert.models.modeling_xatl import XatlCache, causal_attention_mask
from xatl_convert.verify.kernel_sites import SiteComparison, compare_call_sites, site_inputs
from xatl_convert.verify.readers import InitialisedTensors
from xatl_convert.verify.streaming import LayerCall, StreamedModel, TensorReader, relative_error

PREFILL_TOKENS = 16  # the first chunk: a scan from zero state (the kernels' path on CUDA)
CHUNK_TOKENS = 8  # then a chunk continuing from the cached state
STEP_TOKENS = 8  # then single-token steps (mamba-ssm's step functions)


@dataclass(frozen=True)
class Bounds:
    """Relative bounds (max |Δ| / max |reference|) of verify's comparisons, for one compute precision: the one place
    that defines them.

    twin, decode (per layer, a conversion). float32: the twin and the source run the same maths with different
    kernels and orders, and a cached mixer sums in another order than a full scan: both differ by rounding, about
    1e-6 of the values on real checkpoints (measured on SmolLM2-135M and on a deep random model with large
    activations). A wrong rule or cache update differs by the size of what it computes, 1e-2 and more. float64
    leaves only transformers' own float32 steps (its RMSNorm computes in float32 whatever the input) in the twin,
    and nothing in decoding.

    export (the logits of an export in transformers' own class against its xatl model's; any length).
    benchmarks/export_verify_bound.py measures it on SmolLM2-135M (30 layers, bf16) converted to the paper hybrid
    and to pure Mamba2, exported to granitemoehybrid and bamba, at 100 to 1395 tokens. float32: both run the same
    float32 operations in the same order but one: transformers' torch conv fallback pads both sides and crops, so
    SiLU gets a strided view, and PyTorch's CPU kernel vectorises whole blocks of 32 floats per row and takes its
    scalar path (another exp, ≤ 1 ulp apart) for the last L mod 32 positions. The logits are bit-identical when L is
    a multiple of 32 (e.g. 1024 tokens) and up to position 32·⌊L/32⌋ otherwise; thirty layers amplify that ulp to
    at most 2.7e-5 (190 tokens; ≤ 4.9e-6 at 1024 to 1395). float64: transformers' classes still compute their
    norms, RoPE tables and the Mamba2 scan in float32, now against an xatl model in float64, at every position:
    1.5e-5 (hybrid) and 4.3e-5 (pure Mamba2), the same at every length from 1024 on. So float64 is no tighter for
    an export. Each bound is 10x the worst measured, rounded up; real export bugs (a wrong RoPE theta or norm eps in
    the config, a zeroed D, conv taps reversed) give 1.1 and more, over 2000x the bound.
    A format whose class computes a mixer in another order can exceed `export` on a deep model by rounding alone
    (Qwen3-Next's chunked delta rule: 4.3e-4 on SmolLM2-135M, as far from float64 as the xatl model's own float32
    pass); `export_logits.RoundingFloor` then measures that floor in the same run and judges the export by it.
    """

    twin: float
    decode: float
    export: float


BOUNDS = {
    torch.float32: Bounds(twin=1e-4, decode=1e-4, export=3e-4),
    torch.float64: Bounds(twin=1e-6, decode=1e-10, export=5e-4),
}


@dataclass
class ConvertedPass:
    """What the converted model's pass leaves: its logits (None with --layers), per-block decoding errors, and
    the kernel call-site comparisons of the first block of each LCI mixer type (layer index, comparisons, or why
    the kernels cannot run that mixer)."""

    logits: torch.Tensor | None
    decode_errors: list[float] = field(default_factory=list)
    peak_unit_bytes: int = 0
    call_sites: dict[str, tuple[int, list[SiteComparison] | str]] = field(default_factory=dict)


Progress = Callable[[str, int, int], None]  # (pass, blocks started, blocks in the pass)


@dataclass
class Run:
    """One verify run's shared inputs: the output's config, the sample, the compute dtype and device, --layers,
    and where to report progress (each pass, block by block)."""

    config: XatlConfig
    input_ids: torch.Tensor
    dtype: torch.dtype
    device: torch.device
    layers: int | None
    progress: Progress | None = None

    def stream(self, label: str, model: torch.nn.Module, read: TensorReader, num_layers: int) -> StreamedModel:
        """A streamed model on the run's device that reports its blocks as pass `label`."""
        total = min(num_layers, self.layers or num_layers)
        progress = self.progress
        on_block = (lambda index: progress(label, index + 1, total)) if progress is not None else None
        return StreamedModel(model, read, num_layers, self.device, on_block)

    @property
    def bounds(self) -> Bounds:
        return BOUNDS[self.dtype]

    @property
    def checked_layers(self) -> int:
        return self.layers if self.layers is not None else self.config.num_hidden_layers

    def xatl_skeleton(self, config: XatlConfig | None = None) -> XatlForCausalLM:
        """An xatl model on the meta device, in the compute dtype: no memory until a unit is loaded."""
        with torch.device("meta"):
            return XatlForCausalLM(config or self.config).to(self.dtype)

    def converted(self, read: TensorReader) -> ConvertedPass:
        """The converted model's forward, its tensors from `read`; each block, while loaded, also decodes the
        sample incrementally."""
        decode_errors: list[float] = []
        call_sites: dict[str, tuple[int, list[SiteComparison] | str]] = {}

        def decode(call: LayerCall) -> None:
            decode_errors.append(incremental_decoding_error(call, self.config))
            kind = self.config.layer_types[call.index]
            if kind != "attention" and kind not in call_sites:  # the first block of each LCI type, on its real input
                outside = call.block.mixer.outside_kernels
                with torch.no_grad():
                    normed = call.block.mixer_input(call.hidden_states)
                compared = outside or compare_call_sites(call.block.mixer, self.config, site_inputs(normed))
                call_sites[kind] = (call.index, compared)

        model = self.xatl_skeleton()
        stream = self.stream("converted model", model, read, self.config.num_hidden_layers)
        logits = stream.forward(self.input_ids, on_layer=decode, layers=self.layers)
        return ConvertedPass(logits, decode_errors, stream.peak_unit_bytes, call_sites)

    def scratch_loss(self, seed: int) -> float:
        """Loss of a from-scratch model of the same config, initialised module by module as convert would."""
        model = self.xatl_skeleton()
        reader = InitialisedTensors(self.config, seed)
        logits = self.stream("from-scratch model", model, reader, self.config.num_hidden_layers).forward(self.input_ids)
        assert logits is not None
        return next_token_loss(logits, self.input_ids)


def next_token_loss(logits: torch.Tensor, input_ids: torch.Tensor) -> float:
    """Mean next-token cross-entropy in the logits' dtype (as transformers' causal-LM loss)."""
    return float(F.cross_entropy(logits[0, :-1], input_ids[0, 1:].to(logits.device)))


def uniform_loss(config: XatlConfig) -> float:
    return math.log(config.vocab_size)


def incremental_decoding_error(call: LayerCall, config: XatlConfig) -> float:
    """Block `call.index`'s mixer over the sample's first tokens: one full pass against a prefill, a cached chunk
    and single-token steps, on the same normed inputs. Relative to the mixer's own output, so the residual stream
    (often hundreds of times larger) can neither hide an error nor inflate rounding."""
    block = call.block
    hidden = call.hidden_states[:, : PREFILL_TOKENS + CHUNK_TOKENS + STEP_TOKENS]
    position_embeddings = call.args[1] if len(call.args) > 1 else call.kwargs.get("position_embeddings")
    total = hidden.shape[1]
    with torch.no_grad():
        normed = block.mixer_input(hidden)
        full = block.mix(normed, _positions(position_embeddings, 0, total))
        cache = XatlCache(config, hidden.shape[0], dtype=normed.dtype, device=normed.device)
        pieces = []
        for start, stop in _decode_segments(total):
            mask = causal_attention_mask(start, stop - start, normed.device) if start and stop - start > 1 else None
            piece = block.mix(normed[:, start:stop], _positions(position_embeddings, start, stop), mask, None, cache)
            cache.seen_tokens = stop
            pieces.append(piece)
    return relative_error(torch.cat(pieces, dim=1), full)


def _decode_segments(total: int) -> list[tuple[int, int]]:
    """[0, prefill), [prefill, prefill + chunk), then one token at a time: every cached path a mixer has."""
    prefill = min(PREFILL_TOKENS, max(total - 1, 1))
    chunk_end = min(prefill + CHUNK_TOKENS, total)
    segments = [(0, prefill)]
    if chunk_end > prefill:
        segments.append((prefill, chunk_end))
    segments += [(position, position + 1) for position in range(chunk_end, total)]
    return segments


def _positions(
    position_embeddings: dict[str, tuple[torch.Tensor, torch.Tensor]] | None, start: int, stop: int
) -> dict[str, tuple[torch.Tensor, torch.Tensor]] | None:
    """The RoPE tables (one per kind, see `rotary_tables`) of positions start..stop."""
    if position_embeddings is None:
        return None
    return {kind: (cos[:, start:stop], sin[:, start:stop]) for kind, (cos, sin) in position_embeddings.items()}


__all__ = ["ConvertedPass", "Run", "incremental_decoding_error", "next_token_loss", "relative_error"]
