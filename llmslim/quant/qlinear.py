"""A linear layer holding GPTQ tensors, with real low-bit CPU kernels.

:class:`QuantLinear` keeps exactly the standard buffers ``qweight``,
``qzeros``, ``scales``, ``g_idx`` and ``bias`` (see :mod:`llmslim.quant.packing`),
so a model's ``state_dict()`` is a GPTQ checkpoint. ``scales`` and ``bias``
stay float16 even when the model is cast to another dtype. ``zero_offset`` is
what the stored zeros lack: 1 in the v1 format (``zero - 1`` stored), 0 in
``gptq_v2``.

Forward paths, chosen per layer and per activation dtype (``QuantLinear.kernel``
says which one ran last):

``"int4pack"`` / ``"int4pack+pad"``
    2-, 3- and 4-bit with **bfloat16 activations** on CPU through aten's tinygemm
    kernels (``_convert_weight_to_int4pack_for_cpu`` / ``_weight_int4pack_mm_for_cpu``);
    2- and 3-bit codes (0..3, 0..7) are shifted per group by ``8 - z`` into
    0..15, so that their zero point is 8 and the float offset below is
    exactly 0 (a large offset in bfloat16 would cancel against the codes).
    Their conventions, found by experiment on torch 2.13:

    * the weight is an int32 ``[N, K]`` matrix of codes 0..15 (``innerKTiles``
      is ignored on CPU); it packs to uint8 ``[N, K/2]``; N must be a multiple of 16;
    * ``qScaleAndZeros`` is ``[K/gs, N, 2]`` in the activation's dtype, and a
      weight is ``(code - 8) · scale + offset``: a GPTQ zero point ``z``
      becomes the float offset ``scale · (8 - z)``;
    * the kernel group size must be 32, 64, 128 or 256 and divide K; larger
      groups (and per-channel scales) are repeated into smaller kernel groups,
      which is exact;
    * with fp32 (or fp16) activations it runs about 70x slower than with bf16
      (measured: a 576x576 layer at 64 tokens, 22 ms against 0.3 ms), so it is
      used for bf16 activations only; other dtypes take the exact dequant path
      instead of being rounded to bf16.

    Widths the kernel cannot take are padded (``"int4pack+pad"``), which is
    exact: K is padded to whole groups (a partial last group, or a
    per-channel width that no kernel group size divides) with zero codes and
    zero activations, and N to a multiple of 16 with zero scales, the padded
    outputs being dropped. A group size that no kernel size divides (e.g. 48)
    takes the dequant path.

    Act-order layers (non-monotonic ``g_idx``) are served by permuting the
    weight's columns once at preparation so each group is contiguous, and
    permuting the activations' features the same way at every forward.

``"int8pack"``
    8-bit with one group per output channel, through ``_weight_int8pack_mm``
    (int8 weight ``[N, K]``, per-row scales in the activation dtype). The codes
    are shifted by 128; an asymmetric zero point adds ``Σx · scale · (128 - z)``.

``"dequant"``
    Everything else (other group layouts, fp32/fp16 activations for 2- to 4-bit,
    CUDA): the weight is dequantized on the fly in the activation dtype
    for each forward.

The packed kernel weights are prepared on first use and kept in a plain
attribute, outside the state dict; loading a state dict discards them.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from llmslim.quant.packing import packed_length, to_gptq_tensors, unpack_cols, unpack_rows
from llmslim.quant.quantizer import QuantizedWeight
from llmslim.widths import INT4_KERNEL_BITS, PACKABLE_BITS

__all__ = ["QuantLinear", "KERNEL_INT4", "KERNEL_INT4_PADDED", "KERNEL_INT8", "KERNEL_DEQUANT", "int4_geometry"]

KERNEL_INT4 = "int4pack"
KERNEL_INT4_PADDED = "int4pack+pad"
KERNEL_INT8 = "int8pack"
KERNEL_DEQUANT = "dequant"
INT4_GROUP_SIZES = (256, 128, 64, 32)
INT4_N_MULTIPLE = 16
INT4_ACTIVATIONS = torch.bfloat16
KERNEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_FP16_BUFFERS = ("scales", "bias")


def _group_layout(g_idx: torch.Tensor, groups: int, k: int,
                  group_size: int) -> tuple[int, torch.Tensor | None] | None:
    """``(gs, perm)`` when the groups are runs of ``gs`` columns (the last one possibly
    shorter) once sorted, else None (ragged groups).

    ``gs`` is the configured group size (capped at K), or ``⌈K / G⌉`` for a
    checkpoint whose config disagrees with its tensors. ``perm`` (None when
    ``g_idx`` is already ``k // gs``) orders the columns so that each group's
    columns become contiguous.
    """
    if groups < 1:
        return None
    g = g_idx.long()
    perm = torch.argsort(g, stable=True)
    for gs in dict.fromkeys((k if group_size == -1 else min(group_size, k), -(-k // groups))):
        if gs < 1 or -(-k // gs) != groups:
            continue
        expected = torch.arange(k, device=g_idx.device) // gs
        if torch.equal(g, expected):
            return gs, None
        if torch.equal(g[perm], expected):
            return gs, perm
    return None


def int4_geometry(k: int, n: int, gs: int, groups: int) -> tuple[int, int, int] | None:
    """``(kernel_gs, k_pad, n_pad)`` for the int4 CPU kernel, or None when it cannot run the layer.

    One group (per-channel): the kernel group size needing the least K
    padding (the larger on a tie). Several groups: the largest kernel group
    size dividing ``gs``, with K padded to ``groups · gs`` (a partial last
    group becomes a whole one). N is padded to a multiple of 16.
    """
    if groups == 1:
        kernel_gs = min(INT4_GROUP_SIZES, key=lambda size: ((-k) % size, -size))
        k_pad = k + (-k) % kernel_gs
    else:
        kernel_gs = next((size for size in INT4_GROUP_SIZES if gs % size == 0), None)
        if kernel_gs is None:
            return None
        k_pad = groups * gs
    return kernel_gs, k_pad, n + (-n) % INT4_N_MULTIPLE


class QuantLinear(nn.Module):
    """``y = x Wᵀ + b`` with ``W`` stored in the GPTQ format.

    ``dtype`` is the layer's activation dtype (the model's): :attr:`kernel`
    reports the path for it until a forward has run.
    """

    def __init__(self, in_features: int, out_features: int, bits: int, group_size: int, sym: bool,
                 bias: bool, dtype: torch.dtype = torch.float16, zero_offset: int = 1):
        super().__init__()
        if bits not in PACKABLE_BITS:
            raise ValueError(f"QuantLinear supports {PACKABLE_BITS} bits, got {bits}")
        if in_features < 1 or out_features < 1:
            raise ValueError(f"in_features and out_features must be positive, got {in_features}, {out_features}")
        if group_size != -1 and group_size < 1:
            raise ValueError(f"group_size must be -1 or positive, got {group_size}")
        if zero_offset not in (0, 1):
            raise ValueError(f"zero_offset must be 1 (GPTQ v1) or 0 (gptq_v2), got {zero_offset}")
        self.in_features, self.out_features = in_features, out_features
        self.bits, self.group_size, self.sym, self.dtype = bits, group_size, sym, dtype
        self.zero_offset = zero_offset
        gs = in_features if group_size == -1 else min(group_size, in_features)
        groups = -(-in_features // gs)
        self.register_buffer("qweight", torch.zeros(packed_length(in_features, bits), out_features,
                                                    dtype=torch.int32))
        self.register_buffer("qzeros", torch.zeros(groups, packed_length(out_features, bits), dtype=torch.int32))
        self.register_buffer("scales", torch.zeros(groups, out_features, dtype=torch.float16))
        self.register_buffer("g_idx", (torch.arange(in_features) // gs).to(torch.int32))
        self.register_buffer("bias", torch.zeros(out_features, dtype=torch.float16) if bias else None)
        self.reset_kernel()

    @classmethod
    def from_quantized(cls, qw: QuantizedWeight, bias: torch.Tensor | None = None,
                       dtype: torch.dtype = torch.float16) -> QuantLinear:
        """A layer holding ``qw`` (and ``bias``), on the device of ``qw.codes``."""
        n, k = qw.codes.shape
        layer = cls(k, n, qw.spec.bits, qw.spec.group_size, qw.spec.sym, bias is not None, dtype)
        for name, tensor in to_gptq_tensors(qw, bias).items():
            current = getattr(layer, name)
            if tuple(current.shape) != tuple(tensor.shape):
                raise ValueError(f"{name} has shape {tuple(tensor.shape)}, expected {tuple(current.shape)} "
                                 f"for a {k}->{n} layer with group_size {qw.spec.group_size}")
            layer._buffers[name] = tensor.to(qw.codes.device)
        return layer

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bits={self.bits}, "
                f"group_size={self.group_size}, sym={self.sym}, bias={self.bias is not None}, kernel={self.kernel}")

    def logical_parameters(self) -> int:
        """Parameters of the equivalent ``nn.Linear`` (weight, plus bias when present)."""
        return self.in_features * self.out_features + (self.out_features if self.bias is not None else 0)

    # -- state handling -------------------------------------------------------------------------
    def _apply(self, fn, recurse=True):
        """Move/cast like any module, but keep ``scales`` and ``bias`` in float16 (the format's dtype)."""
        kept = {name: self._buffers[name] for name in _FP16_BUFFERS if self._buffers.get(name) is not None}
        device = self.qweight.device
        super()._apply(fn, recurse)
        if self.qweight.device != device:
            self.reset_kernel()
        for name, old in kept.items():
            new = self._buffers[name]
            if new.dtype != old.dtype:
                self._buffers[name] = old.to(new.device)
        return self

    def _load_from_state_dict(self, *args, **kwargs):
        self.reset_kernel()
        super()._load_from_state_dict(*args, **kwargs)

    def reset_kernel(self) -> None:
        """Forget the prepared kernel tensors (call after changing the buffers in place)."""
        self._layout: tuple | None = None            # (gs, perm) or (None, None), from g_idx
        self._prepared: dict[str, dict] = {}         # kernel -> its tensors, on the layer's device
        self._last: tuple[str, torch.dtype] | None = None   # (kernel, activation dtype) of the last forward

    # -- weights --------------------------------------------------------------------------------
    def _codes_and_zeros(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Codes ``[K, N]`` and raw zero points ``[G, N]`` (the stored zeros plus ``zero_offset``), int32."""
        codes = unpack_rows(self.qweight, self.bits, self.in_features)
        zeros = unpack_cols(self.qzeros, self.bits, self.out_features) + self.zero_offset
        return codes, zeros

    def dequantize_weight(self) -> torch.Tensor:
        """The weight ``[N, K]`` in float32."""
        codes, zeros = self._codes_and_zeros()                             # [K, N], [G, N]
        g = self.g_idx.long()
        w = self.scales.float()[g] * (codes.float() - zeros[g].float())    # [K, N]
        return w.t()

    # -- kernels --------------------------------------------------------------------------------
    def _group_plan(self) -> tuple[int | None, torch.Tensor | None]:
        if self._layout is None:
            layout = _group_layout(self.g_idx, self.scales.shape[0], self.in_features, self.group_size)
            self._layout = layout if layout is not None else (None, None)
        return self._layout

    def kernel_for(self, dtype: torch.dtype) -> str:
        """The forward path for activations of ``dtype`` on the layer's device."""
        gs, _ = self._group_plan()
        if self.qweight.device.type != "cpu" or gs is None:
            return KERNEL_DEQUANT
        groups = self.scales.shape[0]
        if self.bits in INT4_KERNEL_BITS and dtype == INT4_ACTIVATIONS:
            geometry = int4_geometry(self.in_features, self.out_features, gs, groups)
            if geometry is not None:
                _, k_pad, n_pad = geometry
                padded = (k_pad, n_pad) != (self.in_features, self.out_features)
                return KERNEL_INT4_PADDED if padded else KERNEL_INT4
        if self.bits == 8 and groups == 1:
            return KERNEL_INT8
        return KERNEL_DEQUANT

    @property
    def kernel(self) -> str:
        """The path the last forward took; before any forward, the one for the layer's ``dtype``."""
        return self._last[0] if self._last is not None else self.kernel_for(self.dtype)

    @property
    def activation_dtype(self) -> torch.dtype:
        """The dtype the last forward computed in (the layer's ``dtype`` before any forward)."""
        return self._last[1] if self._last is not None else self.dtype

    def _tensors(self, kernel: str) -> dict:
        """The prepared tensors of ``kernel`` (built once per device)."""
        if kernel not in self._prepared:
            self._prepared[kernel] = self._pack_for_kernel(kernel)
        return self._prepared[kernel]

    @torch.no_grad()
    def _pack_for_kernel(self, kernel: str) -> dict:
        """The weight as the forward path wants it, with float32 scale tensors (cast per dtype later).

        The dequant path keeps the unpacked codes (uint8 ``[N, K]``, one byte per weight)
        so that each forward only rescales them.
        """
        gs, perm = self._group_plan()
        codes, zeros = self._codes_and_zeros()                             # [K, N], [G, N]
        scales = self.scales.float()                                       # [G, N]
        if perm is not None:
            codes = codes[perm]
        if kernel in (KERNEL_INT4, KERNEL_INT4_PADDED):
            if self.bits < 4:   # centre each group's codes on 8 (0..3 or 0..7 shifted by 8 - z stay in 0..15):
                g = self.g_idx.long() if perm is None else self.g_idx.long()[perm]   # the float offsets below
                codes, zeros = codes + (8 - zeros)[g], torch.full_like(zeros, 8)    # are then exactly 0
            k, n = codes.shape
            kernel_gs, k_pad, n_pad = int4_geometry(k, n, gs, scales.shape[0])
            codes = F.pad(codes, (0, n_pad - n, 0, k_pad - k))           # zero codes: x is zero there
            packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes.t().contiguous(), 2)  # [Np, Kp/2]
            offsets = scales * (8 - zeros).float()                         # (q-8)·s + s·(8-z) = s·(q-z)
            pairs = F.pad(torch.stack([scales, offsets], dim=-1), (0, 0, 0, n_pad - n))   # [G, Np, 2]
            pairs = pairs.repeat_interleave(k_pad // scales.shape[0] // kernel_gs, dim=0)  # [Kp/kernel_gs, Np, 2]
            return {"weight": packed, "kernel_gs": kernel_gs, "k_pad": k_pad, "perm": perm,
                    "fp32": {"scales_and_zeros": pairs.contiguous()}, "per_dtype": {}}
        if kernel == KERNEL_INT8:
            weight = (codes.t() - 128).to(torch.int8).contiguous()        # [N, K]
            offsets = scales[0] * (128 - zeros[0]).float()                 # [N]
            fp32 = {"scales": scales[0].contiguous()}
            if bool((offsets != 0).any()):
                fp32["offsets"] = offsets
            return {"weight": weight, "perm": perm, "fp32": fp32, "per_dtype": {}}
        return {"weight": codes.t().to(torch.uint8).contiguous(), "zeros": zeros.t().float().contiguous(),
                "gs": gs, "perm": perm, "fp32": {}, "per_dtype": {}}      # [N, K], [N, G]

    @staticmethod
    def _cast(tensors: dict, dtype: torch.dtype) -> dict:
        per_dtype = tensors["per_dtype"]
        if dtype not in per_dtype:
            per_dtype[dtype] = {name: t.to(dtype).contiguous() for name, t in tensors["fp32"].items()}
        return per_dtype[dtype]

    def _packed_matmul(self, x: torch.Tensor, kernel: str) -> torch.Tensor:
        """``x [M, K]`` (CPU, a kernel dtype) times the packed weight: ``[M, N]`` in ``x``'s dtype."""
        tensors = self._tensors(kernel)
        scaled = self._cast(tensors, x.dtype)
        if tensors["perm"] is not None:
            x = x.index_select(1, tensors["perm"])
        if kernel == KERNEL_INT8:
            y = torch.ops.aten._weight_int8pack_mm(x.contiguous(), tensors["weight"], scaled["scales"])
            if "offsets" in scaled:
                y = (y.float() + x.float().sum(1, keepdim=True) * tensors["fp32"]["offsets"]).to(x.dtype)
            return y
        x = F.pad(x, (0, tensors["k_pad"] - self.in_features)).contiguous()
        y = torch.ops.aten._weight_int4pack_mm_for_cpu(x, tensors["weight"], tensors["kernel_gs"],
                                                       scaled["scales_and_zeros"])
        return y[:, :self.out_features]

    def _dequant_matmul(self, x: torch.Tensor) -> torch.Tensor:
        """``x [M, K]`` times the weight rebuilt from the cached codes, in ``x``'s dtype."""
        tensors = self._tensors(KERNEL_DEQUANT)
        codes, zeros, gs = tensors["weight"], tensors["zeros"], tensors["gs"]   # [N, K] uint8, [N, G]
        scales = self.scales.float().t()                                   # [N, G]
        n, k = codes.shape
        if gs is not None:                                                 # runs of gs, contiguous after perm
            idx = torch.arange(k, device=codes.device) // gs
            if tensors["perm"] is not None:
                x = x.index_select(1, tensors["perm"].to(x.device))
        else:                                                              # ragged groups: gather per column
            idx = self.g_idx.long()
        w = (codes.float() - zeros[:, idx]) * scales[:, idx]
        return F.linear(x, w.to(x.dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] != self.in_features:
            raise ValueError(f"expected inputs with {self.in_features} features, got shape {tuple(x.shape)}")
        lead = x.shape[:-1]
        dtype = x.dtype if x.dtype in KERNEL_DTYPES else torch.float32
        x2 = x.reshape(-1, self.in_features).to(dtype)                    # [M, K]
        kernel = self.kernel_for(dtype)
        y = self._dequant_matmul(x2) if kernel == KERNEL_DEQUANT else self._packed_matmul(x2, kernel)
        self._last = (kernel, dtype)
        if self.bias is not None:
            y = y + self.bias.to(y.dtype)
        return y.to(x.dtype).reshape(*lead, self.out_features)
