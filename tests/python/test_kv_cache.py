"""qkv.flash_attn_with_kvcache against FlashAttention's documented behaviour, written out in float64
torch as FlashAttention's own test writes its reference: the new keys rotated at cache_seqlens + t
and written at those slots (the caches compared byte for byte: nothing else changes), queries
rotated at cache_seqlens (+ i with causal or a window), keys [leftpad, seqlens + new) of each
sequence, the last query aligned with the last key; contiguous (with cache_batch_idx) and paged
caches, GQA, windows, soft caps, ALiBi, LSE; and the refusals."""
import math

import numpy as np
import pytest

torch = pytest.importorskip("torch")
import contract  # noqa: E402  (tests/cli, on the path through conftest.py)
import qkv  # noqa: E402

torch.set_num_threads(2)


def rotary_tables(positions, half):
    angles = torch.arange(positions, dtype=torch.float64)[:, None] * torch.pow(
        100.0, -torch.arange(half, dtype=torch.float64) / half)
    return torch.cos(angles).float(), torch.sin(angles).float()


def rotate(x, cos, sin, positions, interleaved):
    """x [..., D] at positions (same leading shape but D): the first 2·half dims turned."""
    half = cos.shape[1]
    c, s = cos.double()[positions], sin.double()[positions]
    x = x.clone()
    if interleaved:
        a, b = x[..., 0:2 * half:2].clone(), x[..., 1:2 * half:2].clone()
        x[..., 0:2 * half:2], x[..., 1:2 * half:2] = a * c - b * s, a * s + b * c
    else:
        a, b = x[..., :half].clone(), x[..., half:2 * half].clone()
        x[..., :half], x[..., half:2 * half] = a * c - b * s, a * s + b * c
    return x


def each_sequence_alone(q, k_rows, v_rows, lengths, leftpad, **options):
    """O and LSE of each sequence over its own keys, slots [leftpad, length) of k_rows[b] and
    v_rows[b] ([capacity, Hk, D] in slot order): the NumPy contract (tests/cli/contract.py)."""
    outs, lses = [], []
    for b in range(q.shape[0]):
        keys = k_rows[b][leftpad[b]:lengths[b]].numpy()[None]
        values = v_rows[b][leftpad[b]:lengths[b]].numpy()[None]
        out, lse, _ = contract.attention(q[b:b + 1].numpy(), keys, values, score="dot", **options)
        outs.append(torch.from_numpy(out[0]))
        lses.append(torch.from_numpy(lse[0]))
    return torch.stack(outs), torch.stack(lses)


@pytest.mark.parametrize("paged,page_size", [(False, 0), (True, 1), (True, 16), (True, 5)])
@pytest.mark.parametrize("rotary,interleaved", [(0, True), (4, True), (8, False)])
def test_against_flash_attention_semantics(paged, page_size, rotary, interleaved):
    g = torch.Generator().manual_seed(page_size + rotary)
    batch, hq, hk, d, capacity, new = 3, 4, 2, 16, 48, 2
    seqlens = torch.tensor([0, 16, 46], dtype=torch.int32)  # empty; a page boundary; full after
    leftpad = torch.tensor([0, 3, 0], dtype=torch.int32) if not paged else None
    q = torch.randn(batch, new, hq, d, generator=g)
    k_new, v_new = (torch.randn(batch, new, hk, d, generator=g) for _ in range(2))
    if paged:
        per_sequence = -(-capacity // page_size)
        pages = batch * per_sequence + 2
        k_cache, v_cache = (torch.randn(pages, page_size, hk, d, generator=g) for _ in range(2))
        table = torch.randperm(pages, generator=g)[:batch * per_sequence].reshape(batch, -1)
        table = table.to(torch.int32)

        def rows(cache):  # each sequence's slots in order
            return [cache[table[b].long()].reshape(-1, hk, d)[:capacity] for b in range(batch)]
        batch_idx = None
    else:
        k_cache, v_cache = (torch.randn(batch + 2, capacity, hk, d, generator=g) for _ in range(2))
        batch_idx = torch.tensor([4, 0, 2], dtype=torch.int32)
        table = None

        def rows(cache):
            return [cache[int(batch_idx[b])] for b in range(batch)]
    cos, sin = rotary_tables(capacity + 1, rotary) if rotary else (None, None)
    before_k, before_v = k_cache.clone(), v_cache.clone()
    slopes = torch.tensor([0.1, 0.2, 0.05, 0.3])
    out, lse = qkv.flash_attn_with_kvcache(
        q, k_cache, v_cache, k_new, v_new, rotary_cos=cos, rotary_sin=sin, cache_seqlens=seqlens,
        cache_batch_idx=batch_idx, cache_leftpad=leftpad, block_table=table, causal=True,
        window_size=(20, 0), softcap=8.0, rotary_interleaved=interleaved, alibi_slopes=slopes,
        return_softmax_lse=True)

    # The caches: the old ones with the new rows (keys rotated) at slots seqlens + t.
    expected_k, expected_v = rows(before_k), rows(before_v)
    expected_k = [r.clone() for r in expected_k]
    expected_v = [r.clone() for r in expected_v]
    for b in range(batch):
        slots = torch.arange(int(seqlens[b]), int(seqlens[b]) + new)
        key = k_new[b].double()
        if rotary:
            key = rotate(key, cos, sin, slots[:, None].expand(new, hk), interleaved)
        expected_k[b][slots] = key.float()
        expected_v[b][slots] = v_new[b]
    for got, want in ((rows(k_cache), expected_k), (rows(v_cache), expected_v)):
        for b in range(batch):
            assert torch.equal(got[b], want[b]), b
    touched = torch.zeros(k_cache.shape[:2], dtype=torch.bool)
    for b in range(batch):
        for t in range(new):
            slot = int(seqlens[b]) + t
            if paged:
                touched[int(table[b, slot // page_size]), slot % page_size] = True
            else:
                touched[int(batch_idx[b]), slot] = True
    assert torch.equal(k_cache[~touched], before_k[~touched])
    assert torch.equal(v_cache[~touched], before_v[~touched])

    # The attention.
    queries = q.double()
    if rotary:
        positions = seqlens.long()[:, None, None] + torch.arange(new)[None, :, None]
        queries = rotate(queries, cos, sin, positions.expand(batch, new, hq), interleaved)
    ends = [int(seqlens[b]) + new for b in range(batch)]
    starts = [0] * batch if leftpad is None else [int(x) for x in leftpad]
    want_out, want_lse = each_sequence_alone(queries, [r.double() for r in rows(k_cache)],
                                             [r.double() for r in rows(v_cache)], ends, starts,
                                             scale=1 / math.sqrt(d), causal=True, window=(20, 0),
                                             softcap=8.0, alibi=slopes.double().numpy())
    torch.testing.assert_close(out.double(), want_out, rtol=0, atol=2e-5)
    torch.testing.assert_close(lse.double(), want_lse, rtol=0, atol=2e-5)
    assert out.dtype == torch.float32 and lse.dtype == torch.float32


def test_an_int_seqlens_and_no_new_keys_read_the_cache_as_it_is():
    g = torch.Generator().manual_seed(3)
    q = torch.randn(2, 1, 2, 8, generator=g)
    k_cache, v_cache = (torch.randn(2, 10, 2, 8, generator=g) for _ in range(2))
    before = k_cache.clone()
    out = qkv.flash_attn_with_kvcache(q, k_cache, v_cache, cache_seqlens=6)
    want = qkv.flash_attn_func(q, k_cache[:, :6], v_cache[:, :6])
    torch.testing.assert_close(out, want, rtol=0, atol=1e-6)
    assert torch.equal(k_cache, before)
    whole = qkv.flash_attn_with_kvcache(q.numpy(), k_cache.numpy(), v_cache.numpy())
    np.testing.assert_allclose(whole, qkv.flash_attn_func(q, k_cache, v_cache).numpy(), atol=1e-6)


def test_bfloat16_caches_append_rounded():
    g = torch.Generator().manual_seed(4)
    q = torch.randn(1, 1, 2, 8, generator=g).bfloat16()
    k_cache, v_cache = (torch.randn(1, 9, 2, 8, generator=g).bfloat16() for _ in range(2))
    k, v = (torch.randn(1, 1, 2, 8, generator=g) for _ in range(2))
    out = qkv.flash_attn_with_kvcache(q, k_cache, v_cache, k.bfloat16(), v.bfloat16(),
                                      cache_seqlens=torch.tensor([4]))
    assert torch.equal(k_cache[0, 4], k.bfloat16()[0, 0]) and out.dtype == torch.bfloat16
    want = qkv.flash_attn_func(q.float(), k_cache[:, :5].float(), v_cache[:, :5].float())
    torch.testing.assert_close(out.float(), want, rtol=0, atol=2e-2)


def quantized(rows):
    """rows [..., D] as the contract quantizes them into an int8 cache: the scale max|x| / 127
    rounded to float32, round(x / scale) ties to even."""
    scale = (rows.double().abs().amax(dim=-1) / 127).float()
    values = torch.where(scale[..., None] > 0, rows.double() / scale.double()[..., None],
                         torch.zeros_like(rows.double()))
    return torch.round(values).clamp(-127, 127).to(torch.int8), scale


@pytest.mark.parametrize("paged", [False, True])
@pytest.mark.parametrize("q_dtype", [torch.float32, torch.float16])
def test_int8_caches_quantize_in_place_and_attend_to_what_they_hold(paged, q_dtype):
    g = torch.Generator().manual_seed(6 + paged)
    batch, hq, hk, d, capacity, new, page = 2, 4, 1, 16, 32, 3, 8
    seqlens = torch.tensor([5, 16], dtype=torch.int32)  # 16 + 3: past a page boundary
    q = torch.randn(batch, new, hq, d, generator=g).to(q_dtype)
    k_new, v_new = (torch.randn(batch, new, hk, d, generator=g).to(q_dtype) for _ in range(2))
    rows = (batch * capacity // page + 1, page) if paged else (batch, capacity)
    k_cache, v_cache = (torch.randint(-127, 128, rows + (hk, d), generator=g, dtype=torch.int8)
                        for _ in range(2))
    k_scale, v_scale = (torch.rand(rows + (hk,), generator=g) / 127 for _ in range(2))
    table = (torch.randperm(rows[0], generator=g)[:batch * capacity // page]
             .reshape(batch, -1).to(torch.int32) if paged else None)
    cos, sin = rotary_tables(capacity, 4)
    before = [t.clone() for t in (k_cache, v_cache, k_scale, v_scale)]
    out, lse = qkv.flash_attn_with_kvcache(
        q, k_cache, v_cache, k_new, v_new, rotary_cos=cos, rotary_sin=sin, cache_seqlens=seqlens,
        block_table=table, causal=True, return_softmax_lse=True, k_cache_scale=k_scale,
        v_cache_scale=v_scale)
    assert out.dtype == q_dtype

    def slot_rows(cache):  # [B, capacity, ...] in slot order
        if not paged:
            return cache
        return torch.stack([cache[table[b].long()].flatten(0, 1) for b in range(batch)])
    # The appended rows, quantized as the contract says; every other byte as it was.
    expected = [slot_rows(t).clone() for t in before]
    for b in range(batch):
        slots = torch.arange(int(seqlens[b]), int(seqlens[b]) + new)
        keys = rotate(k_new[b].double(), cos, sin, slots[:, None].expand(new, hk), True)
        for (values, scales), rows_in in zip(((expected[0], expected[2]),
                                              (expected[1], expected[3])),
                                             (keys, v_new[b].double())):
            values[b][slots], scales[b][slots] = quantized(rows_in)
            assert (rows_in - values[b][slots].double() * scales[b][slots].double()[..., None]
                    ).abs().le(scales[b][slots].double()[..., None] / 2 * (1 + 1e-6)).all()
    for got, want in zip((k_cache, v_cache, k_scale, v_scale), expected):
        assert torch.equal(slot_rows(got), want)
    if paged:  # pages nobody owns
        unused = sorted(set(range(rows[0])) - set(table.flatten().tolist()))
        for got, was in zip((k_cache, v_cache, k_scale, v_scale), before):
            assert torch.equal(got[unused], was[unused])

    # The attention over the dequantized cache, within the float32 rule, of the queries the
    # kernels compare: rotated, rounded to q's dtype
    queries = rotate(q.double(), cos, sin,
                     (seqlens.long()[:, None, None] + torch.arange(new)[None, :, None])
                     .expand(batch, new, hq), True)
    if q_dtype == torch.float16:  # the kernels read rotated float16 queries rounded
        queries = queries.half().double()
    # and each row rounded to int8 as the cache's rows are (the contract, int8 caches).
    values, scales = quantized(queries.float())
    queries = values.double() * scales.double()[..., None]
    dequantized = [(slot_rows(c).float() * slot_rows(s)[..., None]).double()
                   for c, s in ((k_cache, k_scale), (v_cache, v_scale))]
    ends = [int(n) + new for n in seqlens]
    want_out, want_lse = each_sequence_alone(queries, *dequantized, ends, [0] * batch,
                                             scale=1 / math.sqrt(d), causal=True)
    # float16: O is rounded to 11 significant bits, half a unit in the last place of the largest.
    atol = 2e-5 + (want_out.abs().max().item() * 2**-11 if q_dtype == torch.float16 else 0)
    torch.testing.assert_close(out.double(), want_out, rtol=0, atol=atol)
    torch.testing.assert_close(lse.double(), want_lse, rtol=0, atol=2e-5)


def test_refusals_leave_the_cache_untouched():
    q = torch.randn(2, 1, 2, 8)
    k_cache, v_cache = torch.randn(2, 4, 2, 8), torch.randn(2, 4, 2, 8)
    k, v = torch.randn(2, 1, 2, 8), torch.randn(2, 1, 2, 8)
    before = k_cache.clone()
    with pytest.raises(qkv.Error, match="k: expected the new keys to fit the cache: sequence 1 "
                                        "holds 4 of 4 slots, 1 more do not fit"):
        qkv.flash_attn_with_kvcache(q, k_cache, v_cache, k, v,
                                    cache_seqlens=torch.tensor([1, 4], dtype=torch.int32))
    pages = torch.randn(3, 2, 2, 8)
    with pytest.raises(qkv.Error, match=r"block_table: expected page numbers in \[0, 2\], got 3"):
        qkv.flash_attn_with_kvcache(q, pages, pages.clone(), k, v, cache_seqlens=1,
                                    block_table=torch.tensor([[0, 1], [2, 3]]))
    with pytest.raises(qkv.Error, match="k, v: expected new keys and values together"):
        qkv.flash_attn_with_kvcache(q, k_cache, v_cache, k, None, cache_seqlens=0)
    with pytest.raises(qkv.Error, match="cache_seqlens: expected an int or"):
        qkv.flash_attn_with_kvcache(q, k_cache, v_cache, cache_seqlens=1.5)
    assert torch.equal(k_cache, before)


def test_key_starts_hide_left_padding_with_the_diagonal_at_the_end():
    """qkv.attention(key_starts=...) equals each batch element alone over its keys [start, Nk)."""
    g = torch.Generator().manual_seed(5)
    q = torch.randn(2, 3, 2, 8, generator=g)
    k, v = (torch.randn(2, 9, 2, 8, generator=g) for _ in range(2))
    starts = torch.tensor([4, 0])
    out = qkv.attention(q, k, v, causal=True, key_starts=starts)
    for b in range(2):
        alone = qkv.attention(q[b:b + 1], k[b:b + 1, int(starts[b]):], v[b:b + 1, int(starts[b]):],
                              causal=True)
        torch.testing.assert_close(out[b:b + 1], alone, rtol=0, atol=1e-6)


@pytest.mark.parametrize("page_size", [1, 7, 16])
def test_varlen_prefill_against_a_paged_cache(page_size):
    """flash_attn_varlen_func(block_table=..., seqused_k=...): each sequence's queries against the
    keys in its pages, the same as flash_attn_func on those keys gathered."""
    g = torch.Generator().manual_seed(page_size)
    hq, hk, d, capacity = 4, 2, 8, 40
    q_lengths, used = [3, 5, 1], [20, 33, 0]  # keys: 20, 40 and 9 in cu_seqlens_k
    per_sequence = -(-capacity // page_size)
    pages = 3 * per_sequence + 1
    k_cache, v_cache = (torch.randn(pages, page_size, hk, d, generator=g) for _ in range(2))
    table = torch.randperm(pages, generator=g)[:3 * per_sequence].reshape(3, -1).int()
    q = torch.randn(sum(q_lengths), hq, d, generator=g)
    cu_q = torch.tensor([0, 3, 8, 9], dtype=torch.int32)
    cu_k = torch.tensor([0, 20, 60, 69], dtype=torch.int32)
    out = qkv.flash_attn_varlen_func(q, k_cache, v_cache, cu_q, cu_k, 5, 40, causal=True,
                                     block_table=table,
                                     seqused_k=torch.tensor(used, dtype=torch.int32))
    for i in range(3):
        keys = k_cache[table[i].long()].reshape(-1, hk, d)[:used[i]]
        values = v_cache[table[i].long()].reshape(-1, hk, d)[:used[i]]
        want = qkv.flash_attn_func(q[cu_q[i]:cu_q[i + 1]][None], keys[None], values[None],
                                   causal=True)[0]
        torch.testing.assert_close(out[cu_q[i]:cu_q[i + 1]], want, rtol=0, atol=2e-6)
    assert torch.equal(out[8:], torch.zeros_like(out[8:]))  # a sequence with no key used
    with pytest.raises(qkv.Error, match="block_table: expected neither dropout nor"):
        qkv.flash_attn_varlen_func(q, k_cache, v_cache, cu_q, cu_k, 5, 40, block_table=table,
                                   return_attn_probs=True)
    with pytest.raises(qkv.Error, match="seqused_k: expected"):
        qkv.flash_attn_varlen_func(q, k_cache, v_cache, cu_q, cu_k, 5, 40, block_table=table,
                                   seqused_k=torch.tensor([21, 0, 0]))
