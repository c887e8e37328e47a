"""QuantLinear: forward through the CPU low-bit kernels against its own dequantized weight."""

from __future__ import annotations

import pytest
import torch

from llmslim.quant import QuantLinear, QuantSpec, gptq_quantize_weight, rtn_quantize_weight

K, N = 256, 64
STANDARD = {"qweight": torch.int32, "qzeros": torch.int32, "scales": torch.float16, "g_idx": torch.int32,
            "bias": torch.float16}


def _act_order_weight(spec: QuantSpec):
    torch.manual_seed(1)
    x = torch.randn(512, K) * torch.linspace(0.1, 3.0, K).flip(0)[torch.randperm(K)]
    qw, _ = gptq_quantize_weight(torch.randn(N, K) * 0.05, 2 * x.t() @ x / 512, spec, act_order=True)
    return qw


def _layer(bits, group_size, sym=True, act_order=False, bias=True, dtype=torch.bfloat16):
    spec = QuantSpec(bits, group_size, sym)
    torch.manual_seed(0)
    qw = _act_order_weight(spec) if act_order else rtn_quantize_weight(torch.randn(N, K) * 0.05, spec)
    return QuantLinear.from_quantized(qw, torch.randn(N) * 0.1 if bias else None, dtype), qw


CASES = [  # bits, group_size, sym, act_order, expected kernel on CPU for bf16 activations
    (4, 128, True, False, "int4pack"),
    (4, 32, True, False, "int4pack"),
    (4, -1, True, False, "int4pack"),
    (4, 64, False, False, "int4pack"),
    (4, 64, True, True, "int4pack"),
    (8, -1, True, False, "int8pack"),
    (8, -1, False, False, "int8pack"),
    (8, 128, True, False, "dequant"),
    (3, 128, True, False, "int4pack"),     # 2- and 3-bit codes run as 4-bit codes of a smaller range
    (3, 64, False, True, "int4pack"),
    (2, 64, False, False, "int4pack"),
    (2, -1, True, False, "int4pack"),
]


@pytest.mark.parametrize("bits,group_size,sym,act_order,kernel", CASES)
def test_forward_matches_dequantized_weight(bits, group_size, sym, act_order, kernel):
    layer, qw = _layer(bits, group_size, sym, act_order)
    assert layer.kernel == kernel
    if act_order:
        assert not torch.equal(layer.g_idx.long(), torch.arange(K) // group_size)
    w = layer.dequantize_weight()
    assert w.shape == (N, K) and w.dtype == torch.float32
    assert torch.allclose(w, qw.dequantize(), rtol=1e-3, atol=1e-3 * w.abs().max().item())
    x = torch.randn(2, 5, K)
    ref = x @ w.t() + layer.bias.float()
    y = layer(x)
    # fp32 activations take an exact path (the int4 kernel would round them to bf16)
    assert y.shape == (2, 5, N) and y.dtype == torch.float32 and layer.kernel != "int4pack"
    assert layer.activation_dtype == torch.float32
    assert ((y - ref).norm() / ref.norm()).item() < 1e-5
    y16 = layer(x.to(torch.bfloat16))
    assert layer.kernel == kernel and layer.activation_dtype == torch.bfloat16
    assert y16.dtype == torch.bfloat16 and ((y16.float() - ref).norm() / ref.norm()).item() < 2e-2


def test_int4_forward_does_not_dequantize(monkeypatch):
    layer, _ = _layer(4, 128)
    x = torch.randn(3, K, dtype=torch.bfloat16)
    expected = layer(x)

    def forbidden(*_args, **_kwargs):
        raise AssertionError("the int4 path must not dequantize the weight")

    monkeypatch.setattr(layer, "dequantize_weight", forbidden)
    assert torch.allclose(layer(x), expected)
    assert layer(torch.randn(0, K, dtype=torch.bfloat16)).shape == (0, N) and layer.kernel == "int4pack"


def test_state_dict_is_standard_gptq():
    layer, _ = _layer(4, 128)
    layer(torch.randn(1, K))                                            # prepares the kernel cache
    state = layer.state_dict()
    assert {k: v.dtype for k, v in state.items()} == STANDARD
    assert state["qweight"].shape == (K // 8, N) and state["qzeros"].shape == (2, N // 8)
    assert state["scales"].shape == (2, N) and state["g_idx"].shape == (K,)
    no_bias, _ = _layer(3, 128, bias=False)
    assert set(no_bias.state_dict()) == set(STANDARD) - {"bias"}
    layer.to(torch.bfloat16)                                            # format dtypes survive casts
    assert {k: v.dtype for k, v in layer.state_dict().items()} == STANDARD


def test_load_state_dict_resets_kernel():
    source, _ = _layer(4, 64, act_order=True)
    target = QuantLinear(K, N, 4, 64, True, bias=True, dtype=torch.bfloat16)
    x = torch.randn(4, K, dtype=torch.bfloat16)
    target(x)                                                           # cache built from zeros
    target.load_state_dict(source.state_dict())
    assert torch.allclose(target(x), source(x)) and target.kernel == "int4pack"


def test_unsupported_shapes_fall_back_honestly():
    torch.manual_seed(0)
    qw = rtn_quantize_weight(torch.randn(8, K), QuantSpec(4, 48))      # no kernel group size divides 48
    layer = QuantLinear.from_quantized(qw, None, torch.bfloat16)
    assert layer.kernel == "dequant"
    x = torch.randn(3, K)
    assert torch.allclose(layer(x), x @ layer.dequantize_weight().t(), rtol=1e-5, atol=1e-5)
    assert QuantLinear(48, 64, 3, 16, True, bias=False).qweight.shape == (5, 64)   # 4.5 words, padded
    with pytest.raises(ValueError, match="features"):
        layer(torch.randn(3, K + 1))


def test_ragged_groups_from_a_foreign_checkpoint():
    """K = 96 with group_size 64 (GPTQModel writes such layers): the last group is short."""
    g = torch.Generator().manual_seed(0)
    layer = QuantLinear(96, 32, 4, 64, False, bias=False, dtype=torch.float32)
    assert layer.scales.shape == (2, 32) and layer.g_idx.tolist() == [0] * 64 + [1] * 32
    layer.qweight.copy_(torch.randint(-2 ** 31, 2 ** 31 - 1, layer.qweight.shape, generator=g, dtype=torch.int64))
    layer.qzeros.copy_(torch.randint(0, 2 ** 31 - 1, layer.qzeros.shape, generator=g, dtype=torch.int64))
    layer.scales.copy_(torch.rand(2, 32, generator=g) * 0.01 + 0.001)
    layer.reset_kernel()
    assert layer.kernel == "dequant"                                   # fp32 activations: exact path
    x = torch.randn(3, 96, generator=g)
    ref = x @ layer.dequantize_weight().t()
    assert ((layer(x) - ref).norm() / ref.norm()).item() < 1e-5
