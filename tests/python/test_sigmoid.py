"""Sigmoid attention (Ramapuram et al., ICLR 2025): P = sigmoid(S·scale + b) over the visible keys,
no normalization over the row, b = -log(Nk) unless given; LSE is log Σ_j P_ij. Against the formula
in float64 PyTorch: forward, every gradient (LSE's too), the layer."""
import math

import numpy as np
import pytest
import torch

import qkv
from layer_literal import expect_layer_equals_literal

torch.set_num_threads(2)


def literal(q, k, v, scale, bias, visible=None):
    """[B, H, N, D] float64 (k, v with Hk heads): (O, LSE) of sigmoid attention."""
    group = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)
    weights = torch.sigmoid(scale * q @ k.transpose(-1, -2) + bias)
    if visible is not None:
        weights = weights * visible
    return weights @ v, weights.sum(-1).log()


def tensors(seed, b, nq, nk, hq, hk, d, logits=1.0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(b, hq, nq, d, generator=g, dtype=torch.float64) * logits
    k = torch.randn(b, hk, nk, d, generator=g, dtype=torch.float64) * logits
    v = torch.randn(b, hk, nk, d, generator=g, dtype=torch.float64)
    return q, k, v


def gradients(function, leaves, dtype):
    """function's outputs (O, LSE) on copies of the leaves in dtype, and the gradients of a fixed
    random Σ dO·O + Σ dLSE·LSE."""
    copies = [x.detach().to(dtype).requires_grad_() for x in leaves]
    out, lse = function(*copies)
    g = torch.Generator().manual_seed(5)
    loss = (out * torch.randn(out.shape, generator=g, dtype=torch.float64).to(dtype)).sum()
    finite = torch.isfinite(lse)
    d_lse = torch.randn(lse.shape, generator=g, dtype=torch.float64).to(dtype)
    loss = loss + (torch.where(finite, lse, torch.zeros_like(lse)) * d_lse).sum()
    loss.backward()
    return out.detach(), lse.detach(), [c.grad for c in copies]


@pytest.mark.parametrize("hk,causal,logits", [(4, False, 1.0), (2, True, 1.0), (1, True, 3.0)])
def test_sigmoid_attention_forward_and_gradients(hk, causal, logits):
    q, k, v = tensors(1, 2, 11, 29, 4, hk, 16, logits)
    visible = torch.ones(11, 29).tril(29 - 11).bool() if causal else None
    bias = -math.log(29)

    def ours(q, k, v):
        out, lse = qkv.attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                 normalization="sigmoid", causal=causal, return_lse=True)
        return out.transpose(1, 2), lse

    def theirs(q, k, v):
        return literal(q, k, v, 0.25, bias, visible)

    o32, lse32, g32 = gradients(ours, [q, k, v], torch.float32)
    f32, flse32, h32 = gradients(theirs, [q, k, v], torch.float32)
    o64, lse64, g64 = gradients(theirs, [q, k, v], torch.float64)
    q64o, q64lse, q64g = gradients(ours, [q, k, v], torch.float64)
    assert torch.allclose(q64o, o64, atol=1e-12) and torch.allclose(q64lse, lse64, atol=1e-12)
    for got, exact in zip(q64g, g64):
        assert torch.allclose(got, exact, atol=1e-11)
    # float32 within twice the float32 formula's own error (plus 1e-6 of the largest entry)
    for got, floor_of, exact in [(o32, f32, o64), (lse32, flse32, lse64)] + list(zip(g32, h32, g64)):
        floor = (floor_of.double() - exact).abs().max()
        assert (got.double() - exact).abs().max() <= 2 * floor + 1e-6 * (1 + exact.abs().max())


def test_sigmoid_bias_weights_and_empty_rows():
    """An explicit sigmoid_bias; the returned weights are the sigmoids (rows need not sum to 1); a
    row that sees no key gets O = 0 and LSE = -inf."""
    q, k, v = tensors(2, 1, 5, 7, 2, 2, 8)
    mask = torch.ones(1, 2, 5, 7, dtype=torch.bool)
    mask[0, 1, 3] = False
    out, lse, weights = qkv.attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                      normalization="sigmoid", sigmoid_bias=0.5, mask=mask,
                                      return_lse=True, return_weights=True)
    want_o, want_lse = literal(q, k, v, 8 ** -0.5, 0.5, mask)
    p = torch.sigmoid(8 ** -0.5 * q @ k.transpose(-1, -2) + 0.5) * mask
    assert torch.allclose(weights, p, atol=1e-12)
    assert torch.allclose(out.transpose(1, 2), want_o, atol=1e-12)
    assert lse[0, 1, 3] == -math.inf and (out[0, 3, 1] == 0).all()
    assert torch.allclose(lse[torch.isfinite(lse)], want_lse[torch.isfinite(want_lse)])


def test_sigmoid_layer_equals_literal():
    """qkv.nn.MultiheadAttention(normalization="sigmoid") between torch's projections."""
    torch.manual_seed(3)
    layer = qkv.nn.MultiheadAttention(8, 2, batch_first=True, normalization="sigmoid",
                                      sigmoid_bias=-1.0)
    expect_layer_equals_literal(layer, torch.randn(2, 6, 8),
                                lambda q, k, v, params: literal(q, k, v, 0.5, -1.0)[0])


def test_sigmoid_errors():
    q = np.zeros((1, 4, 2, 8), dtype=np.float32)
    with pytest.raises(qkv.Error, match="sinks: expected none with normalization 'sigmoid'"):
        qkv.attention(q, q, q, normalization="sigmoid", sinks=np.zeros(2, np.float32))
    with pytest.raises(qkv.Error, match="normalization: expected softmax or sigmoid, got 'relu'"):
        qkv.attention(q, q, q, normalization="relu")
    with pytest.raises(qkv.Error, match="sigmoid_bias: expected none with normalization 'softmax'"):
        qkv.attention(q, q, q, sigmoid_bias=1.0)
    with pytest.raises(qkv.Error, match="normalization: expected softmax or sigmoid"):
        qkv.nn.MultiheadAttention(8, 2, normalization="tanh")
