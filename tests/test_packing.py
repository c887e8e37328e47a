"""GPTQ v1 packing: bit layouts, zero-point convention, exact round trips."""

from __future__ import annotations

import pytest
import torch

from llmslim.quant import (
    QuantSpec,
    from_gptq_tensors,
    gptq_quantize_weight,
    pack_cols,
    pack_rows,
    rtn_quantize_weight,
    to_gptq_tensors,
    unpack_cols,
    unpack_rows,
)


def _u32(t: torch.Tensor) -> list[int]:
    return [v & 0xFFFFFFFF for v in t.flatten().tolist()]


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_pack_unpack_exact(bits):
    g = torch.Generator().manual_seed(bits)
    k, n = 64, 96
    codes = torch.randint(0, 2 ** bits, (k, n), generator=g)
    codes[0] = 2 ** bits - 1                                            # all-ones words too
    packed = pack_rows(codes, bits)
    assert packed.dtype == torch.int32 and packed.shape == (k * bits // 32, n)
    assert torch.equal(unpack_rows(packed, bits, k), codes.to(torch.int32))
    zeros = torch.randint(0, 2 ** bits, (5, n), generator=g)
    qz = pack_cols(zeros, bits)
    assert qz.dtype == torch.int32 and qz.shape == (5, n * bits // 32)
    assert torch.equal(unpack_cols(qz, bits, n), zeros.to(torch.int32))


def test_lowest_index_in_lowest_bits():
    assert _u32(pack_rows(torch.arange(8).reshape(8, 1), 4)) == [0x76543210]
    assert _u32(pack_cols(torch.tensor([[1, 2, 3, 0xFF]]), 8)) == [0xFF030201]
    assert _u32(pack_rows(torch.tensor([1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 3]).reshape(16, 1), 2)) \
        == [0xC0000001]


def test_three_bit_cross_word_layout():
    values = torch.randint(0, 8, (32,), generator=torch.Generator().manual_seed(3)).tolist()
    a = b = c = 0
    for i in range(10):                     # word A: v0..v9, then the low 2 bits of v10
        a |= values[i] << (3 * i)
    a |= (values[10] & 0b11) << 30
    b |= values[10] >> 2                    # word B: bit 2 of v10, v11..v20, low bit of v21
    for i in range(10):
        b |= values[11 + i] << (1 + 3 * i)
    b |= (values[21] & 1) << 31
    c |= values[21] >> 1                    # word C: top 2 bits of v21, v22..v31
    for i in range(10):
        c |= values[22 + i] << (2 + 3 * i)
    assert _u32(pack_rows(torch.tensor(values).reshape(32, 1), 3)) == [a, b, c]
    assert _u32(pack_cols(torch.tensor(values).reshape(1, 32), 3)) == [a, b, c]


@pytest.mark.parametrize("bits,word", [(4, 0x77777777), (8, 0x7F7F7F7F), (2, 0x55555555), (3, None)])
def test_v1_symmetric_zeros(bits, word):
    qw = rtn_quantize_weight(torch.randn(64, 128), QuantSpec(bits, 64, sym=True))
    tensors = to_gptq_tensors(qw)
    if word is not None:
        assert set(_u32(tensors["qzeros"])) == {word}
    assert torch.all(unpack_cols(tensors["qzeros"], bits, 64) == 2 ** (bits - 1) - 1)


def _assert_same(a, b):
    assert torch.equal(a.codes, b.codes) and torch.equal(a.zeros, b.zeros) and torch.equal(a.g_idx, b.g_idx)
    assert torch.equal(a.scales, b.scales) and a.spec.bits == b.spec.bits


@pytest.mark.parametrize("bits,group_size,sym", [(4, 128, True), (4, 32, False), (3, -1, False),
                                                 (2, 64, True), (8, 128, False)])
def test_tensors_round_trip(bits, group_size, sym):
    torch.manual_seed(bits)
    w = torch.randn(64, 256)
    w[:, :32] = w[:, :32].abs()                                         # groups with a minimum at 0
    qw = rtn_quantize_weight(w, QuantSpec(bits, group_size, sym))
    qw.scales = qw.scales.half().float()                                # the format stores fp16 scales
    bias = torch.randn(64)
    tensors = to_gptq_tensors(qw, bias)
    assert {k: v.dtype for k, v in tensors.items()} == {
        "qweight": torch.int32, "qzeros": torch.int32, "scales": torch.float16, "g_idx": torch.int32,
        "bias": torch.float16}
    back = from_gptq_tensors(tensors, bits, group_size, sym, K=256, N=64)
    _assert_same(qw, back)
    assert torch.equal(back.dequantize(), qw.dequantize())


def test_act_order_round_trip_keeps_g_idx():
    torch.manual_seed(0)
    x = torch.randn(512, 128) * torch.linspace(0.1, 3, 128)
    qw, _ = gptq_quantize_weight(torch.randn(32, 128), 2 * x.t() @ x / 512, QuantSpec(4, 32), act_order=True)
    qw.scales = qw.scales.half().float()
    back = from_gptq_tensors(to_gptq_tensors(qw), 4, 32, True, K=128, N=32)
    _assert_same(qw, back)


def test_widths_that_do_not_fill_whole_words_are_zero_padded():
    """48 values at 3 bits: 144 bits = 4.5 words -> 5 words, the stream continued and zero-filled."""
    g = torch.Generator().manual_seed(0)
    for bits, length in ((3, 48), (3, 688), (4, 12), (2, 24), (8, 6)):
        x = torch.randint(0, 2 ** bits, (length, 5), generator=g, dtype=torch.int32)
        packed = pack_rows(x, bits)
        assert packed.shape == (-(-length * bits // 32), 5)
        assert torch.equal(unpack_rows(packed, bits, length), x)
        # the same values padded to whole runs pack to the same leading words, then zeros
        run = 32 if bits == 3 else 32 // bits
        whole = pack_rows(torch.cat([x, torch.zeros(-length % run, 5, dtype=torch.int32)]), bits)
        assert torch.equal(whole[:packed.shape[0]], packed) and not whole[packed.shape[0]:].any()
        z = x.t().contiguous()
        assert torch.equal(unpack_cols(pack_cols(z, bits), bits, length), z)


def test_bad_shapes_and_values_rejected():
    with pytest.raises(ValueError, match="bits"):
        pack_rows(torch.zeros(32, 8, dtype=torch.int32), 5)
    with pytest.raises(ValueError, match=r"\[0, 15\]"):
        pack_rows(torch.full((8, 8), 16), 4)
    with pytest.raises(ValueError, match="packed rows"):
        unpack_rows(torch.zeros(4, 8, dtype=torch.int32), 4, 64)
    qw = rtn_quantize_weight(torch.randn(8, 40), QuantSpec(3, -1))
    assert to_gptq_tensors(qw)["qweight"].shape == (4, 8)              # 120 bits -> 4 words
    good = rtn_quantize_weight(torch.randn(32, 64), QuantSpec(4, 32))
    with pytest.raises(ValueError, match="packed rows"):
        from_gptq_tensors(to_gptq_tensors(good), 4, 32, True, K=128, N=32)
    good.zeros[0, 0] = 0
    with pytest.raises(ValueError, match="zero points"):
        to_gptq_tensors(good)
