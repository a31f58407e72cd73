"""qkv refuses what PyTorch refuses, with one qkv.Error naming the argument, the expected and the
given — never a silent reinterpretation and never an error from deep inside.

The layer is checked against torch.nn.MultiheadAttention itself (torch 1.13 is installed): every
call below is refused by both, or accepted by both with the same numbers. PyTorch's own SDPA
arrived in 2.0; its checks are written from its documentation and behaviour."""
import math
import warnings

import numpy as np
import pytest

torch = pytest.importorskip("torch")
import qkv  # noqa: E402

E, H = 4, 2


def test_error_is_value_error_and_runtime_error():
    assert issubclass(qkv.Error, ValueError) and issubclass(qkv.Error, RuntimeError)
    with pytest.raises(RuntimeError, match="is_causal"):  # as PyTorch users catch it
        q = torch.randn(1, 2, 3, 4)
        qkv.scaled_dot_product_attention(q, q, q, attn_mask=torch.ones(3, 3, dtype=torch.bool),
                                         is_causal=True)


def layers(**config):
    torch.manual_seed(0)
    theirs = torch.nn.MultiheadAttention(E, H, **config)
    ours = qkv.nn.MultiheadAttention(E, H, **config)
    ours.load_state_dict(theirs.state_dict())
    return theirs, ours


x = torch.randn(2, 1, E)  # [L = 2, N = 1, E]
REFUSED = {
    # The issue's own examples: masks with 4 elements that PyTorch does not reinterpret.
    "attn_mask [1, 4]": (dict(attn_mask=torch.zeros(1, 4)), "attn_mask"),
    "attn_mask [4, 1]": (dict(attn_mask=torch.zeros(4, 1)), "attn_mask"),
    "attn_mask [2, 1, 4]": (dict(attn_mask=torch.zeros(2, 1, 4)), "attn_mask"),
    "attn_mask [3, 3]": (dict(attn_mask=torch.zeros(3, 3)), "attn_mask"),
    "attn_mask [1, 2, 2]": (dict(attn_mask=torch.zeros(1, 2, 2)), "attn_mask"),
    "attn_mask 4-D": (dict(attn_mask=torch.zeros(1, 1, 2, 2)), "attn_mask"),
    "attn_mask int64": (dict(attn_mask=torch.zeros(2, 2, dtype=torch.int64)), "attn_mask"),
    "key_padding_mask [2]": (dict(key_padding_mask=torch.zeros(2, dtype=torch.bool)),
                             "key_padding_mask"),
    "key_padding_mask [1, 3]": (dict(key_padding_mask=torch.zeros(1, 3, dtype=torch.bool)),
                                "key_padding_mask"),
    "key_padding_mask int32": (dict(key_padding_mask=torch.zeros(1, 2, dtype=torch.int32)),
                               "key_padding_mask"),
    "query of 3 features": (dict(query=torch.randn(2, 1, 3)), "query"),
    "query 4-D": (dict(query=torch.randn(2, 1, 1, E)), "query"),
    "key 2-D, query 3-D": (dict(key=torch.randn(2, E)), "key"),
    "key, value of other lengths": (dict(value=torch.randn(3, 1, E)), "value"),
    "key of another batch": (dict(key=torch.randn(2, 2, E), value=torch.randn(2, 2, E)), "key"),
    "value of other features": (dict(value=torch.randn(2, 1, E + 1)), "value"),
    "float64 query": (dict(query=x.double(), key=x.double(), value=x.double()), "query"),
}


@pytest.mark.parametrize("case", REFUSED)
def test_layer_refuses_what_torch_refuses(case):
    changes, argument = REFUSED[case]
    arguments = dict(query=x, key=x, value=x)
    arguments.update(changes)
    theirs, ours = layers()
    with pytest.raises(Exception):
        theirs(**arguments)
    with pytest.raises(qkv.Error, match=argument) as refusal:
        ours(**arguments)
    assert "expected" in str(refusal.value) and "got" in str(refusal.value)


ACCEPTED = {
    "attn_mask [L, S]": dict(attn_mask=torch.randn(2, 2)),
    "attn_mask [N·H, L, S] bool": dict(attn_mask=torch.tensor([[[True, False], [False, False]]] * 2)),
    "uint8 attn_mask": dict(attn_mask=torch.tensor([[0, 1], [0, 0]], dtype=torch.uint8)),
    "float key_padding_mask": dict(key_padding_mask=torch.tensor([[0.0, -1.5]])),
    "unbatched, attn_mask [H, L, S]": dict(query=x[:, 0], key=x[:, 0], value=x[:, 0],
                                           attn_mask=torch.randn(H, 2, 2)),
}


@pytest.mark.parametrize("case", ACCEPTED)
def test_layer_accepts_what_torch_accepts(case):
    arguments = dict(query=x, key=x, value=x)
    arguments.update(ACCEPTED[case])
    theirs, ours = layers()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # PyTorch warns on uint8 masks; so does qkv
        want, want_weights = theirs(**arguments)
        got, got_weights = ours(**arguments)
    assert torch.allclose(got, want, rtol=1e-5, atol=1e-6)
    assert torch.allclose(got_weights, want_weights, rtol=1e-5, atol=1e-6)


q4 = torch.randn(1, 4, 3, 8)
k2 = torch.randn(1, 2, 5, 8)
SDPA_REFUSED = {
    "1-D query": (dict(query=torch.randn(8)), "query"),
    "dtypes differ": (dict(key=torch.randn(1, 4, 5, 8, dtype=torch.float64)), "query, key, value"),
    "E differs": (dict(key=torch.randn(1, 4, 5, 7)), "key"),
    "S differs": (dict(value=torch.randn(1, 4, 6, 8)), "value"),
    "batch differs": (dict(key=torch.randn(2, 4, 5, 8), value=torch.randn(2, 4, 5, 8)), "key"),
    "heads without enable_gqa": (dict(key=k2, value=k2), "enable_gqa"),
    "heads not a divisor": (dict(key=torch.randn(1, 3, 5, 8), value=torch.randn(1, 3, 5, 8),
                                 enable_gqa=True), "heads"),
    "mask with is_causal": (dict(attn_mask=torch.ones(3, 5, dtype=torch.bool), is_causal=True),
                            "is_causal"),
    "mask int64": (dict(attn_mask=torch.ones(3, 5, dtype=torch.int64)), "attn_mask"),
    "mask not broadcastable": (dict(attn_mask=torch.ones(5, 3, dtype=torch.bool)), "attn_mask"),
    "mask of too many heads": (dict(attn_mask=torch.ones(1, 8, 3, 5)), "attn_mask"),
    "dropout_p 1.5": (dict(dropout_p=1.5), "dropout_p"),
}


@pytest.mark.parametrize("case", SDPA_REFUSED)
def test_sdpa_refuses_with_the_argument_named(case):
    changes, argument = SDPA_REFUSED[case]
    arguments = dict(query=q4, key=torch.randn(1, 4, 5, 8), value=torch.randn(1, 4, 5, 8))
    arguments.update(changes)
    with pytest.raises(qkv.Error, match=argument) as refusal:
        qkv.scaled_dot_product_attention(**arguments)
    assert "expected" in str(refusal.value) and "got" in str(refusal.value)


def test_sdpa_folds_a_mask_over_several_batch_dimensions():
    """query [2, 3, H, L, E] with a mask [2, 1, 1, L, S]: each (a, b) gets mask a."""
    g = torch.Generator().manual_seed(5)
    q = torch.randn(2, 3, 2, 4, 8, generator=g)
    k = torch.randn(2, 3, 2, 6, 8, generator=g)
    v = torch.randn(2, 3, 2, 6, 8, generator=g)
    mask = torch.rand(2, 1, 1, 4, 6, generator=g) > 0.3
    mask[..., 0] = True
    got = qkv.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    s = (q.double() @ k.double().transpose(-1, -2)) / math.sqrt(8)
    want = torch.softmax(s.masked_fill(~mask, float("-inf")), -1) @ v.double()
    assert (got.double() - want).abs().max() < 1e-5
    numpy_got = qkv.scaled_dot_product_attention(q.numpy(), k.numpy(), v.numpy(),
                                                 attn_mask=mask.numpy())
    assert np.abs(numpy_got - want.numpy()).max() < 1e-5
