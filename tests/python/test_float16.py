"""float16 (PyTorch's half, NumPy's float16) as an input and output dtype: read in place, widened
to float32 as the kernels pack it (F16C on x86), results rounded once to float16. Checked against
attention in float64 on the same rounded inputs: within one float16 rounding of the result (half
an ulp of its magnitude) plus float32's own error, forward and backward, for the functions and
the KV cache. (The layer's projections are torch's F.linear, which PyTorch 1.13 does not run in
float16 on a CPU.)"""
import math

import numpy as np
import pytest

torch = pytest.importorskip("torch")
import qkv  # noqa: E402

torch.set_num_threads(2)


def half_inputs(seed, shape_q, shape_kv):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(*shape_q, generator=g).half(), torch.randn(*shape_kv, generator=g).half(),
            torch.randn(*shape_kv, generator=g).half())


def literal(q, k, v, causal):
    """[B, H, L, E] attention in float64 (GQA by repeating heads)."""
    group = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)
    s = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
    if causal:
        s = s.masked_fill(torch.ones(s.shape[-2:], dtype=torch.bool).triu(1), -math.inf)
    return s.softmax(-1) @ v


def within_half_rounding(got, want, roundings=1):
    """|got − want| ≤ `roundings` half-ulps of float16 at the result's magnitude, plus 1e-5 of
    it."""
    scale = want.abs().max().item()
    half_ulp = 2.0 ** (math.floor(math.log2(max(scale, 2 ** -14))) - 11)
    assert (got.double() - want).abs().max().item() <= roundings * half_ulp + 1e-5 * scale


@pytest.mark.parametrize("causal,kv_heads", [(False, 4), (True, 2), (True, 1)])
def test_scaled_dot_product_attention_in_half(causal, kv_heads):
    q, k, v = half_inputs(kv_heads, (2, 4, 37, 32), (2, kv_heads, 37, 32))
    exact = [t.double().requires_grad_() for t in (q, k, v)]
    want = literal(*exact, causal)
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    out = qkv.scaled_dot_product_attention(*leaves, is_causal=causal, enable_gqa=kv_heads < 4)
    assert out.dtype == torch.float16
    within_half_rounding(out, want.detach())
    # The output's gradient reaches qkv rounded to float16: the reference takes the same values.
    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(9)).half().float()
    (out.float() * g).sum().backward()
    (want * g.double()).sum().backward()
    # The backward reads the saved O, itself rounded to float16 (Δ = dO·O): a second rounding.
    for leaf, reference in zip(leaves, exact):
        assert leaf.grad.dtype == torch.float16
        within_half_rounding(leaf.grad, reference.grad, roundings=2)


def test_flash_attn_func_on_numpy_float16():
    q, k, v = half_inputs(3, (1, 20, 2, 16), (1, 20, 2, 16))
    out = qkv.flash_attn_func(q.numpy(), k.numpy(), v.numpy(), causal=True)
    assert out.dtype == np.float16
    want = literal(*(t.double().transpose(1, 2) for t in (q, k, v)), True).transpose(1, 2)
    within_half_rounding(torch.from_numpy(out), want)


def test_a_float16_kv_cache():
    g = torch.Generator().manual_seed(5)
    k_cache = torch.randn(2, 12, 2, 16, generator=g).half()
    v_cache = torch.randn(2, 12, 2, 16, generator=g).half()
    q, k, v = (torch.randn(2, 1, 2, 16, generator=g).half() for _ in range(3))
    out = qkv.flash_attn_with_kvcache(q, k_cache, v_cache, k, v, cache_seqlens=5)
    assert out.dtype == torch.float16 and torch.equal(k_cache[:, 5], k[:, 0])
    want = literal(q.double().transpose(1, 2), k_cache[:, :6].double().transpose(1, 2),
                   v_cache[:, :6].double().transpose(1, 2), False).transpose(1, 2)
    within_half_rounding(out, want)
