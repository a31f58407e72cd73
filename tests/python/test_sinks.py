"""Attention sinks (gpt-oss) through every Python front end: against the formula written as a
softmax over the scores with the sink's column concatenated, that column then dropped, in float64
PyTorch; forward and every gradient, the sinks' own included."""
import numpy as np
import pytest
import torch

import qkv

torch.set_num_threads(2)


def literal(q, k, v, sinks, scale, visible=None):
    """[B, H, N, D] float64 torch tensors (k, v with Hk heads): softmax([S, sink]) with the sink's
    column dropped, times V; LSE over the concatenated row."""
    group = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)
    scores = scale * q @ k.transpose(-1, -2)
    if visible is not None:
        scores = scores.masked_fill(~visible, float("-inf"))
    column = sinks.view(1, -1, 1, 1).expand(*scores.shape[:-1], 1)
    full = torch.cat([scores, column], -1)
    weights = full.softmax(-1)[..., :-1]
    return weights @ v, full.logsumexp(-1)


def tensors(seed, b, nq, nk, hq, hk, d, logits=1.0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(b, hq, nq, d, generator=g, dtype=torch.float64) * logits
    k = torch.randn(b, hk, nk, d, generator=g, dtype=torch.float64) * logits
    v = torch.randn(b, hk, nk, d, generator=g, dtype=torch.float64)
    # Sinks from below the scores to above them (the scores grow as logits²).
    sinks = torch.linspace(-3.0, 6.0, hq, dtype=torch.float64) * logits ** 2
    return q, k, v, sinks


def check(got, want, floor):
    """|got − want| within twice the error of the same formula in float32 (floor), plus a
    backstop of 1e-6 relative to the largest entry."""
    bound = 2 * floor + 1e-6 * (1 + want.abs().max())
    assert (got.double() - want).abs().max() <= bound


def run_both(function, leaves):
    """function on float32 copies of the leaves (qkv) and on the float64 leaves: the outputs and
    the gradients of Σ outputs·weights."""
    results = []
    for dtype in (torch.float32, torch.float64):
        copies = [x.detach().to(dtype).requires_grad_() for x in leaves]
        out = function(*copies)
        g = torch.Generator().manual_seed(3)
        torch.sum(out * torch.randn(out.shape, generator=g, dtype=torch.float64).to(dtype)).backward()
        results.append((out.detach(), [c.grad for c in copies]))
    return results


@pytest.mark.parametrize("hk", [4, 2, 1])
@pytest.mark.parametrize("logits", [1.0, 4.0])
def test_attention_with_sinks_forward_and_gradients(hk, logits):
    """qkv.attention against the literal formula; the float32 literal sets the error floor."""
    q, k, v, sinks = tensors(1, 2, 9, 23, 4, hk, 16, logits)
    scale = 0.25

    def ours(q, k, v, sinks):
        out = qkv.attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), scale=scale,
                            score="dot", sinks=sinks)
        return out.transpose(1, 2)

    def theirs(q, k, v, sinks):
        return literal(q, k, v, sinks, scale)[0]

    (o32, g32), (o64, g64) = run_both(ours, [q, k, v, sinks])
    (f32, h32), _ = run_both(theirs, [q, k, v, sinks])
    want, _ = literal(q, k, v, sinks, scale)
    check(o32, want, (f32.double() - want).abs().max())
    check(o64, want, 1e-12)
    for name, got, floor_of, exact in zip("q k v sinks".split(), g32, h32, g64):
        check(got, exact, (floor_of.double() - exact).abs().max())


def test_sinks_lse_and_rows_that_see_no_key():
    """LSE includes the sink; a row that sees no key gets O = 0 and LSE = its sink; the weights
    of a row sum to less than one."""
    q, k, v, sinks = tensors(2, 1, 6, 6, 3, 3, 8)
    mask = torch.ones(1, 3, 6, 6, dtype=torch.bool)
    mask[0, 1, 2] = False  # head 1, query 2 sees nothing
    out, lse, weights = qkv.attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                      sinks=sinks, mask=mask, return_lse=True,
                                      return_weights=True)
    want_o, want_lse = literal(q, k, v, sinks, 8 ** -0.5, mask)
    assert torch.allclose(out.transpose(1, 2), want_o, atol=1e-12)
    assert torch.allclose(lse, want_lse, atol=1e-12)
    assert lse[0, 1, 2] == sinks[1] and (out[0, 2, 1] == 0).all()
    assert (weights.sum(-1) < 1).all()


def test_softmax_plus_one_is_a_sink_of_zero():
    q, k, v, _ = tensors(3, 1, 5, 7, 2, 2, 8)
    zeros = torch.zeros(2, dtype=torch.float64)
    out = qkv.attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), sinks=zeros)
    scores = (q @ k.transpose(-1, -2)) * 8 ** -0.5
    plus_one = scores.exp() / (1 + scores.exp().sum(-1, keepdim=True))
    assert torch.allclose(out.transpose(1, 2), plus_one @ v, atol=1e-12)


def test_flash_attn_and_varlen_with_sinks():
    """flash_attn_func ([B, N, H, D]) and flash_attn_varlen_func (one sinks tensor for every
    sequence, its gradient summed over them)."""
    q, k, v, sinks = tensors(4, 2, 5, 8, 4, 2, 8)
    causal = torch.ones(5, 8, dtype=torch.bool).tril(8 - 5)
    leaves = [x.float().requires_grad_() for x in (q, k, v, sinks)]
    out = qkv.flash_attn_func(*(x.transpose(1, 2) for x in leaves[:3]), causal=True,
                              sinks=leaves[3])
    want, _ = literal(q, k, v, sinks, 8 ** -0.5, causal)
    assert torch.allclose(out.transpose(1, 2).double(), want, atol=2e-6)
    out.sum().backward()
    single = leaves[3].grad.clone()
    # The same two sequences packed: the sinks' gradient is the sum over both.
    packed = [x.detach().transpose(1, 2).reshape(-1, x.shape[1], 8).requires_grad_()
              for x in leaves[:3]]
    varlen_sinks = sinks.float().requires_grad_()
    cu_q, cu_k = torch.tensor([0, 5, 10]), torch.tensor([0, 8, 16])
    out2 = qkv.flash_attn_varlen_func(*packed, cu_q, cu_k, 5, 8, causal=True, sinks=varlen_sinks)
    assert torch.allclose(out2.view(2, 5, 4, 8), out.detach(), atol=1e-6)
    out2.sum().backward()
    assert torch.allclose(varlen_sinks.grad, single, atol=1e-5)


def test_flex_attention_with_sinks_and_a_block_mask():
    q, k, v, sinks = tensors(5, 1, 64, 64, 2, 2, 16)

    def sliding(b, h, q_idx, kv_idx):
        return (q_idx >= kv_idx) & (q_idx - kv_idx < 8)

    mask = qkv.create_block_mask(sliding, 1, 1, 64, 64, BLOCK_SIZE=16)
    out, lse = qkv.flex_attention(q, k, v, block_mask=mask, sinks=sinks, return_lse=True)
    i, j = torch.arange(64)[:, None], torch.arange(64)[None, :]
    want_o, want_lse = literal(q, k, v, sinks, 0.25, sliding(0, 0, i, j))
    assert torch.allclose(out, want_o, atol=1e-12) and torch.allclose(lse, want_lse, atol=1e-12)


def test_sinks_shape_is_checked():
    q = np.zeros((1, 4, 2, 8), dtype=np.float32)
    with pytest.raises(qkv.Error, match=r"sinks: expected \[Hq\] = \[2\], got \[3\]"):
        qkv.attention(q, q, q, sinks=np.zeros(3, dtype=np.float32))
