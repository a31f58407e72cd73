"""Second derivatives through qkv: a backward through qkv's gradients (create_graph=True: a gradient
penalty, gradgradcheck) is computed, not dropped. gradgradcheck (float64: the analytical second
derivative against finite differences of qkv's fused first derivatives) for every function and
the options that change the formula — scores, soft cap, ALiBi, biases, sinks, sigmoid, masks,
dropout, LSE as an output, GQA, block masks and score_mods — and the gradient-penalty loop through
the layer against PyTorch's layer. First derivatives taken with create_graph=True are the same as
without, and PyTorch's."""
import math

import pytest

torch = pytest.importorskip("torch")
import qkv  # noqa: E402
from qkv import score_mods  # noqa: E402

torch.set_num_threads(2)


def randn(*shape, seed, grad=True, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    return (scale * torch.randn(*shape, generator=g, dtype=torch.float64)).requires_grad_(grad)


def qkv_inputs(seed=0, b=1, nq=5, nk=6, hq=2, hk=2, d=4, dv=3):
    """q [B, Nq, Hq, D], k [B, Nk, Hk, D], v [B, Nk, Hk, Dv] (qkv's and FlashAttention's layout)."""
    return (randn(b, nq, hq, d, seed=seed), randn(b, nk, hk, d, seed=seed + 1),
            randn(b, nk, hk, dv, seed=seed + 2))


def bhnd_inputs(seed=0, b=1, h=2, nq=5, nk=6, d=4, dv=3, hk=None):
    """query [B, H, L, E], key and value [B, Hk, S, E] (PyTorch's layout)."""
    hk = h if hk is None else hk
    return (randn(b, h, nq, d, seed=seed), randn(b, hk, nk, d, seed=seed + 1),
            randn(b, hk, nk, dv, seed=seed + 2))


def expect_second_derivative(function, inputs):
    assert torch.autograd.gradcheck(function, inputs)
    assert torch.autograd.gradgradcheck(function, inputs)


def test_first_derivatives_with_create_graph_are_unchanged():
    q, k, v = bhnd_inputs()
    out = qkv.scaled_dot_product_attention(q, k, v, is_causal=True)
    with_graph = torch.autograd.grad(out.sum(), (q, k, v), create_graph=True)
    plain = torch.autograd.grad(qkv.scaled_dot_product_attention(q, k, v, is_causal=True).sum(),
                                (q, k, v))
    masked = torch.ones(5, 6, dtype=torch.bool).tril()
    scores = (q @ k.transpose(-1, -2) / 2).masked_fill(~masked, -math.inf)
    reference = torch.autograd.grad((scores.softmax(-1) @ v).sum(), (q, k, v))
    for a, b, c in zip(with_graph, plain, reference):
        assert a.requires_grad
        assert torch.equal(a.detach(), b)
        torch.testing.assert_close(b, c, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("score,extra", [
    ("dot", {}),
    ("scaled_dot", {"causal": True}),
    ("bilinear", {"w": (2, 4, 4)}),
    ("additive", {"wq": (3, 4), "wk": (2, 3, 4), "va": (3,)}),
    ("cosine", {"temperature": (2,)}),
])
def test_every_score(score, extra):
    q, k, v = qkv_inputs()
    parameters = {name: randn(*shape, seed=10 + n) for n, (name, shape) in
                  enumerate((n, s) for n, s in extra.items() if isinstance(s, tuple))}
    flags = {n: s for n, s in extra.items() if not isinstance(s, tuple)}
    names = list(parameters)

    def function(q, k, v, *tensors):
        return qkv.attention(q, k, v, score=score, **dict(zip(names, tensors)), **flags)

    expect_second_derivative(function, (q, k, v, *parameters.values()))


def test_soft_cap_alibi_bias_window_and_key_lengths():
    q, k, v = qkv_inputs(1, b=2)
    bias = randn(2, 1, 5, 6, seed=20)
    slopes = torch.tensor([0.5, 0.25], dtype=torch.float64)

    def function(q, k, v, bias):
        return qkv.attention(q, k, v, softcap=2.0, alibi_slopes=slopes, bias=bias, window=(2, 1),
                             key_lengths=torch.tensor([6, 4]))

    expect_second_derivative(function, (q, k, v, bias))


def test_sinks_with_grouped_query_heads_and_an_empty_row():
    q, k, v = qkv_inputs(2, hq=4, hk=2)
    sinks = randn(4, seed=21)
    mask = torch.ones(1, 1, 5, 6, dtype=torch.bool)
    mask[..., 3, :] = False  # a row that sees no key: LSE is its sink

    def function(q, k, v, sinks):
        return qkv.attention(q, k, v, sinks=sinks, mask=mask, return_lse=True)

    expect_second_derivative(function, (q, k, v, sinks))


def test_lse_as_an_output_with_rows_that_see_nothing():
    q, k, v = qkv_inputs(3)

    def function(q, k, v):
        out, lse = qkv.attention(q, k, v, causal=True, key_lengths=torch.tensor([2]),
                                 window=(0, -1), return_lse=True)
        return out, torch.where(torch.isfinite(lse), lse, torch.zeros_like(lse))

    expect_second_derivative(function, (q, k, v))


def test_sigmoid_attention():
    q, k, v = qkv_inputs(4)

    def function(q, k, v):
        return qkv.attention(q, k, v, normalization="sigmoid", causal=True, return_lse=True)

    expect_second_derivative(function, (q, k, v))


def test_dropout_uses_the_same_mask_as_the_first_derivative():
    q, k, v = qkv_inputs(5)

    def function(q, k, v):
        return qkv.attention(q, k, v, dropout_p=0.3, dropout_seed=7)

    expect_second_derivative(function, (q, k, v))


@pytest.mark.parametrize("mask_kind", ["float", "bool", "causal", "gqa"])
def test_scaled_dot_product_attention(mask_kind):
    q, k, v = bhnd_inputs(6, hk=1 if mask_kind == "gqa" else None)
    bool_mask = torch.rand(5, 6, generator=torch.Generator().manual_seed(3)) > 0.3
    float_mask = randn(2, 5, 6, seed=22)

    def function(q, k, v, *mask):
        if mask_kind == "float":
            return qkv.scaled_dot_product_attention(q, k, v, attn_mask=mask[0])
        if mask_kind == "bool":
            return qkv.scaled_dot_product_attention(q, k, v, attn_mask=bool_mask)
        if mask_kind == "causal":
            return qkv.scaled_dot_product_attention(q, k, v, is_causal=True, scale=0.3)
        return qkv.scaled_dot_product_attention(q, k, v, enable_gqa=True)

    extra = (float_mask,) if mask_kind == "float" else ()
    expect_second_derivative(function, (q, k, v, *extra))


def test_flash_attn_func_and_its_varlen_form():
    q, k, v = qkv_inputs(7, nq=6, d=4, dv=4)
    slopes = torch.tensor([0.3, 0.1], dtype=torch.float64)

    def padded(q, k, v):
        return qkv.flash_attn_func(q, k, v, causal=True, window_size=(3, 0), softcap=1.5,
                                   alibi_slopes=slopes)

    expect_second_derivative(padded, (q, k, v))
    cu = torch.tensor([0, 2, 6], dtype=torch.int32)

    def varlen(q, k, v):
        return qkv.flash_attn_varlen_func(q, k, v, cu, cu, 4, 4, causal=True)

    expect_second_derivative(varlen, (q[0], k[0], v[0]))


def test_flex_attention_with_a_block_mask_and_score_mods():
    q, k, v = bhnd_inputs(8, nq=6, nk=6)
    block_mask = qkv.create_block_mask(lambda b, h, i, j: (j <= i) | (j < 2), None, None, 6, 6,
                                       BLOCK_SIZE=2)
    slopes, table = randn(2, seed=23), randn(2, 5, seed=24)
    native = score_mods.compose(score_mods.alibi(slopes), score_mods.relative_bias(table),
                                score_mods.soft_cap(3.0))

    def natively(q, k, v, slopes, table):
        mod = score_mods.compose(score_mods.alibi(slopes), score_mods.relative_bias(table),
                                 score_mods.soft_cap(3.0))
        return qkv.flex_attention(q, k, v, score_mod=mod, block_mask=block_mask)

    assert natively(q, k, v, slopes, table).shape == (1, 2, 6, 3) and native is not None
    expect_second_derivative(natively, (q, k, v, slopes, table))
    weights = randn(2, seed=25)

    def in_python(q, k, v, weights):  # a general score_mod: the scores come in as a bias
        return qkv.flex_attention(
            q, k, v, score_mod=lambda s, b, h, i, j: s * torch.sigmoid(weights[h]) + (i - j) / 4,
            block_mask=block_mask)

    expect_second_derivative(in_python, (q, k, v, weights))


def penalty(module, x, **call):
    """A gradient penalty (WGAN-GP style): ‖∂(Σ y²)/∂x‖² through the layer."""
    y = module(x, x, x, need_weights=False, **call)[0]
    grad_x, = torch.autograd.grad(y.pow(2).sum(), x, create_graph=True)
    return grad_x.pow(2).sum()


@pytest.mark.parametrize("call", [{}, {"is_causal": True}])
def test_the_gradient_penalty_loop_matches_pytorch(call):
    """Three steps of a training loop whose loss is a gradient penalty, with PyTorch's layer and
    with qkv's from the same weights: the same penalties and parameter gradients each step."""
    torch.manual_seed(0)
    reference = torch.nn.MultiheadAttention(8, 2, batch_first=True, dtype=torch.float64)
    layer = qkv.nn.MultiheadAttention(8, 2, batch_first=True, dtype=torch.float64)
    layer.load_state_dict(reference.state_dict())
    optimizers = [torch.optim.SGD(m.parameters(), lr=0.01) for m in (reference, layer)]
    x = torch.randn(2, 5, 8, dtype=torch.float64, requires_grad=True)
    torch_call = dict(call)
    if call.get("is_causal"):  # PyTorch 1.13's layer takes the causal mask itself
        torch_call = {"attn_mask": torch.ones(5, 5, dtype=torch.bool).triu(1)}
    for _ in range(3):
        values = []
        for module, optimizer, kwargs in ((reference, optimizers[0], torch_call),
                                          (layer, optimizers[1], call)):
            optimizer.zero_grad()
            value = penalty(module, x, **kwargs)
            value.backward()
            values.append(value.detach())
        torch.testing.assert_close(values[1], values[0], rtol=1e-10, atol=0)
        for (name, p), q in zip(reference.named_parameters(), layer.parameters()):
            assert p.grad.norm() > 0, name
            torch.testing.assert_close(q.grad, p.grad, rtol=1e-9, atol=1e-12, msg=name)
        for optimizer in optimizers:
            optimizer.step()


def test_the_layer_passes_gradgradcheck():
    torch.manual_seed(2)
    layer = qkv.nn.MultiheadAttention(6, 2, batch_first=True, dtype=torch.float64)
    key_padding_mask = torch.tensor([[False, False, False, True]])

    def function(x):
        return layer(x, x, x, key_padding_mask=key_padding_mask, need_weights=False)[0]

    expect_second_derivative(function, (randn(1, 4, 6, seed=30),))


def test_the_differential_layer():
    torch.manual_seed(1)
    layer = qkv.nn.DifferentialAttention(16, 2, depth=1).double()
    expect_second_derivative(lambda x: layer(x), (randn(1, 5, 16, seed=31),))
