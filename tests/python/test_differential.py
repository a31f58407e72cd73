"""qkv.nn.DifferentialAttention (Differential Transformer) against the same layer written with the
two attention maps formed in float64 PyTorch: the output and every parameter's gradient."""
import math

import pytest
import torch

import qkv

torch.set_num_threads(2)


def literal(layer, x, causal):
    """The layer's formula in float64 with explicit softmax maps."""
    p = {name: t.detach().double().requires_grad_() for name, t in layer.named_parameters()}
    n, length, e = x.shape
    d, h, hk = layer.head_dim, layer.num_heads, layer.num_kv_heads
    x = x.double()
    q = (x @ p["q_proj.weight"].T).view(n, length, 2 * h, d).transpose(1, 2)
    k = (x @ p["k_proj.weight"].T).view(n, length, 2 * hk, d).transpose(1, 2)
    v = (x @ p["v_proj.weight"].T).view(n, length, hk, 2 * d).transpose(1, 2)
    group = h // hk
    k = k.view(n, hk, 2, length, d).repeat_interleave(group, 1).reshape(n, 2 * h, length, d)
    v = v.repeat_interleave(group, 1)
    scores = q @ k.transpose(-1, -2) / math.sqrt(d)
    if causal:
        scores = scores.masked_fill(torch.ones(length, length).triu(1).bool(), float("-inf"))
    maps = scores.softmax(-1).view(n, h, 2, length, length)
    lam = (torch.exp((p["lambda_q1"] * p["lambda_k1"]).sum())
           - torch.exp((p["lambda_q2"] * p["lambda_k2"]).sum()) + layer.lambda_init)
    heads = (maps[:, :, 0] - lam * maps[:, :, 1]) @ v
    heads = heads * torch.rsqrt(heads.pow(2).mean(-1, keepdim=True) + 1e-5)
    heads = heads * p["subln_weight"] * (1 - layer.lambda_init)
    out = heads.transpose(1, 2).reshape(n, length, e) @ p["out_proj.weight"].T
    return out, p


@pytest.mark.parametrize("heads,kv_heads,causal,depth", [(2, 2, True, 0), (4, 2, True, 3),
                                                          (2, 1, False, 1)])
def test_differential_attention_matches_literal(heads, kv_heads, causal, depth):
    torch.manual_seed(heads + kv_heads + depth)
    layer = qkv.nn.DifferentialAttention(32, heads, depth, num_kv_heads=kv_heads)
    assert layer.lambda_init == pytest.approx(0.8 - 0.6 * math.exp(-0.3 * depth))
    x = torch.randn(2, 9, 32)
    out = layer(x, is_causal=causal)
    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(1))
    (out * g).sum().backward()
    want, p = literal(layer, x, causal)
    (want * g.double()).sum().backward()
    assert (out.double() - want).abs().max() <= 1e-5 * (1 + want.abs().max())
    for name, t in layer.named_parameters():
        exact = p[name].grad
        assert (t.grad.double() - exact).abs().max() <= 2e-5 * (1 + exact.abs().max()), name


def test_differential_attention_arguments():
    with pytest.raises(qkv.Error, match="embed_dim: expected a positive multiple of 2·num_heads"):
        qkv.nn.DifferentialAttention(30, 4, 0)
    with pytest.raises(qkv.Error, match="num_kv_heads: expected a divisor of num_heads"):
        qkv.nn.DifferentialAttention(32, 4, 0, num_kv_heads=3)
    layer = qkv.nn.DifferentialAttention(32, 2, 0)
    with pytest.raises(qkv.Error, match=r"x: expected \[N, L, E\] with E = 32"):
        layer(torch.zeros(2, 5, 16))
