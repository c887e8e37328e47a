"""A linear layer holding GPTQ v1 tensors, with real low-bit CPU kernels.

:class:`QuantLinear` keeps exactly the standard buffers ``qweight``,
``qzeros``, ``scales``, ``g_idx`` and ``bias`` (see :mod:`llmslim.quant.packing`),
so a model's ``state_dict()`` is a GPTQ checkpoint. ``scales`` and ``bias``
stay float16 even when the model is cast to another dtype.

Forward paths (``QuantLinear.kernel`` says which one runs):

``"int4pack"``
    4-bit on CPU through aten's tinygemm kernels
    (``_convert_weight_to_int4pack_for_cpu`` / ``_weight_int4pack_mm_for_cpu``).
    Their conventions, found by experiment on torch 2.13:

    * the weight is an int32 ``[N, K]`` matrix of codes 0..15 (``innerKTiles``
      is ignored on CPU); it packs to uint8 ``[N, K/2]``; N must be a multiple of 16;
    * ``qScaleAndZeros`` is ``[K/gs, N, 2]`` in the activation's dtype (float32,
      bfloat16 or float16), and a weight is ``(code - 8) · scale + offset``:
      a GPTQ zero point ``z`` becomes the float offset ``scale · (8 - z)``;
    * the kernel group size must be 32, 64, 128 or 256 and divide K; larger
      groups (and per-channel scales) are repeated into smaller kernel groups,
      which is exact;
    * activations must be a contiguous 2-D matrix.

    Act-order layers (non-monotonic ``g_idx``) are served by permuting the
    weight's columns once at preparation so each group is contiguous, and
    permuting the activations' features the same way at every forward.

``"int8pack"``
    8-bit with one group per output channel, through ``_weight_int8pack_mm``
    (int8 weight ``[N, K]``, per-row scales in the activation dtype). The codes
    are shifted by 128; an asymmetric zero point adds ``Σx · scale · (128 - z)``.

``"dequant"``
    Everything else (2/3-bit, other group layouts, CUDA): the weight is
    dequantized on the fly in the activation dtype for each forward.

The packed kernel weights are prepared on the first forward (or by
:meth:`QuantLinear.prepare`) and kept in a plain attribute, outside the state
dict; loading a state dict discards them.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from llmslim.quant.packing import PACKABLE_BITS, _run, to_gptq_tensors, unpack_cols, unpack_rows
from llmslim.quant.quantizer import QuantizedWeight

__all__ = ["QuantLinear", "KERNEL_INT4", "KERNEL_INT8", "KERNEL_DEQUANT"]

KERNEL_INT4 = "int4pack"
KERNEL_INT8 = "int8pack"
KERNEL_DEQUANT = "dequant"
INT4_GROUP_SIZES = (256, 128, 64, 32)
KERNEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_FP16_BUFFERS = ("scales", "bias")


def _group_layout(g_idx: torch.Tensor, groups: int, k: int) -> tuple[int, torch.Tensor | None] | None:
    """``(gs, perm)`` when every group holds ``gs = K / G`` columns, else None.

    ``perm`` (None when ``g_idx`` is already ``k // gs``) orders the columns
    so that each group's columns become contiguous.
    """
    if groups < 1 or k % groups != 0:
        return None
    gs = k // groups
    expected = torch.arange(k, device=g_idx.device) // gs
    g = g_idx.long()
    if torch.equal(g, expected):
        return gs, None
    perm = torch.argsort(g, stable=True)
    return (gs, perm) if torch.equal(g[perm], expected) else None


def _int4_group(gs: int) -> int | None:
    """The largest tinygemm group size dividing ``gs``."""
    return next((size for size in INT4_GROUP_SIZES if gs % size == 0), None)


class QuantLinear(nn.Module):
    """``y = x Wᵀ + b`` with ``W`` stored in the GPTQ v1 format.

    ``dtype`` is the layer's activation dtype: :meth:`prepare` readies the
    kernel for it; other activation dtypes are prepared on first use.
    """

    def __init__(self, in_features: int, out_features: int, bits: int, group_size: int, sym: bool,
                 bias: bool, dtype: torch.dtype = torch.float16):
        super().__init__()
        if bits not in PACKABLE_BITS:
            raise ValueError(f"QuantLinear supports {PACKABLE_BITS} bits, got {bits}")
        values, words = _run(bits)
        for what, size in (("in_features", in_features), ("out_features", out_features)):
            if size < 1 or size % values != 0:
                raise ValueError(f"{what} = {size} must be a positive multiple of {values} for {bits}-bit packing")
        if group_size != -1 and group_size < 1:
            raise ValueError(f"group_size must be -1 or positive, got {group_size}")
        self.in_features, self.out_features = in_features, out_features
        self.bits, self.group_size, self.sym, self.dtype = bits, group_size, sym, dtype
        groups = 1 if group_size == -1 else -(-in_features // group_size)
        gs = in_features if group_size == -1 else group_size
        self.register_buffer("qweight", torch.zeros(in_features // values * words, out_features, dtype=torch.int32))
        self.register_buffer("qzeros", torch.zeros(groups, out_features // values * words, dtype=torch.int32))
        self.register_buffer("scales", torch.zeros(groups, out_features, dtype=torch.float16))
        self.register_buffer("g_idx", (torch.arange(in_features) // gs).to(torch.int32))
        self.register_buffer("bias", torch.zeros(out_features, dtype=torch.float16) if bias else None)
        self._plan: dict | None = None       # kernel choice, from the buffers' values
        self._prepared: dict | None = None   # forward-path tensors, on the layer's device

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
        self._plan = self._prepared = None

    # -- weights --------------------------------------------------------------------------------
    def _codes_and_zeros(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Codes ``[K, N]`` and raw zero points ``[G, N]`` (the v1 ``zero - 1`` plus one), int32."""
        codes = unpack_rows(self.qweight, self.bits, self.in_features)
        zeros = unpack_cols(self.qzeros, self.bits, self.out_features) + 1
        return codes, zeros

    def dequantize_weight(self) -> torch.Tensor:
        """The weight ``[N, K]`` in float32."""
        codes, zeros = self._codes_and_zeros()                             # [K, N], [G, N]
        g = self.g_idx.long()
        w = self.scales.float()[g] * (codes.float() - zeros[g].float())    # [K, N]
        return w.t()

    # -- kernels --------------------------------------------------------------------------------
    def _kernel_plan(self) -> dict:
        """The forward path on CPU: ``{"kernel", "gs", "perm", "kernel_gs", "device"}``.

        ``gs``/``perm`` describe equal-sized groups (None when ``g_idx`` is ragged).
        """
        if self._plan is None or self._plan["device"] != self.g_idx.device:
            layout = _group_layout(self.g_idx, self.scales.shape[0], self.in_features)
            gs, perm = layout if layout is not None else (None, None)
            plan = {"kernel": KERNEL_DEQUANT, "gs": gs, "perm": perm, "kernel_gs": None,
                    "device": self.g_idx.device}
            if layout is not None and self.bits == 4 and self.out_features % 16 == 0 and _int4_group(gs):
                plan.update(kernel=KERNEL_INT4, kernel_gs=_int4_group(gs))
            elif layout is not None and self.bits == 8 and self.scales.shape[0] == 1:
                plan.update(kernel=KERNEL_INT8)
            self._plan = plan
        return self._plan

    @property
    def kernel(self) -> str:
        """The forward path for inputs on the layer's device: ``"int4pack"``, ``"int8pack"`` or ``"dequant"``."""
        if self.qweight.device.type != "cpu":
            return KERNEL_DEQUANT
        return self._kernel_plan()["kernel"]

    def prepare(self, dtype: torch.dtype | None = None) -> QuantLinear:
        """Unpack/repack the weight for the forward path (once per device) and ready it for ``dtype``."""
        dtype = dtype or self.dtype
        dtype = dtype if dtype in KERNEL_DTYPES else torch.float32
        if self._prepared is None or self._prepared["device"] != self.qweight.device:
            self._prepared = self._pack_for_kernel(self._kernel_plan(), self.kernel)
            self._prepared["device"] = self.qweight.device
        per_dtype = self._prepared["per_dtype"]
        if dtype not in per_dtype:
            per_dtype[dtype] = {name: t.to(dtype).contiguous() for name, t in self._prepared["fp32"].items()}
        return self

    @torch.no_grad()
    def _pack_for_kernel(self, plan: dict, kernel: str) -> dict:
        """The weight as the forward path wants it, and float32 scale tensors (cast per dtype later).

        The dequant path keeps the unpacked codes (uint8 ``[N, K]``, one byte per weight)
        so that each forward only rescales them.
        """
        codes, zeros = self._codes_and_zeros()                             # [K, N], [G, N]
        scales = self.scales.float()                                       # [G, N]
        if plan["perm"] is not None:
            codes = codes[plan["perm"]]
        if kernel == KERNEL_INT4:
            packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes.t().contiguous(), 2)  # [N, K/2]
            offsets = scales * (8 - zeros).float()                         # (q-8)·s + s·(8-z) = s·(q-z)
            pairs = torch.stack([scales, offsets], dim=-1)                 # [G, N, 2]
            pairs = pairs.repeat_interleave(plan["gs"] // plan["kernel_gs"], dim=0)  # [K/kernel_gs, N, 2]
            return {"weight": packed, "fp32": {"scales_and_zeros": pairs.contiguous()}, "per_dtype": {}}
        if kernel == KERNEL_INT8:
            weight = (codes.t() - 128).to(torch.int8).contiguous()        # [N, K]
            offsets = scales[0] * (128 - zeros[0]).float()                 # [N]
            fp32 = {"scales": scales[0].contiguous()}
            if bool((offsets != 0).any()):
                fp32["offsets"] = offsets
            return {"weight": weight, "fp32": fp32, "per_dtype": {}}
        return {"weight": codes.t().to(torch.uint8).contiguous(), "zeros": zeros.t().float().contiguous(),
                "fp32": {}, "per_dtype": {}}                              # [N, K], [N, G]

    def _kernel_matmul(self, x: torch.Tensor) -> torch.Tensor:
        """``x [M, K]`` (CPU) times the packed weight: ``[M, N]`` in the kernel's dtype."""
        plan = self._kernel_plan()
        if plan["kernel"] == KERNEL_INT4:
            # torch's CPU int4 kernel is fast only with bf16 activations (measured: with fp32 or
            # fp16 inputs a 2048x2048 layer at 256 tokens ran ~60x slower than with bf16).
            dtype = torch.bfloat16
        else:
            dtype = x.dtype if x.dtype in KERNEL_DTYPES else torch.float32
        self.prepare(dtype)
        tensors = self._prepared["per_dtype"][dtype]
        x = x.to(dtype)
        if plan["perm"] is not None:
            x = x.index_select(1, plan["perm"])
        x = x.contiguous()
        if plan["kernel"] == KERNEL_INT4:
            return torch.ops.aten._weight_int4pack_mm_for_cpu(x, self._prepared["weight"], plan["kernel_gs"],
                                                              tensors["scales_and_zeros"])
        y = torch.ops.aten._weight_int8pack_mm(x, self._prepared["weight"], tensors["scales"])
        if "offsets" in tensors:
            y = (y.float() + x.float().sum(1, keepdim=True) * self._prepared["fp32"]["offsets"]).to(dtype)
        return y

    def _dequant_matmul(self, x: torch.Tensor) -> torch.Tensor:
        """``x [M, K]`` times the weight rebuilt from the cached codes, in ``x``'s dtype."""
        self.prepare()
        plan, codes = self._kernel_plan(), self._prepared["weight"]        # [N, K] uint8
        scales, zeros = self.scales.float().t(), self._prepared["zeros"]   # [N, G]
        n, k = codes.shape
        if plan["gs"] is not None:                                         # equal groups, contiguous after perm
            g = scales.shape[1]
            w = (codes.view(n, g, -1).float() - zeros.unsqueeze(2)) * scales.unsqueeze(2)
            w = w.view(n, k)
            if plan["perm"] is not None:
                x = x.index_select(1, plan["perm"].to(x.device))
        else:                                                              # ragged groups: gather per column
            idx = self.g_idx.long()
            w = (codes.float() - zeros[:, idx]) * scales[:, idx]
        return F.linear(x, w.to(x.dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] != self.in_features:
            raise ValueError(f"expected inputs with {self.in_features} features, got shape {tuple(x.shape)}")
        lead = x.shape[:-1]
        x2 = x.reshape(-1, self.in_features)                               # [M, K]
        if self.kernel != KERNEL_DEQUANT:                                  # the layer is on the CPU
            y = self._kernel_matmul(x2)
        else:
            y = self._dequant_matmul(x2)
        if self.bias is not None:
            y = y + self.bias.to(y.dtype)
        return y.to(x.dtype).reshape(*lead, self.out_features)
