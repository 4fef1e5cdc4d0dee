"""Every transform: its result, its output shape, and the message of its shape error."""

from __future__ import annotations

import pytest
import torch

from xatl_convert.transforms import TransformShapeError, parse_transform


def _run(spec: object, *tensors: torch.Tensor) -> torch.Tensor:
    chain = parse_transform(spec)
    output = chain.apply(list(tensors))
    assert tuple(output.shape) == chain.output_shape([tuple(t.shape) for t in tensors])
    return output


def test_copy_returns_the_tensor() -> None:
    tensor = torch.randn(3, 4)
    assert torch.equal(_run("copy", tensor), tensor)


def test_transpose_swaps_matrix_dims() -> None:
    tensor = torch.randn(3, 4)
    assert torch.equal(_run("transpose", tensor), tensor.T)


def test_split_heads_interleaved_matches_gpt_neox_layout() -> None:
    heads, head_dim, hidden = 4, 2, 5
    fused = torch.randn(heads * 3 * head_dim, hidden)
    per_head = fused.view(heads, 3, head_dim, hidden)
    for take in range(3):
        spec = {"split_heads": {"parts": 3, "take": take, "heads": heads}}
        assert torch.equal(_run(spec, fused), per_head[:, take].reshape(heads * head_dim, hidden))


def test_split_heads_blocked_takes_contiguous_blocks() -> None:
    fused = torch.randn(12, 5)
    spec = {"split_heads": {"parts": 3, "take": 1, "heads": 2, "layout": "blocked"}}
    assert torch.equal(_run(spec, fused), fused[4:8])


def test_concat_joins_along_dim() -> None:
    up, gate = torch.randn(6, 4), torch.randn(6, 4)
    assert torch.equal(_run({"concat": {"dim": 0}}, up, gate), torch.cat([up, gate]))


def test_slice_keeps_range() -> None:
    tensor = torch.randn(10, 3)
    assert torch.equal(_run({"slice": {"dim": 0, "start": 2, "stop": 5}}, tensor), tensor[2:5])


def test_reshape_infers_one_dim() -> None:
    tensor = torch.randn(4, 6)
    assert _run({"reshape": {"shape": [2, -1]}}, tensor).shape == (2, 12)


def test_repeat_copies_each_kv_head_consecutively() -> None:
    kv = torch.arange(4.0).view(2, 2)  # two heads of head_dim 1 × width 2
    out = _run({"repeat": {"heads": 2, "times": 2}}, kv)
    assert torch.equal(out, torch.tensor([[0.0, 1.0], [0.0, 1.0], [2.0, 3.0], [2.0, 3.0]]))


def test_cast_changes_dtype() -> None:
    assert _run({"cast": {"dtype": "bfloat16"}}, torch.randn(2)).dtype == torch.bfloat16


def test_split_takes_unequal_parts_by_name_or_index_and_reorders_them() -> None:
    fused = torch.arange(8.0).reshape(8, 1)  # q: 4 rows, k: 2, v: 2 (grouped-query attention)
    spec = {"sizes": [4, 2, 2], "names": ["q", "k", "v"]}
    assert _run({"split": {**spec, "take": "k"}}, fused).flatten().tolist() == [4.0, 5.0]
    assert _run({"split": {**spec, "take": 2}}, fused).flatten().tolist() == [6.0, 7.0]
    gate_up = torch.arange(6.0)  # Phi-3's [gate; up] into xatl's [up; gate]
    reordered = _run({"split": {"sizes": [3, 3], "names": ["gate", "up"], "take": ["up", "gate"]}}, gate_up)
    assert reordered.tolist() == [3.0, 4.0, 5.0, 0.0, 1.0, 2.0]


def test_scale_and_add_fold_constants_into_a_weight() -> None:
    weight = torch.randn(3, 4)
    assert torch.equal(_run({"scale": {"factor": 0.5}}, weight), weight * 0.5)
    assert torch.equal(_run({"add": {"value": 1.0}}, weight), weight + 1.0)  # Gemma's stored w → 1 + w


def test_permute_rotary_moves_rotary_pairs_from_interleaved_to_halves_and_back() -> None:
    rows = torch.arange(12.0)  # 2 heads of 6 rows, the first 4 of each rotated
    halves = _run({"permute_rotary": {"heads": 2, "rotary_dim": 4}}, rows)
    assert halves.tolist() == [0.0, 2.0, 1.0, 3.0, 4.0, 5.0, 6.0, 8.0, 7.0, 9.0, 10.0, 11.0]
    wide = torch.arange(8.0)  # one head, all 8 rows rotated: pairs (0,1)(2,3)... become (0,4)(1,5)...
    assert _run({"permute_rotary": {"heads": 1}}, wide).tolist() == [0.0, 2.0, 4.0, 6.0, 1.0, 3.0, 5.0, 7.0]
    back = _run({"permute_rotary": {"heads": 1, "to": "interleaved"}}, _run({"permute_rotary": {"heads": 1}}, wide))
    assert torch.equal(back, wide)


def test_chain_applies_in_order() -> None:
    fused = torch.randn(12, 4)
    spec = [{"split_heads": {"parts": 3, "take": 0, "heads": 2, "layout": "blocked"}}, "transpose"]
    assert torch.equal(_run(spec, fused), fused[0:4].T)


@pytest.mark.parametrize(
    ("spec", "shapes", "message"),
    [
        ({"split_heads": {"parts": 3, "take": 0, "heads": 4}}, [(10, 2)], "multiple of parts × heads"),
        ({"split_heads": {"parts": 3, "take": 3, "heads": 1}}, [(9, 2)], "take=3 is outside 0..2"),
        ({"concat": {"dim": 0}}, [(2, 3), (2, 4)], "every dimension except 0 must agree"),
        ({"slice": {"stop": 11}}, [(10, 2)], "does not fit dimension 0 of size 10"),
        ({"reshape": {"shape": [3, -1]}}, [(4, 2)], "cannot become"),
        ({"repeat": {"heads": 3, "times": 2}}, [(4, 2)], "multiple of heads=3"),
        ({"transpose": {"dims": [0, 2]}}, [(4, 2)], "dimension 2 does not exist"),
        ("copy", [(2,), (2,)], "takes one source tensor"),
        (
            {"split": {"sizes": [4, 4], "take": 0}},
            [(6, 2)],
            r"sizes \[4, 4\] add up to 8, but dimension 0 of \[6, 2\] is 6",
        ),
        ({"split": {"sizes": [3, 3], "take": "up"}}, [(6, 2)], "take 'up' is not a part"),
        ({"split": {"sizes": [3, 3], "names": ["a", "b"], "take": 2}}, [(6, 2)], r"take 2 is outside 0..1"),
        ({"permute_rotary": {"heads": 4}}, [(10, 2)], "multiple of heads=4"),
        ({"permute_rotary": {"heads": 1, "rotary_dim": 3}}, [(8, 2)], "rotary_dim 3 must be even"),
        ({"scale": {"factor": float("inf")}}, [(2,)], "not a finite number"),
    ],
)
def test_shape_mismatch_names_the_dimension(spec: object, shapes: list[tuple[int, ...]], message: str) -> None:
    with pytest.raises(TransformShapeError, match=message):
        parse_transform(spec).output_shape(shapes)


def test_unknown_transform_suggests_the_nearest() -> None:
    with pytest.raises(ValueError, match="unknown transform 'split_head'; did you mean 'split_heads'"):
        parse_transform({"split_head": {"parts": 3}})


def test_unknown_argument_suggests_the_nearest() -> None:
    with pytest.raises(ValueError, match="unknown argument 'head'; did you mean 'heads'"):
        parse_transform({"split_heads": {"parts": 3, "take": 0, "head": 4}})
