"""qkv.flex_attention and qkv.create_block_mask against a literal float64 evaluation of
FlexAttention's meaning, on the examples of FlexAttention's own documentation: forward, LSE and
gradients (of query, key, value and of the tensors a score_mod reads). Tolerances come from the
error floor of the same literal evaluation in float32 (STYLE.md)."""
import numpy as np
import pytest
import torch

import qkv

torch.set_num_threads(2)

B, H, L, S, E = 2, 4, 150, 150, 16
SLIDING_WINDOW = 24
PREFIX_LENGTH = 37
DOCUMENT_ID = torch.repeat_interleave(torch.arange(5), torch.tensor([20, 45, 10, 60, 15]))


def causal_mask(b, h, q_idx, kv_idx):
    return q_idx >= kv_idx


def sliding_window_causal(b, h, q_idx, kv_idx):
    return (q_idx >= kv_idx) & (q_idx - kv_idx <= SLIDING_WINDOW)


def prefix_mask(b, h, q_idx, kv_idx):
    return kv_idx <= PREFIX_LENGTH


def document_mask(b, h, q_idx, kv_idx):
    return DOCUMENT_ID[q_idx] == DOCUMENT_ID[kv_idx]


ALIBI_SLOPES = torch.exp2(-8.0 * torch.arange(1, H + 1) / H).double()


def alibi(score, b, h, q_idx, kv_idx):
    return score + ALIBI_SLOPES.to(score.dtype)[h] * (kv_idx - q_idx)


def soft_cap(score, b, h, q_idx, kv_idx):
    return 20.0 * torch.tanh(score / 20.0)


def relative_position(score, b, h, q_idx, kv_idx):
    return score + (q_idx - kv_idx) * 0.05


def learned(shape, seed):
    """A learned tensor per dtype, the same values in each (its gradient is checked)."""
    generator = torch.Generator().manual_seed(seed)
    values = 0.3 * torch.randn(shape, generator=generator)
    return lambda dtype: values.to(dtype).requires_grad_(True)


TABLE = learned((H, 2 * 40 - 1), 7)  # relative distances up to 39, clamped beyond
SLOPES = learned((H,), 8)
SCALES = learned((H,), 9)


def learned_relative_bias(dtype):
    table = TABLE(dtype)

    def score_mod(score, b, h, q_idx, kv_idx):  # a Python function: the general path
        return score + table[h, torch.clamp(q_idx - kv_idx, -39, 39) + 39]
    return score_mod, [table]


def native(*pieces):
    """A qkv.score_mods composition, its learned tensors made per dtype."""
    def make(dtype):
        mods, tensors = [], []
        for piece in pieces:
            if piece == "soft_cap":
                mods.append(qkv.score_mods.soft_cap(20.0))
                continue
            tensor = {"alibi": SLOPES, "relative_bias": TABLE, "head_scale": SCALES}[piece](dtype)
            mods.append(getattr(qkv.score_mods, piece)(tensor))
            tensors.append(tensor)
        return qkv.score_mods.compose(*mods), tensors
    return make


def fixed(score_mod):
    return lambda dtype: (score_mod, [])


# FlexAttention's documented examples, (name, score_mod factory or None, mask_mod): Python
# score_mods take the general path, qkv.score_mods run natively.
EXAMPLES = [
    ("causal", None, causal_mask),
    ("sliding_window", None, sliding_window_causal),
    ("prefix_lm", None, qkv.or_masks(prefix_mask, causal_mask)),
    ("document_masking", None, document_mask),
    ("document_causal", None, qkv.and_masks(document_mask, causal_mask)),
    ("alibi", fixed(alibi), None),
    ("soft_cap", fixed(soft_cap), None),
    ("relative_position", fixed(relative_position), None),
    ("learned_relative_bias", learned_relative_bias, None),
    ("tanh_soft_capping_causal", fixed(soft_cap), causal_mask),
    ("alibi_sliding_window", fixed(alibi), sliding_window_causal),
    ("native_alibi_causal", native("alibi"), causal_mask),
    ("native_soft_cap", native("soft_cap"), None),
    ("native_relative_bias", native("relative_bias"), None),
    ("native_all_documents", native("head_scale", "relative_bias", "alibi", "soft_cap"),
     document_mask),
]


def literal(query, key, value, score_mod, mask_mod, scale):
    """FlexAttention's meaning, one step at a time, in the inputs' dtype (float64 or float32)."""
    group = query.shape[1] // key.shape[1]
    key, value = key.repeat_interleave(group, 1), value.repeat_interleave(group, 1)
    scores = query @ key.transpose(-1, -2) * scale
    b = torch.arange(query.shape[0]).view(-1, 1, 1, 1)
    h = torch.arange(query.shape[1]).view(1, -1, 1, 1)
    q_idx = torch.arange(query.shape[2]).view(1, 1, -1, 1)
    kv_idx = torch.arange(key.shape[2]).view(1, 1, 1, -1)
    if score_mod is not None:
        scores = score_mod(scores, b, h, q_idx, kv_idx)
    if mask_mod is not None:
        visible = mask_mod(b, h, q_idx, kv_idx).expand(scores.shape)
        scores = scores.masked_fill(~visible, float("-inf"))
    lse = torch.logsumexp(scores, dim=-1)
    weights = torch.exp(scores - lse.unsqueeze(-1)).nan_to_num(0.0)
    return weights @ value, lse


def make_inputs(dtype, hk=H, seed=3):
    generator = torch.Generator().manual_seed(seed)
    q = torch.randn(B, H, L, E, generator=generator).to(dtype)
    k = torch.randn(B, hk, S, E, generator=generator).to(dtype)
    v = torch.randn(B, hk, S, E, generator=generator).to(dtype)
    return [x.requires_grad_(True) for x in (q, k, v)]


def results_and_gradients(run, inputs, extra):
    """(out, lse, *gradients of inputs and extra) for a loss that reads out and lse."""
    out, lse = run()
    generator = torch.Generator().manual_seed(11)
    d_out = torch.randn(out.shape, generator=generator, dtype=torch.float64)
    d_lse = torch.randn(lse.shape, generator=generator, dtype=torch.float64)
    finite = torch.isfinite(lse)
    loss = (out.double() * d_out).sum() + (torch.where(finite, lse.double(), 0.0) * d_lse).sum()
    gradients = torch.autograd.grad(loss, inputs + extra)
    return [out.detach().double(), lse.detach().double()] + [g.double() for g in gradients]


def max_error(got, want):
    both_inf = torch.isinf(got) & torch.isinf(want) & (got == want)
    return torch.where(both_inf, 0.0, (got - want).abs()).max().item()


@pytest.mark.parametrize("name,score_mod,mask_mod", EXAMPLES, ids=[e[0] for e in EXAMPLES])
@pytest.mark.parametrize("gqa", [False, True], ids=["mha", "gqa"])
def test_documented_examples_match_the_literal_evaluation(name, score_mod, mask_mod, gqa):
    hk = 2 if gqa else H
    block_mask = None
    if mask_mod is not None:
        block_mask = qkv.create_block_mask(mask_mod, None, None, L, S, BLOCK_SIZE=32)
    scale = 0.3
    runs = {}
    for dtype in (torch.float64, torch.float32):
        score, extra = score_mod(dtype) if score_mod is not None else (None, [])
        inputs = make_inputs(dtype, hk)
        runs[dtype] = results_and_gradients(
            lambda: literal(*inputs, score, mask_mod, scale), inputs, extra)
        if dtype == torch.float32:
            runs["qkv"] = results_and_gradients(
                lambda: qkv.flex_attention(*inputs, score_mod=score, block_mask=block_mask,
                                           scale=scale, enable_gqa=gqa, return_lse=True),
                inputs, extra)
    what = ["out", "lse", "dq", "dk", "dv"] + [f"d(learned {n})" for n in range(4)]
    for index, (got, floor_run, want) in enumerate(
            zip(runs["qkv"], runs[torch.float32], runs[torch.float64])):
        magnitude = 1.0 + torch.where(torch.isinf(want), 0.0, want).abs().max().item()
        floor = max_error(floor_run, want)
        error = max_error(got, want)
        assert error <= 2.0 * floor + 1e-6 * magnitude, (
            f"{name} {what[index]}: error {error:.3g}, float32 literal floor {floor:.3g}")


def test_rows_that_see_no_key_get_zero_and_minus_infinity():
    def late_keys(b, h, q_idx, kv_idx):
        return (kv_idx > 100) & (q_idx > 40)
    block_mask = qkv.create_block_mask(late_keys, None, None, L, S, BLOCK_SIZE=16)
    q, k, v = make_inputs(torch.float32)
    out, lse = qkv.flex_attention(q, k, v, block_mask=block_mask, return_lse=True)
    assert (out[:, :, :41] == 0).all() and torch.isneginf(lse[:, :, :41]).all()
    assert torch.isfinite(lse[:, :, 41:]).all()
    out.sum().backward()
    assert torch.isfinite(q.grad).all() and (q.grad[:, :, :41] == 0).all()


def test_block_mask_layout_is_pytorchs():
    block_mask = qkv.create_block_mask(sliding_window_causal, 1, None, L, S, BLOCK_SIZE=(32, 16))
    assert block_mask.shape == (1, 1, L, S)
    assert block_mask.BLOCK_SIZE == (32, 16)
    dense = block_mask.to_dense()
    assert dense.shape == (1, 1, L, S)
    q_blocks, kv_blocks = -(-L // 32), -(-S // 16)
    assert tuple(block_mask.kv_num_blocks.shape) == (1, 1, q_blocks)
    assert tuple(block_mask.kv_indices.shape) == (1, 1, q_blocks, kv_blocks)
    for qb in range(q_blocks):
        rows = dense[0, 0, qb * 32:(qb + 1) * 32]
        partial, full = [], []
        for kb in range(kv_blocks):
            block = rows[:, kb * 16:(kb + 1) * 16]
            if block.all():
                full.append(kb)
            elif block.any():
                partial.append(kb)
        assert block_mask.kv_num_blocks[0, 0, qb] == len(partial)
        assert block_mask.kv_indices[0, 0, qb, :len(partial)].tolist() == partial
        assert block_mask.full_kv_num_blocks[0, 0, qb] == len(full)
        assert block_mask.full_kv_indices[0, 0, qb, :len(full)].tolist() == full
    empty = (block_mask.kv_num_blocks + block_mask.full_kv_num_blocks).sum().item()
    assert block_mask.sparsity() == pytest.approx(100.0 * (1 - empty / (q_blocks * kv_blocks)))


def test_numpy_inputs_and_a_per_head_block_mask():
    def head_stride(b, h, q_idx, kv_idx):
        return (kv_idx + h) % 3 != 0
    block_mask = qkv.create_block_mask(head_stride, None, H, L, S, BLOCK_SIZE=64)
    q, k, v = (x.detach() for x in make_inputs(torch.float64))
    out, lse = qkv.flex_attention(q.numpy(), k.numpy(), v.numpy(), block_mask=block_mask,
                                  return_lse=True)
    want_out, want_lse = literal(q, k, v, None, head_stride, 1.0 / np.sqrt(E))
    assert isinstance(out, np.ndarray)
    assert np.abs(out - want_out.numpy()).max() < 1e-12
    assert np.abs(lse - want_lse.numpy()).max() < 1e-12


def test_what_flex_attention_refuses():
    q, k, v = (x.detach() for x in make_inputs(torch.float32, hk=2))
    with pytest.raises(qkv.Error, match=r"key, value: expected the query's \(or enable_gqa=True\)"
                                        r" 4 heads, got 2"):
        qkv.flex_attention(q, k, v)
    wrong = qkv.create_block_mask(causal_mask, None, None, L, S + 1)
    with pytest.raises(qkv.Error, match=r"block_mask: expected shape \(1 or 2, 1 or 4, 150, 150\)"
                                        r", got \(1, 1, 150, 151\)"):
        qkv.flex_attention(q, k, v, block_mask=wrong, enable_gqa=True)
    with pytest.raises(qkv.Error, match="device: expected 'cpu'"):
        qkv.create_block_mask(causal_mask, None, None, L, S, device="cuda")
    with pytest.raises(qkv.Error, match="query: expected .B, H, N, D. .rank 4."):
        qkv.flex_attention(q[0], k[0], v[0])


def test_native_score_mods_on_numpy_and_their_refusals():
    q, k, v = (x.detach().numpy() for x in make_inputs(torch.float64))
    table = TABLE(torch.float64).detach().numpy()
    mod = qkv.score_mods.compose(qkv.score_mods.relative_bias(table),
                                 qkv.score_mods.soft_cap(20.0))
    out = qkv.flex_attention(q, k, v, score_mod=mod)
    assert isinstance(out, np.ndarray)

    def written_out(score, b, h, q_idx, kv_idx):
        distance = torch.clamp(q_idx - kv_idx, -39, 39) + 39
        return 20.0 * torch.tanh((score + torch.from_numpy(table)[h, distance]) / 20.0)
    want, _ = literal(*(torch.from_numpy(x) for x in (q, k, v)), written_out, None,
                      1.0 / np.sqrt(E))
    assert np.abs(out - want.numpy()).max() < 1e-12
    with pytest.raises(qkv.Error, match=r"score_mod alibi: expected \[4\] \(one per query head\)"
                                        r", got \[3\]"):
        qkv.flex_attention(q, k, v, score_mod=qkv.score_mods.alibi(np.ones(3)))
    with pytest.raises(qkv.Error, match=r"score_mod relative_bias: expected \[4, 2M - 1\] or "
                                        r"\[2M - 1\] \(an odd length\), got \[4, 8\]"):
        qkv.flex_attention(q, k, v, score_mod=qkv.score_mods.relative_bias(np.ones((4, 8))))
    with pytest.raises(qkv.Error, match="soft_cap: expected a finite cap > 0, got 0"):
        qkv.score_mods.soft_cap(0)


def test_mask_combinators_are_pytorchs():
    q_idx, kv_idx = torch.arange(6).view(-1, 1), torch.arange(6).view(1, -1)
    b = h = torch.zeros(1, dtype=torch.long)
    both = qkv.and_masks(causal_mask, prefix_mask)(b, h, q_idx, kv_idx)
    either = qkv.or_masks(causal_mask, prefix_mask)(b, h, q_idx, kv_idx)
    assert torch.equal(both, (q_idx >= kv_idx) & (kv_idx <= PREFIX_LENGTH))
    assert torch.equal(either, (q_idx >= kv_idx) | (kv_idx <= PREFIX_LENGTH))
    assert qkv.and_masks()(b, h, q_idx, kv_idx).all()  # no mask_mod: every pair
    assert not qkv.or_masks()(b, h, q_idx, kv_idx).any()
    with pytest.raises(qkv.Error, match="and_masks: expected mask_mod functions, got int"):
        qkv.and_masks(causal_mask, 3)
