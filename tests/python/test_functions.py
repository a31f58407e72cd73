"""qkv.attention, scaled_dot_product_attention and flash_attn_* against the NumPy float64 contract
and PyTorch 1.13; gradients by torch.autograd.gradcheck in float64; errors."""
import math

import numpy as np
import pytest
import torch

import qkv
from contract import attention as contract

torch.set_num_threads(2)


def rng_arrays(seed, *shapes, dtype=np.float32):
    rng = np.random.default_rng(seed)
    return [rng.standard_normal(shape).astype(dtype) for shape in shapes]


CASES = [
    dict(name="scaled_dot", b=2, nq=9, nk=13, hq=4, hk=2, d=8, dv=8),
    dict(name="causal_gqa", b=1, nq=20, nk=33, hq=4, hk=1, d=16, dv=12, causal=True),
    dict(name="topleft_window", b=2, nq=17, nk=17, hq=2, hk=2, d=8, dv=8, causal=True,
         causal_align="top-left", window=(4, 0)),
    dict(name="bilinear_perhead", b=1, nq=7, nk=11, hq=2, hk=2, d=6, dk=9, dv=5,
         score="bilinear"),
    dict(name="additive_bias_softcap", b=2, nq=6, nk=10, hq=2, hk=1, d=4, dk=5, dv=3,
         score="additive", bias=True, softcap=3.0),
    dict(name="alibi_mask_lengths", b=3, nq=8, nk=12, hq=2, hk=2, d=8, dv=8, alibi=True,
         mask=True, key_lengths=True),
    dict(name="prefix_lm", b=2, nq=11, nk=11, hq=2, hk=1, d=8, dv=8, causal=True,
         prefix_length=4),
    dict(name="cosine_temperature_gqa", b=2, nq=9, nk=12, hq=4, hk=2, d=8, dv=6, score="cosine",
         causal=True),
    dict(name="sinks_gqa_empty_rows", b=3, nq=8, nk=12, hq=4, hk=2, d=8, dv=8, sinks=True,
         mask=True, key_lengths=True, causal=True),
    dict(name="sinks_additive_window", b=1, nq=9, nk=9, hq=2, hk=1, d=4, dk=5, dv=3,
         score="additive", sinks=True, window=(2, 1)),
    dict(name="sink_tokens_window_causal", b=2, nq=12, nk=12, hq=2, hk=2, d=8, dv=8, causal=True,
         window=(3, 0), sink_tokens=2),
    dict(name="sigmoid_gqa_mask", b=2, nq=7, nk=10, hq=4, hk=2, d=8, dv=6, mask=True,
         normalization="sigmoid"),
]


def inputs(case, dtype=np.float32):
    b, nq, nk, hq, hk, d, dv = (case[x] for x in ("b", "nq", "nk", "hq", "hk", "d", "dv"))
    dk = case.get("dk", d)
    rng = np.random.default_rng(len(case["name"]))
    q, k, v = (rng.standard_normal(s).astype(dtype) for s in
               ((b, nq, hq, d), (b, nk, hk, dk), (b, nk, hk, dv)))
    kw = {}
    score = case.get("score", "scaled_dot")
    kw["score"] = score
    if score == "bilinear":
        kw["w"] = rng.standard_normal((hq, d, dk)).astype(dtype)
    if score == "cosine":
        kw["temperature"] = (2.0 + rng.random(hq) * 4.0).astype(dtype)
    if score == "additive":
        kw["wq"] = rng.standard_normal((hq, 5, d)).astype(dtype)
        kw["wk"] = rng.standard_normal((5, dk)).astype(dtype)
        kw["va"] = rng.standard_normal((hq, 5)).astype(dtype)
    if case.get("bias"):
        kw["bias"] = rng.standard_normal((nq, nk)).astype(dtype)
    if case.get("softcap"):
        kw["softcap"] = case["softcap"]
    if case.get("alibi"):
        kw["alibi_slopes"] = (2.0 ** -np.arange(1, hq + 1)).astype(np.float32)
    if case.get("mask"):
        kw["mask"] = rng.random((hq, nq, nk)) < 0.7
        kw["mask"][0, 1, :] = False  # a row that sees nothing
    if case.get("sinks"):  # a large one (the sink takes most of the weight) and small ones
        kw["sinks"] = np.linspace(-2.0, 4.0, hq).astype(dtype)
    if case.get("key_lengths"):
        kw["key_lengths"] = np.array([nk, 0, nk // 2][:b], dtype=np.int64)
    for option in ("causal", "causal_align", "window", "prefix_length", "sink_tokens",
                   "normalization"):
        if option in case:
            kw[option] = case[option]
    return q, k, v, kw


def to_contract(kw):
    out = dict(kw)
    if "alibi_slopes" in out:
        out["alibi"] = out.pop("alibi_slopes")
    return out


@pytest.mark.parametrize("case", CASES, ids=[c["name"] for c in CASES])
@pytest.mark.parametrize("kind", ["numpy", "torch"])
def test_attention_matches_contract(case, kind):
    q, k, v, kw = inputs(case)
    want_o, want_lse, want_p = contract(q, k, v, **to_contract(kw))
    args = (q, k, v)
    call_kw = dict(kw)
    if kind == "torch":
        args = tuple(torch.from_numpy(x) for x in args)
        call_kw = {n: torch.from_numpy(x) if isinstance(x, np.ndarray) else x for n, x in kw.items()}
    o, lse, p = qkv.attention(*args, **call_kw, return_lse=True, return_weights=True)
    assert type(o) is type(args[0]) and type(lse) is type(args[0]) and type(p) is type(args[0])
    o, lse, p = (np.asarray(x) for x in (o, lse, p))
    assert o.dtype == np.float32 and o.shape == want_o.shape
    tolerance = 1e-5 * (1 + np.abs(want_o).max())
    assert np.abs(o - want_o).max() <= tolerance
    assert np.abs(p - want_p).max() <= 1e-5
    finite = np.isfinite(want_lse)
    assert np.array_equal(np.isfinite(lse), finite)
    assert np.abs(lse[finite] - want_lse[finite]).max() <= 1e-5 * (1 + np.abs(want_lse[finite]).max())
    assert not np.isnan(o).any()


@pytest.mark.parametrize("case", CASES, ids=[c["name"] for c in CASES])
def test_attention_gradcheck_float64(case):
    small = dict(case, b=min(case["b"], 2), nq=min(case["nq"], 5), nk=min(case["nk"], 6))
    q, k, v, kw = inputs(small, dtype=np.float64)
    tensors = {"q": q, "k": k, "v": v}
    for name in ("w", "wq", "wk", "va", "temperature", "sinks", "bias"):
        if name in kw:
            tensors[name] = kw.pop(name)
    if "alibi_slopes" in kw:
        kw["alibi_slopes"] = torch.from_numpy(kw["alibi_slopes"].astype(np.float64))
    for name in ("mask", "key_lengths"):
        if name in kw:
            kw[name] = torch.from_numpy(kw[name])
    names = list(tensors)
    leaves = [torch.from_numpy(tensors[n]).requires_grad_() for n in names]

    def function(*args):
        named = dict(zip(names, args))
        q_, k_, v_ = named.pop("q"), named.pop("k"), named.pop("v")
        o, lse = qkv.attention(q_, k_, v_, **named, **kw, return_lse=True)
        return o, torch.where(torch.isfinite(lse), lse, torch.zeros_like(lse))

    assert torch.autograd.gradcheck(function, leaves, eps=1e-6, atol=1e-6, rtol=1e-5)


def test_bfloat16_torch_in_and_out():
    q, k, v = rng_arrays(3, (2, 30, 4, 16), (2, 40, 2, 16), (2, 40, 2, 16))
    tq, tk, tv = (torch.from_numpy(x).to(torch.bfloat16).requires_grad_() for x in (q, k, v))
    o = qkv.attention(tq, tk, tv, causal=True)
    assert o.dtype == torch.bfloat16
    want, _, _ = contract(*(x.detach().float().numpy() for x in (tq, tk, tv)), causal=True)
    assert np.abs(o.float().detach().numpy() - want).max() <= 1e-2 * (1 + np.abs(want).max())
    o.float().sum().backward()
    assert tq.grad.dtype == torch.bfloat16 and torch.isfinite(tq.grad.float()).all()


def private_sdpa(q, k, v, attn_mask=None, is_causal=False):
    """Debian's PyTorch 1.13 has only the private function (no scale, no GQA)."""
    out, _ = torch.nn.functional._scaled_dot_product_attention(q, k, v, attn_mask, 0.0, False, is_causal)
    return out


@pytest.mark.parametrize("variant", ["plain", "causal", "bool_mask", "float_mask",
                                     "zero_minus_inf_mask", "rank3"])
def test_sdpa_matches_pytorch(variant):
    torch.manual_seed(0)
    shape_q, shape_k = (2, 4, 11, 8), (2, 4, 13, 8)
    if variant == "rank3":
        shape_q, shape_k = shape_q[1:], shape_k[1:]
    q = torch.randn(shape_q, requires_grad=True)
    k = torch.randn(shape_k, requires_grad=True)
    v = torch.randn(shape_k[:-1] + (6,), requires_grad=True)
    kw = {}
    if variant == "causal":
        kw["is_causal"] = True
    if variant == "bool_mask":
        kw["attn_mask"] = torch.rand(11, 13) < 0.7
        kw["attn_mask"][:, 0] = True
    if variant == "float_mask":
        kw["attn_mask"] = torch.randn(2, 1, 11, 13)
    if variant == "zero_minus_inf_mask":  # a band of keys per row, in floats: read as boolean
        rows, keys = torch.arange(11).unsqueeze(1), torch.arange(13)
        band = (keys >= rows - 3) & (keys <= rows + 2)
        kw["attn_mask"] = torch.zeros(11, 13).masked_fill(~band, float("-inf"))
    want = private_sdpa(q, k, v, **kw)
    got = qkv.scaled_dot_product_attention(q, k, v, **kw)
    assert got.shape == want.shape
    assert (got - want).abs().max() <= 1e-5 * (1 + want.abs().max())
    dout = torch.randn_like(want)
    grads_want = torch.autograd.grad(want, (q, k, v), dout)
    grads_got = torch.autograd.grad(got, (q, k, v), dout)
    for a, b in zip(grads_got, grads_want):
        assert (a - b).abs().max() <= 1e-5 * (1 + b.abs().max())


def test_sdpa_reads_a_float_mask_of_zeros_and_minus_inf_as_boolean(masks_passed):
    seen = masks_passed
    q = torch.randn(1, 2, 6, 4)
    causal = torch.nn.Transformer.generate_square_subsequent_mask(6)
    got = qkv.scaled_dot_product_attention(q, q, q, attn_mask=causal)
    mask, bias = seen[-1]
    assert bias is None and torch.equal(mask, causal == 0)
    assert torch.equal(got, qkv.scaled_dot_product_attention(q, q, q, attn_mask=causal == 0))
    qkv.scaled_dot_product_attention(q, q, q, attn_mask=causal.clamp(min=-1e9))
    mask, bias = seen[-1]
    assert mask is None and bias is not None


def test_sdpa_gqa_scale_and_empty_rows():
    torch.manual_seed(1)
    q = torch.randn(1, 4, 5, 8, dtype=torch.float64)
    k = torch.randn(1, 2, 7, 8, dtype=torch.float64)
    v = torch.randn(1, 2, 7, 3, dtype=torch.float64)
    mask = torch.ones(5, 7, dtype=torch.bool)
    mask[2] = False  # query 2 may attend to nothing: PyTorch gives NaN, qkv 0
    got = qkv.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=0.3, enable_gqa=True)
    want = private_sdpa(q * (0.3 * math.sqrt(8)), k.repeat_interleave(2, 1), v.repeat_interleave(2, 1),
                        attn_mask=mask)
    assert torch.isnan(want[:, :, 2]).all()
    assert (got[:, :, 2] == 0).all()
    rows = [0, 1, 3, 4]
    assert (got[:, :, rows] - want[:, :, rows]).abs().max() <= 1e-12
    with pytest.raises(ValueError, match="enable_gqa"):
        qkv.scaled_dot_product_attention(q, k, v)
    with pytest.raises(ValueError, match="attn_mask, is_causal"):
        qkv.scaled_dot_product_attention(q, q, q, attn_mask=mask[:, :5], is_causal=True)


@pytest.mark.parametrize("variant", ["plain", "causal_window", "alibi_softcap"])
def test_flash_attn_func_matches_contract(variant):
    q, k, v = rng_arrays(7, (2, 9, 4, 16), (2, 14, 2, 16), (2, 14, 2, 16))
    kw, want_kw = {}, {"scale": 0.25}
    if variant == "causal_window":
        kw.update(causal=True, window_size=(5, 0))
        want_kw.update(causal=True, window=(5, 0))
    if variant == "alibi_softcap":
        slopes = np.array([0.5, 0.25, 0.125, 0.0625], dtype=np.float32)
        kw.update(alibi_slopes=torch.from_numpy(slopes), softcap=2.0)
        want_kw.update(alibi=slopes, softcap=2.0)
    tq, tk, tv = (torch.from_numpy(x) for x in (q, k, v))
    out, lse, probs = qkv.flash_attn_func(tq, tk, tv, softmax_scale=0.25, return_attn_probs=True, **kw)
    want_o, want_lse, want_p = contract(q, k, v, score="dot", **want_kw)
    assert np.abs(out.numpy() - want_o).max() <= 1e-5 * (1 + np.abs(want_o).max())
    assert np.abs(lse.numpy() - want_lse).max() <= 1e-5 * (1 + np.abs(want_lse).max())
    assert np.abs(probs.numpy() - want_p).max() <= 1e-5


def test_flash_attn_varlen_equals_per_sequence():
    rng = np.random.default_rng(9)
    lengths_q, lengths_k = [3, 0, 7, 5], [4, 2, 7, 9]
    cu_q = torch.tensor(np.concatenate([[0], np.cumsum(lengths_q)]), dtype=torch.int32)
    cu_k = torch.tensor(np.concatenate([[0], np.cumsum(lengths_k)]), dtype=torch.int32)
    q = torch.from_numpy(rng.standard_normal((sum(lengths_q), 2, 8)).astype(np.float32)).requires_grad_()
    k = torch.from_numpy(rng.standard_normal((sum(lengths_k), 2, 8)).astype(np.float32)).requires_grad_()
    v = torch.from_numpy(rng.standard_normal((sum(lengths_k), 2, 8)).astype(np.float32)).requires_grad_()
    out, lse, _ = qkv.flash_attn_varlen_func(q, k, v, cu_q, cu_k, 7, 9, causal=True,
                                             return_attn_probs=True)
    assert out.shape == q.shape and lse.shape == (2, q.shape[0])
    for i in range(4):
        qs, ks = slice(int(cu_q[i]), int(cu_q[i + 1])), slice(int(cu_k[i]), int(cu_k[i + 1]))
        want = qkv.flash_attn_func(q[qs][None], k[ks][None], v[ks][None], causal=True)[0]
        # (the decoding kernel may take a short sequence alone: equal to rounding)
        assert torch.allclose(out[qs], want, rtol=0, atol=1e-6)
    out.sum().backward()
    assert q.grad.shape == q.shape and torch.isfinite(k.grad).all()
    with pytest.raises(ValueError, match="cu_seqlens_q"):
        qkv.flash_attn_varlen_func(q, k, v, cu_q + 1, cu_k, 7, 9)


def test_errors_are_python_exceptions():
    q, k, v = rng_arrays(1, (1, 4, 2, 8), (1, 5, 2, 7), (1, 5, 2, 8))
    with pytest.raises(ValueError, match="k: expected"):
        qkv.attention(q, k, v)
    with pytest.raises(TypeError, match="float16"):  # a dtype qkv does not read
        qkv.attention(q.astype(np.int16), q.astype(np.int16), q.astype(np.int16))
    with pytest.raises(ValueError, match="rank 4"):
        qkv.attention(q[0], q[0], q[0])
    with pytest.raises(TypeError, match="mix"):
        qkv.attention(q, torch.from_numpy(q), q)
    with pytest.raises(qkv.Error, match="score: expected one of dot, scaled_dot, bilinear, additive, cosine, got .sine."):
        qkv.attention(q, q, q, score="sine")


def test_gradcheck_sdpa_flash_and_dropout_float64():
    torch.manual_seed(5)
    q = torch.randn(1, 2, 4, 3, dtype=torch.float64, requires_grad=True)
    k = torch.randn(1, 2, 5, 3, dtype=torch.float64, requires_grad=True)
    v = torch.randn(1, 2, 5, 2, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(4, 5, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(
        lambda q_, k_, v_, b_: qkv.scaled_dot_product_attention(q_, k_, v_, attn_mask=b_),
        (q, k, v, bias), eps=1e-6, atol=1e-6)
    assert torch.autograd.gradcheck(
        lambda q_, k_, v_: qkv.scaled_dot_product_attention(q_, k_, v_, is_causal=True),
        (q, k, v), eps=1e-6, atol=1e-6)
    fq, fk, fv = (x.transpose(1, 2).detach().clone().requires_grad_() for x in (q, k, v))
    slopes = torch.tensor([0.5, 0.25], dtype=torch.float64)
    assert torch.autograd.gradcheck(
        lambda q_, k_, v_: qkv.flash_attn_func(q_, k_, v_, causal=True, softcap=1.5,
                                               alibi_slopes=slopes, return_attn_probs=True)[:2],
        (fq, fk, fv), eps=1e-6, atol=1e-6)
    # Dropout: the seed fixes the mask, so the function is deterministic and differentiable.
    assert torch.autograd.gradcheck(
        lambda q_, k_, v_: qkv.attention(q_, k_, v_, dropout_p=0.4, dropout_seed=11),
        (fq, fk, fv), eps=1e-6, atol=1e-6)
    once = qkv.attention(fq, fk, fv, dropout_p=0.4, dropout_seed=11)
    again = qkv.attention(fq, fk, fv, dropout_p=0.4, dropout_seed=11)
    other = qkv.attention(fq, fk, fv, dropout_p=0.4, dropout_seed=12)
    assert torch.equal(once, again) and not torch.equal(once, other)
