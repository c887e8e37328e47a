"""Quantizer grids, RTN and GPTQ on a bare linear layer with correlated inputs.

Quality checks compare errors (relative output error, SQNR in dB); no test
asserts exact quantized values.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from llmslim.quant import (
    QuantSpec,
    accumulate_hessian,
    find_params,
    gptq_quantize_weight,
    make_empty_hessian,
    quantize,
    rtn_quantize_weight,
)

K, N, TOKENS = 256, 128, 1024


def _correlated_inputs(tokens: int, k: int, seed: int) -> torch.Tensor:
    """Inputs ``[tokens, k]`` with a decaying spectrum and a few large outlier features."""
    g = torch.Generator().manual_seed(seed)
    basis, _ = torch.linalg.qr(torch.randn(k, k, generator=g))
    spectrum = torch.logspace(0, -2, k)                                  # 1 .. 0.01
    x = (torch.randn(tokens, k, generator=g) * spectrum) @ basis.t()
    x[:, :4] *= 8.0                                                      # outlier channels
    return x + 0.05 * torch.randn(tokens, 1, generator=g)                # shared offset


@pytest.fixture(scope="module")
def layer_data():
    torch.manual_seed(0)
    linear = nn.Linear(K, N)
    x = _correlated_inputs(TOKENS, K, seed=1)
    h, n = make_empty_hessian(K, "cpu"), 0
    for chunk in x.split(300):
        h, n = accumulate_hessian(h, n, chunk)
    return linear.weight.detach().clone(), x, h


def _rel_output_error(x: torch.Tensor, w: torch.Tensor, q: torch.Tensor) -> float:
    return ((x @ (w - q).t()).norm() / (x @ w.t()).norm()).item()


def _sqnr_db(ref: torch.Tensor, approx: torch.Tensor) -> float:
    return 10 * math.log10(ref.square().sum().item() / max((ref - approx).square().sum().item(), 1e-30))


# -- Hessian --------------------------------------------------------------------------------------

def test_hessian_is_running_average_over_tokens(layer_data):
    _, x, h = layer_data
    expected = 2 * x.t() @ x / x.shape[0]
    assert torch.allclose(h, expected, rtol=1e-4, atol=1e-4 * expected.abs().max().item())
    # leading dims are flattened and counted as tokens; masked tokens are dropped
    h2, n2 = accumulate_hessian(make_empty_hessian(K), 0, x[:64].reshape(4, 16, K))
    assert n2 == 64 and h2.dtype == torch.float32
    mask = torch.zeros(4, 16, dtype=torch.bool)
    mask[:, :8] = True
    h3, n3 = accumulate_hessian(make_empty_hessian(K), 0, x[:64].reshape(4, 16, K), mask=mask)
    kept = x[:64].reshape(4, 16, K)[:, :8].reshape(-1, K)
    assert n3 == 32 and torch.allclose(h3, 2 * kept.t() @ kept / 32, rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match="features"):
        accumulate_hessian(make_empty_hessian(K), 0, torch.zeros(3, K + 1))


# -- quantizer grids ------------------------------------------------------------------------------

@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_find_params_conventions(bits):
    torch.manual_seed(bits)
    w = torch.randn(16, 64)
    w[1] = w[1].abs()                       # positive-only row: the range still includes 0
    w[2] = 0.0                              # all-zero row
    spec_sym, spec_asym = QuantSpec(bits, 64, sym=True), QuantSpec(bits, 64, sym=False)
    scale, zero = find_params(w, spec_sym)
    assert scale.shape == zero.shape == (16, 1)
    assert torch.all(zero == 2 ** (bits - 1)) and torch.all(scale > 0)
    scale, zero = find_params(w, spec_asym)
    assert torch.all(zero == zero.round()) and torch.all((zero >= 1) & (zero <= spec_asym.maxq))
    for spec in (spec_sym, spec_asym):
        scale, zero = find_params(w, spec)
        codes = quantize(w, scale, zero, spec.maxq)
        assert codes.min() >= 0 and codes.max() <= spec.maxq
        assert torch.all(scale[2] * (codes[2] - zero[2]) == 0)        # zeros stay exactly zero


@pytest.mark.parametrize("bits,min_db", [(8, 40.0), (4, 17.0), (3, 11.0)])
def test_rtn_sqnr(bits, min_db):
    torch.manual_seed(0)
    w = torch.randn(64, 256)
    qw = rtn_quantize_weight(w, QuantSpec(bits, 128))
    assert qw.codes.dtype == torch.uint8 and qw.scales.shape == (2, 64) and qw.zeros.dtype == torch.int32
    assert torch.equal(qw.g_idx, (torch.arange(256) // 128).to(torch.int32))
    assert _sqnr_db(w, qw.dequantize()) > min_db
    # the documented formula, written out
    g = qw.g_idx.long()
    manual = qw.scales[g].t() * (qw.codes.float() - qw.zeros[g].t().float())
    assert torch.allclose(manual, qw.dequantize())


def test_rtn_group_size_need_not_divide_columns():
    """100 columns in groups of 64: the second group is partial (36 columns), with its own grid."""
    qw = rtn_quantize_weight(torch.randn(8, 100), QuantSpec(4, 64))
    assert qw.scales.shape == (2, 8) and qw.g_idx.tolist() == [0] * 64 + [1] * 36
    assert rtn_quantize_weight(torch.randn(8, 40), QuantSpec(4, 64)).scales.shape == (1, 8)   # one group
    assert rtn_quantize_weight(torch.randn(8, 100), QuantSpec(4, -1)).scales.shape == (1, 8)
    with pytest.raises(ValueError):
        QuantSpec(bits=9)
    with pytest.raises(ValueError):
        QuantSpec(bits=4, scale_search="nope")


@pytest.mark.parametrize("bits,sym", [(2, True), (3, False), (4, True)])
def test_mse_scale_search_no_worse_than_minmax(bits, sym):
    torch.manual_seed(0)
    w = torch.distributions.StudentT(3.0).sample((64, 256)) * 0.02      # heavy tails: clipping helps
    errs = {}
    for search in ("minmax", "mse"):
        q = rtn_quantize_weight(w, QuantSpec(bits, 64, sym, search)).dequantize()
        errs[search] = (q - w).norm().item()
    assert errs["mse"] <= errs["minmax"]


# -- GPTQ -----------------------------------------------------------------------------------------

@pytest.mark.parametrize("bits,group_size", [(4, 128), (3, 128), (4, -1), (3, 32)])
def test_gptq_beats_rtn_on_outputs(layer_data, bits, group_size):
    w, x, h = layer_data
    spec = QuantSpec(bits, group_size)
    rtn = _rel_output_error(x, w, rtn_quantize_weight(w, spec).dequantize())
    qw, stats = gptq_quantize_weight(w, h, spec)
    gptq = _rel_output_error(x, w, qw.dequantize())
    assert gptq < 0.9 * rtn, (gptq, rtn)
    assert stats.damp_retries == 0 and stats.damp_used == pytest.approx(0.01)
    assert stats.dead_columns == 0 and stats.loss > 0 and math.isfinite(stats.loss)


def _naive_gptq(w, h, spec: QuantSpec, act_order: bool, damp: float = 0.01) -> torch.Tensor:
    """Column-by-column GPTQ in float64 without lazy batching: the quantized weight ``[N, K]``."""
    w, h = w.double().clone(), h.double().clone()
    k = w.shape[1]
    gs = k if spec.group_size == -1 else spec.group_size
    perm = torch.argsort(h.diagonal(), descending=True, stable=True) if act_order else torch.arange(k)
    w, h = w[:, perm], h[perm][:, perm]
    h += damp * h.diagonal().mean() * torch.eye(k, dtype=h.dtype)
    u = torch.linalg.cholesky(torch.linalg.inv(h), upper=True)
    q = torch.zeros_like(w)
    for j in range(k):
        if j % gs == 0:
            scale, zero = find_params(w[:, j:j + gs], spec)
        col = scale[:, 0] * (quantize(w[:, j], scale[:, 0], zero[:, 0], spec.maxq) - zero[:, 0])
        q[:, j] = col
        w[:, j:] -= ((w[:, j] - col) / u[j, j]).unsqueeze(1) * u[j, j:].unsqueeze(0)
    return q[:, torch.argsort(perm)].float()


@pytest.mark.parametrize("block_size", [32, 128])
def test_act_order_dynamic_groups_match_reference(layer_data, block_size):
    w, x, h = layer_data
    spec = QuantSpec(4, 64)
    qw, _ = gptq_quantize_weight(w, h, spec, act_order=True, block_size=block_size)
    g = qw.g_idx.long()
    assert not torch.equal(g, torch.arange(K) // 64)                    # non-trivial g_idx
    assert torch.equal(torch.bincount(g, minlength=K // 64), torch.full((K // 64,), 64))
    deq = qw.dequantize()
    reference = _naive_gptq(w, h, spec, act_order=True)
    close = ((deq - reference).abs() <= 1e-5 * w.abs().max()).float().mean().item()
    assert close > 0.97 and _sqnr_db(reference, deq) > 30.0
    assert _rel_output_error(x, w, deq) < _rel_output_error(x, w, rtn_quantize_weight(w, spec).dequantize())


def test_static_groups_keep_trivial_g_idx(layer_data):
    w, x, h = layer_data
    spec = QuantSpec(4, 64)
    qw, _ = gptq_quantize_weight(w, h, spec, act_order=True, static_groups=True)
    assert torch.equal(qw.g_idx, (torch.arange(K) // 64).to(torch.int32))
    # the grids are those of the original weight's natural groups
    static = rtn_quantize_weight(w, spec)
    assert torch.allclose(qw.scales, static.scales) and torch.equal(qw.zeros, static.zeros)
    rtn = _rel_output_error(x, w, static.dequantize())
    assert _rel_output_error(x, w, qw.dequantize()) < 0.9 * rtn


def test_dead_columns_are_zeroed_and_counted(layer_data):
    w, x, _ = layer_data
    x = x.clone()
    x[:, [5, 77]] = 0.0
    h, _ = accumulate_hessian(make_empty_hessian(K), 0, x)
    qw, stats = gptq_quantize_weight(w, h, QuantSpec(4, 128), act_order=True)
    deq = qw.dequantize()
    assert stats.dead_columns == 2 and torch.isfinite(deq).all()
    assert torch.all(deq[:, [5, 77]] == 0)
    assert _rel_output_error(x, w, deq) < 0.2


def test_non_pd_hessian_raises_damping(layer_data):
    w, x, h = layer_data
    shifted = h - 0.05 * h.diagonal().mean() * torch.eye(K)            # indefinite
    qw, stats = gptq_quantize_weight(w, shifted, QuantSpec(4, 128), damp=0.01)
    assert stats.damp_retries >= 1 and stats.damp_used > 0.05
    assert torch.isfinite(qw.dequantize()).all()
    assert _sqnr_db(w, qw.dequantize()) > 10.0
    spike = torch.full((K, 1), K ** -0.5)
    hopeless = torch.eye(K) - 30.0 * spike @ spike.t()                  # eigenvalue -29, diagonal > 0
    with pytest.raises(ValueError, match="positive definite"):
        gptq_quantize_weight(w, hopeless, QuantSpec(4, 128))
    with pytest.raises(ValueError, match="negative diagonal"):
        gptq_quantize_weight(w, -torch.eye(K), QuantSpec(4, 128))


def test_gptq_rejects_bad_inputs(layer_data):
    w, _, h = layer_data
    with pytest.raises(ValueError, match="Hessian"):
        gptq_quantize_weight(w, h[:10, :10], QuantSpec(4, 128))
    assert gptq_quantize_weight(w, h, QuantSpec(4, 96))[0].scales.shape[0] == -(-w.shape[1] // 96)   # partial
    bad = w.clone()
    bad[0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        gptq_quantize_weight(bad, h, QuantSpec(4, 128))
    # the inputs are left untouched
    h_copy, w_copy = h.clone(), w.clone()
    gptq_quantize_weight(w, h, QuantSpec(4, 128), act_order=True)
    assert torch.equal(h, h_copy) and torch.equal(w, w_copy)


def test_importance_weighted_mse_favours_the_important_columns():
    """With one column weighted heavily, the mse search picks the grid that
    serves that column: its error is no larger than with unweighted search,
    and the weighted total error is no larger either."""
    g = torch.Generator().manual_seed(3)
    w = torch.randn(64, 32, generator=g)
    w[:, 0] *= 6.0  # an outlier column that minmax must cover, mse may clip
    importance = torch.ones(32)
    importance[0] = 1000.0
    spec = QuantSpec(bits=3, group_size=-1, scale_search="mse")

    def errors(scale, zero):
        deq = (quantize(w, scale, zero, spec.maxq) - zero) * scale
        return (deq - w).square()

    plain = errors(*find_params(w, spec))
    weighted = errors(*find_params(w, spec, importance))
    assert weighted[:, 0].sum() <= plain[:, 0].sum() + 1e-6
    assert (weighted * importance).sum() <= (plain * importance).sum() + 1e-6


def test_inverse_factor_works_on_one_copy_and_matches_the_textbook_factor(layer_data):
    """The factorisation asks for one working copy of the Hessian (it is 4 K² bytes: the 1B scale model's
    down_proj held seven at once before) and gives the factor of (H + λI)⁻¹ computed the plain way."""
    from llmslim.quant.gptq import _inverse_cholesky, working_hessian

    _, _, h = layer_data
    made = []

    def make():
        made.append(1)
        return working_hessian(h, h.device)

    upper, used, retries = _inverse_cholesky(make, 0.01)
    damped = h + 0.01 * h.diagonal().mean() * torch.eye(h.shape[0])
    expected = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(damped)), upper=True)
    assert len(made) == 1 and retries == 0 and used == pytest.approx(0.01)
    torch.testing.assert_close(upper, expected, rtol=1e-4, atol=1e-5)
    # a singular Hessian: dampening is raised in place on the same copy until it factorises
    x = torch.randn(8, h.shape[0], generator=torch.Generator().manual_seed(0))
    singular = 2 * x.t() @ x / 8
    made.clear()
    upper, used, retries = _inverse_cholesky(lambda: made.append(1) or working_hessian(singular, h.device), 0.0)
    assert retries >= 1 and used > 0 and len(made) == 1 and torch.isfinite(upper).all()
