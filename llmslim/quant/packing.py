"""Bit packing for the GPTQ v1 checkpoint format (AutoGPTQ, GPTQModel,
optimum, transformers, vLLM).

Per quantized linear (``K`` inputs, ``N`` outputs, ``G`` groups):

==========  =====  ====================  ======================================
tensor      dtype  shape                 content
==========  =====  ====================  ======================================
qweight     int32  [⌈K·bits/32⌉, N]      codes packed along the input dim K
qzeros      int32  [G, ⌈N·bits/32⌉]      ``zero - 1`` packed along the output dim
scales      fp16   [G, N]                group scales
g_idx       int32  [K]                   group of each input column
bias        fp16   [N]                   only when the layer has one
==========  =====  ====================  ======================================

Packing is a little-endian bit stream: value ``i`` of a run occupies bits
``bits·i .. bits·i + bits - 1`` of consecutive 32-bit words, so the lowest
index sits in the lowest bits. For 2, 4 and 8 bits a word holds ``32/bits``
whole values; for 3 bits, 32 values fill 3 words and two values straddle a
word boundary (the 10 | 1 | 10 | 1 | 10 layout of AutoGPTQ).

**Widths that do not fill whole words** (K = 688 at 3 bits: 64.5 words; or
K = 100 at 4 bits) are padded the way GPTQModel allocates and packs them: the
bit stream continues, the last word is completed with zero bits, and the
tensor has ``⌈K·bits/32⌉`` rows (65 for K = 688 at 3 bits). Readers take the
first K values. GPTQModel's 3-bit unpacker reshapes ``qweight`` into whole
3-word runs, so a 3-bit width that is not a multiple of 32 loads in llmslim
but not there. G = ``⌈K / group_size⌉``: the last group may be partial.

**v1 zero points.** The format stores ``zero - 1`` (masked to ``bits``) and
readers add the 1 back: a symmetric 4-bit layer (zero 8) has every qzeros
word equal to 0x77777777. A zero point of 0 would be stored as ``maxq`` and
read back as ``maxq + 1``; llmslim's quantizer never produces one (asymmetric
zeros are kept at 1 or more, see :mod:`llmslim.quant.quantizer`), and
:func:`to_gptq_tensors` rejects it rather than write a lossy checkpoint.
"""

from __future__ import annotations

import math

import torch

from llmslim.quant.quantizer import QuantizedWeight, QuantSpec
from llmslim.widths import PACKABLE_BITS

__all__ = ["PACKABLE_BITS", "packed_length", "pack_rows", "unpack_rows", "pack_cols", "unpack_cols",
           "to_gptq_tensors", "from_gptq_tensors"]

_WORD = 0xFFFFFFFF


def _run(bits: int) -> tuple[int, int]:
    """``(values, words)``: the shortest run of values that fills whole 32-bit words."""
    if bits not in PACKABLE_BITS:
        raise ValueError(f"GPTQ packing supports {PACKABLE_BITS} bits, got {bits}")
    values = 32 // math.gcd(32, bits)
    return values, values * bits // 32


def packed_length(length: int, bits: int) -> int:
    """Words holding ``length`` values of ``bits`` bits: ``⌈length·bits/32⌉``."""
    _run(bits)
    return -(-length * bits // 32)


def _pack_runs(v: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack ``v [B, V, R]`` (integers in ``[0, 2**bits)``) into words ``[B, W, R]`` int32."""
    values, words = _run(bits)
    lo, hi = (int(v.min()), int(v.max())) if v.numel() else (0, 0)
    if lo < 0 or hi >= 2 ** bits:
        raise ValueError(f"values must lie in [0, {2 ** bits - 1}] to pack {bits} bits, found [{lo}, {hi}]")
    v = v.to(torch.int64)
    if words == 1:                                  # 2, 4, 8 bits: fields never straddle words
        shifts = torch.arange(0, 32, bits, device=v.device, dtype=torch.int64).view(1, values, 1)
        out = (v << shifts).sum(dim=1, keepdim=True)                    # disjoint fields: sum == OR
        return torch.where(out >= 2 ** 31, out - 2 ** 32, out).to(torch.int32)
    out = torch.zeros(v.shape[0], words, v.shape[2], dtype=torch.int64, device=v.device)
    for i in range(values):
        word, shift = divmod(bits * i, 32)
        out[:, word] |= (v[:, i] << shift) & _WORD
        if shift + bits > 32:                                   # spills into the next word
            out[:, word + 1] |= v[:, i] >> (32 - shift)
    return torch.where(out >= 2 ** 31, out - 2 ** 32, out).to(torch.int32)


def _unpack_runs(w: torch.Tensor, bits: int) -> torch.Tensor:
    """Inverse of :func:`_pack_runs`: words ``[B, W, R]`` -> values ``[B, V, R]`` int32."""
    values, words = _run(bits)
    mask = 2 ** bits - 1
    if words == 1:                                  # arithmetic shifts are fine: the mask drops the sign
        shifts = torch.arange(0, 32, bits, device=w.device, dtype=torch.int32).view(1, values, 1)
        return (w.to(torch.int32) >> shifts) & mask
    u = w.to(torch.int64) & _WORD
    out = torch.empty(w.shape[0], values, w.shape[2], dtype=torch.int64, device=w.device)
    for i in range(values):
        word, shift = divmod(bits * i, 32)
        val = u[:, word] >> shift
        if shift + bits > 32:
            val = val | (u[:, word + 1] << (32 - shift))
        out[:, i] = val & mask
    return out.to(torch.int32)


def _pack_dim0(x: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack ``x [L, M]`` along its first dim: ``[⌈L·bits/32⌉, M]`` int32 (zero bits after the last value)."""
    if x.dim() != 2:
        raise ValueError(f"expected a 2-D matrix to pack, got shape {tuple(x.shape)}")
    length, m = x.shape
    values, words = _run(bits)
    runs = -(-length // values)
    padded = torch.zeros(runs * values, m, dtype=x.dtype, device=x.device)
    padded[:length] = x
    packed = _pack_runs(padded.reshape(runs, values, m), bits).reshape(runs * words, m)
    return packed[:packed_length(length, bits)].contiguous()


def _unpack_dim0(packed: torch.Tensor, bits: int, length: int, name: str, unit: str, dim: int) -> torch.Tensor:
    """Inverse of :func:`_pack_dim0` for ``packed`` whose dim ``dim`` holds the packed ``length`` values
    (transposed to the front here); returns ``[length, M]`` int32."""
    values, words = _run(bits)
    expected = packed_length(length, bits)
    if packed.dim() != 2 or packed.shape[dim] != expected:
        raise ValueError(f"{name} of shape {tuple(packed.shape)} does not hold {length} {unit} of {bits}-bit "
                         f"values (expected {expected} packed {unit})")
    front = packed if dim == 0 else packed.t()
    m = front.shape[1]
    runs = -(-length // values)
    full = torch.zeros(runs * words, m, dtype=front.dtype, device=front.device)
    full[:expected] = front
    return _unpack_runs(full.reshape(runs, words, m), bits).reshape(runs * values, m)[:length]


def pack_rows(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack ``codes [K, N]`` along K: ``[⌈K·bits/32⌉, N]`` int32 (the ``qweight`` layout)."""
    return _pack_dim0(codes, bits)


def unpack_rows(qweight: torch.Tensor, bits: int, K: int) -> torch.Tensor:
    """Unpack ``qweight [⌈K·bits/32⌉, N]`` into ``[K, N]`` int32 codes."""
    return _unpack_dim0(qweight, bits, K, "qweight", "rows", dim=0)


def pack_cols(z: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack ``z [G, N]`` along N: ``[G, ⌈N·bits/32⌉]`` int32 (the ``qzeros`` layout), i.e. the
    ``qweight`` packing of the transpose."""
    if z.dim() != 2:
        raise ValueError(f"pack_cols expects a [G, N] matrix, got shape {tuple(z.shape)}")
    return _pack_dim0(z.t(), bits).t().contiguous()


def unpack_cols(qzeros: torch.Tensor, bits: int, N: int) -> torch.Tensor:
    """Unpack ``qzeros [G, ⌈N·bits/32⌉]`` into ``[G, N]`` int32 values."""
    return _unpack_dim0(qzeros, bits, N, "qzeros", "columns", dim=1).t().contiguous()


def to_gptq_tensors(qw: QuantizedWeight, bias: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """The GPTQ v1 tensors of a quantized weight (see the module docstring).

    Keys: ``qweight``, ``qzeros`` (``zero - 1``), ``scales`` (fp16), ``g_idx``,
    and ``bias`` (fp16) when given. Raises ValueError for shapes the bit width
    cannot pack, zero points of 0, or scales that overflow fp16.
    """
    bits = qw.spec.bits
    n, k = qw.codes.shape
    if qw.zeros.numel() and (int(qw.zeros.min()) < 1 or int(qw.zeros.max()) > qw.spec.maxq + 1):
        raise ValueError(f"zero points must lie in [1, {qw.spec.maxq + 1}] for the GPTQ v1 format "
                         f"(it stores zero - 1 in {bits} bits)")
    scales = qw.scales.detach()
    if scales.numel() and float(scales.abs().max()) > torch.finfo(torch.float16).max:
        raise ValueError("a scale exceeds the float16 range of the GPTQ format")
    out = {
        "qweight": pack_rows(qw.codes.t(), bits),
        "qzeros": pack_cols((qw.zeros.to(torch.int64) - 1) & qw.spec.maxq, bits),
        "scales": scales.to(torch.float16).contiguous(),
        "g_idx": qw.g_idx.to(torch.int32).contiguous(),
    }
    if bias is not None:
        if tuple(bias.shape) != (n,):
            raise ValueError(f"bias has shape {tuple(bias.shape)}, expected ({n},)")
        out["bias"] = bias.detach().to(torch.float16).contiguous()
    return out


def from_gptq_tensors(tensors: dict[str, torch.Tensor], bits: int, group_size: int, sym: bool,
                      K: int, N: int, zero_offset: int = 1) -> QuantizedWeight:
    """Rebuild a :class:`QuantizedWeight` from GPTQ tensors.

    ``zero_offset`` is added to the stored zeros: 1 for the v1 format
    (``checkpoint_format: gptq``), 0 for ``gptq_v2`` (raw zeros).
    ``g_idx`` defaults to ``k // group_size`` when absent.
    """
    spec = QuantSpec(bits=bits, group_size=group_size, sym=sym)
    codes = unpack_rows(tensors["qweight"], bits, K)                    # [K, N]
    if codes.shape[1] != N:
        raise ValueError(f"qweight has {codes.shape[1]} output columns, expected {N}")
    zeros = unpack_cols(tensors["qzeros"], bits, N) + zero_offset       # [G, N]
    scales = tensors["scales"].to(torch.float32)
    if tuple(scales.shape) != tuple(zeros.shape):
        raise ValueError(f"scales {tuple(scales.shape)} and qzeros {tuple(zeros.shape)} disagree on [G, N]")
    g_idx = tensors.get("g_idx")
    if g_idx is None:
        g_idx = torch.arange(K, device=codes.device) // (K if group_size == -1 else group_size)
    if tuple(g_idx.shape) != (K,) or (K and (int(g_idx.min()) < 0 or int(g_idx.max()) >= zeros.shape[0])):
        raise ValueError(f"g_idx must be [{K}] with groups in [0, {zeros.shape[0] - 1}]")
    return QuantizedWeight(codes=codes.t().contiguous().to(torch.uint8), scales=scales.contiguous(),
                           zeros=zeros.to(torch.int32), g_idx=g_idx.to(torch.int32), spec=spec)
