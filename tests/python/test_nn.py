"""qkv.nn.MultiheadAttention against torch.nn.MultiheadAttention: the same state_dict, the same
outputs, weights and gradients (float32, relative error <= 1e-5)."""
import pytest
import torch
import torch.nn.functional as F

import qkv
from layer_literal import expect_layer_equals_literal

torch.set_num_threads(2)
TOLERANCE = 1e-5


def relative(a, b):
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-30)).item()


CASES = [
    dict(name="self"),
    dict(name="self_batch_first", batch_first=True),
    dict(name="cross_kdim_vdim", kdim=5, vdim=7, s=9),
    dict(name="key_padding", key_padding=True),
    dict(name="bool_mask", bool_mask=True, s=8),
    dict(name="float_mask_3d", float_mask=True, s=8, batch_first=True),
    dict(name="float_causal_mask", float_causal=True, key_padding=True),
    dict(name="bias_kv_zero_attn", add_bias_kv=True, add_zero_attn=True, key_padding=True),
    dict(name="per_head_weights", average=False, bool_mask=True),
    dict(name="no_bias", bias=False, s=6),
    dict(name="unbatched", unbatched=True, bool_mask=True),
]


@pytest.mark.parametrize("case", CASES, ids=[c["name"] for c in CASES])
def test_matches_torch(case):
    torch.manual_seed(len(case["name"]))
    e, h, n, l = 8, 2, 3, 5
    s = case.get("s", l)
    kdim, vdim = case.get("kdim", e), case.get("vdim", e)
    config = dict(bias=case.get("bias", True), add_bias_kv=case.get("add_bias_kv", False),
                  add_zero_attn=case.get("add_zero_attn", False), kdim=kdim, vdim=vdim,
                  batch_first=case.get("batch_first", False))
    theirs = torch.nn.MultiheadAttention(e, h, **config)
    ours = qkv.nn.MultiheadAttention(e, h, **config)
    with torch.no_grad():
        for parameter in theirs.parameters():
            parameter.normal_()
    ours.load_state_dict(theirs.state_dict())
    assert list(ours.state_dict()) == list(theirs.state_dict())

    def sequence(length, features):
        if case.get("unbatched"):
            return torch.randn(length, features)
        return torch.randn((n, length, features) if config["batch_first"] else (length, n, features))

    query, key, value = sequence(l, e), sequence(s, kdim), sequence(s, vdim)
    kw = dict(need_weights=True, average_attn_weights=case.get("average", True))
    if case.get("key_padding"):
        padding = torch.rand(n, s) < 0.3
        padding[:, 0] = False
        kw["key_padding_mask"] = padding
    if case.get("bool_mask"):
        mask = torch.rand(l, s) < 0.3
        mask[:, 1] = False
        kw["attn_mask"] = mask
    if case.get("float_mask"):
        kw["attn_mask"] = torch.randn(n * h, l, s)
    if case.get("float_causal"):  # 0 on and below the diagonal, -inf above
        kw["attn_mask"] = torch.nn.Transformer.generate_square_subsequent_mask(l)
    results = []
    for module in (theirs, ours):
        inputs = [x.clone().requires_grad_() for x in (query, key, value)]
        out, weights = module(*inputs, **kw)
        dout = torch.randn(out.shape, generator=torch.Generator().manual_seed(3))
        out.backward(dout)
        grads = {name: p.grad.clone() for name, p in module.named_parameters()}
        results.append((out, weights, [x.grad for x in inputs], grads))
    (out_t, w_t, in_t, p_t), (out_q, w_q, in_q, p_q) = results
    assert relative(out_q, out_t) <= TOLERANCE
    assert w_q.shape == w_t.shape and relative(w_q, w_t) <= TOLERANCE
    for a, b in zip(in_q, in_t):
        assert relative(a, b) <= TOLERANCE
    assert sorted(p_q) == sorted(p_t)
    for name in p_t:
        assert relative(p_q[name], p_t[name]) <= TOLERANCE, name


@pytest.mark.parametrize("score", ["bilinear", "additive", "cosine"])
def test_scores_pytorch_lacks_train(score):
    """The extra scores learn: gradients reach their parameters and a few Adam steps on a copy
    task lower the loss."""
    torch.manual_seed(0)
    layer = qkv.nn.MultiheadAttention(16, 2, score=score, batch_first=True)
    names = [name for name, _ in layer.named_parameters()]
    assert any(name.startswith("score_") for name in names)
    x = torch.randn(4, 6, 16)
    optimizer = torch.optim.Adam(layer.parameters(), lr=1e-2)
    losses = []
    for _ in range(30):
        optimizer.zero_grad()
        out, _ = layer(x, x, x, need_weights=False)
        loss = ((out - x) ** 2).mean()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in layer.parameters())
    assert losses[-1] < 0.7 * losses[0]


def test_cosine_layer_equals_literal_pytorch():
    """score="cosine" learns one temperature per head, starting at 10 (the C++ unit's list), and
    computes softmax(τ_h·q·k/(|q||k|))·V between torch's projections: output and gradients
    against the same steps written in float64 PyTorch."""
    torch.manual_seed(4)
    layer = qkv.nn.MultiheadAttention(12, 3, score="cosine", batch_first=True)
    assert layer.score_temperature.shape == (3,)
    assert torch.equal(layer.score_temperature.detach(), torch.full((3,), 10.0))
    with torch.no_grad():
        layer.score_temperature.copy_(torch.tensor([0.5, 4.0, 12.0]))
    causal = torch.ones(5, 5, dtype=torch.bool).triu(1)

    def attend(q, k, v, params):
        scores = params["score_temperature"].view(1, 3, 1, 1) * (
            F.normalize(q, dim=-1) @ F.normalize(k, dim=-1).transpose(-1, -2))
        return scores.masked_fill(causal, float("-inf")).softmax(-1) @ v

    expect_layer_equals_literal(layer, torch.randn(2, 5, 12), attend, is_causal=True)


@pytest.mark.parametrize("mask_kind", ["causal", "other", "float"])
def test_attn_mask_with_is_causal_is_one_rule(mask_kind):
    """attn_mask together with is_causal=True is refused by the layer as by
    qkv.scaled_dot_product_attention (PyTorch's rule there), whatever the mask."""
    layer = qkv.nn.MultiheadAttention(8, 2, batch_first=True)
    x = torch.randn(1, 4, 8)
    mask = {"causal": torch.ones(4, 4, dtype=torch.bool).triu(1),
            "other": torch.zeros(4, 4, dtype=torch.bool),
            "float": torch.zeros(4, 4)}[mask_kind]
    message = "attn_mask, is_causal: expected at most one of them"
    with pytest.raises(qkv.Error, match=message):
        layer(x, x, x, attn_mask=mask, is_causal=True)
    q = x.view(1, 4, 2, 4).transpose(1, 2)
    sdpa_mask = mask if mask_kind != "causal" else ~mask
    with pytest.raises(qkv.Error, match=message):
        qkv.scaled_dot_product_attention(q, q, q, attn_mask=sdpa_mask, is_causal=True)


def test_sinks_layer_equals_literal_pytorch():
    """sinks=True learns one sink per head (gpt-oss), starting at 0; the layer equals the softmax
    over the scores with each head's sink column concatenated (then dropped), gradients too."""
    torch.manual_seed(6)
    layer = qkv.nn.MultiheadAttention(8, 2, batch_first=True, sinks=True)
    assert torch.equal(layer.sinks.detach(), torch.zeros(2))
    assert qkv.nn.MultiheadAttention(8, 2).sinks is None
    with torch.no_grad():
        layer.sinks.copy_(torch.tensor([1.5, -0.5]))

    def attend(q, k, v, params):
        scores = q @ k.transpose(-1, -2) / 2.0
        column = params["sinks"].view(1, 2, 1, 1).expand(3, 2, 6, 1)
        return torch.cat([scores, column], -1).softmax(-1)[..., :-1] @ v

    expect_layer_equals_literal(layer, torch.randn(3, 6, 8), attend)


def test_layer_scores_are_the_units():
    """Every score qkv has is accepted, with the parameters the C++ unit lists; others are not."""
    for score in qkv._qkv.score_names():
        layer = qkv.nn.MultiheadAttention(8, 2, score=score, additive_dim=3)
        declared, _ = qkv._qkv.score_layer(score, 2, 4, 3)
        own = sorted(name for name, _ in layer.named_parameters() if name.startswith("score_"))
        assert own == sorted(name for name, _, _, _, _ in declared)
        for name, _, shape, _, _ in declared:
            assert tuple(getattr(layer, name).shape) == shape
    with pytest.raises(qkv.Error, match="score: expected one of dot, scaled_dot"):
        qkv.nn.MultiheadAttention(8, 2, score="sigmoid")


def test_fully_masked_query_gives_bias_not_nan():
    torch.manual_seed(2)
    theirs = torch.nn.MultiheadAttention(8, 2)
    ours = qkv.nn.MultiheadAttention(8, 2)
    with torch.no_grad():
        theirs.out_proj.bias.normal_()
    ours.load_state_dict(theirs.state_dict())
    x = torch.randn(4, 2, 8)
    padding = torch.zeros(2, 4, dtype=torch.bool)
    padding[1] = True  # batch 1 has no key at all
    out_t, _ = theirs(x, x, x, key_padding_mask=padding)
    out_q, w_q = ours(x, x, x, key_padding_mask=padding)
    assert torch.isnan(out_t[:, 1]).all()
    assert torch.equal(out_q[:, 1], ours.out_proj.bias.expand(4, 8))
    assert (w_q[1] == 0).all()
    assert relative(out_q[:, 0], out_t[:, 0]) <= TOLERANCE


def test_a_float_mask_of_zeros_and_minus_inf_is_read_as_a_boolean_mask(masks_passed):
    # nn.Transformer's causal mask, a row with no key, and a window: the kernels get a boolean
    # mask (read as runs of keys) and no bias, with the bias path's results; a float mask with
    # other values, or one that requires grad, stays a bias.
    torch.manual_seed(4)
    layer = qkv.nn.MultiheadAttention(8, 2, batch_first=True)
    x = torch.randn(3, 6, 8)
    causal = torch.nn.Transformer.generate_square_subsequent_mask(6)
    causal[2] = float("-inf")
    causal[5, :2] = float("-inf")
    seen = masks_passed
    out_float, w_float = layer(x, x, x, attn_mask=causal)
    mask, bias = seen[-1]
    assert bias is None and mask.dtype == torch.bool
    assert torch.equal(mask.reshape(6, 6), causal == 0)
    out_bool, w_bool = layer(x, x, x, attn_mask=causal != 0)
    assert torch.equal(out_float, out_bool) and torch.equal(w_float, w_bool)
    assert torch.equal(out_float[:, 2], layer.out_proj.bias.expand(3, 8))
    for other in (causal.clamp(min=-1e9), causal.clone().requires_grad_()):
        layer(x, x, x, attn_mask=other)
        mask, bias = seen[-1]
        assert mask is None and bias is not None


@pytest.mark.parametrize("batch_first", [True, False])
def test_self_attention_projects_once_with_torchs_values_and_gradients(batch_first):
    """layer(x, x, x) projects with the stacked in_proj_weight in one product (q, k and v strided
    views of it): outputs and every gradient as PyTorch's layer gives them, and as the three
    separate projections give them when key and value are other tensors of the same values."""
    torch.manual_seed(5)
    theirs = torch.nn.MultiheadAttention(16, 4, batch_first=batch_first)
    ours = qkv.nn.MultiheadAttention(16, 4, batch_first=batch_first)
    with torch.no_grad():
        theirs.in_proj_bias.normal_()
    ours.load_state_dict(theirs.state_dict())
    x = torch.randn(3, 7, 16, requires_grad=True)
    mask = torch.ones(7, 7, dtype=torch.bool).triu(1) if batch_first else None
    results = []
    for layer, key, value in ((theirs, x, x), (ours, x, x), (ours, x.clone(), x.clone())):
        layer.zero_grad()
        x.grad = None
        out, _ = layer(x, key, value, attn_mask=mask, need_weights=False)
        out.square().sum().backward()
        results.append([out.detach(), x.grad.clone(), layer.in_proj_weight.grad.clone(),
                        layer.in_proj_bias.grad.clone(), layer.out_proj.weight.grad.clone()])
    for theirs_value, self_value, separate_value in zip(*results):
        assert relative(self_value, theirs_value) <= TOLERANCE
        assert relative(self_value, separate_value) <= TOLERANCE
