"""qkv as a PyTorch operator: torch.ops.qkv.attention is what the functions and layers call, so
torch.jit.trace records it with its inputs (a new input gives the new output, and a saved trace
loads and runs), torch.fx sees one node per function call and one call_module per layer, and
meta tensors give shapes and dtypes without computing."""
import io

import numpy as np

import pytest

torch = pytest.importorskip("torch")
import torch.fx  # noqa: E402

import qkv  # noqa: E402

torch.set_num_threads(2)


CAUSAL = qkv.create_block_mask(lambda b, h, i, j: j <= i, None, None, 5, 5, BLOCK_SIZE=2)


def bhnd(seed, shape=(2, 2, 5, 4)):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def test_the_operator_is_registered_with_its_schema():
    schema = str(torch.ops.qkv.attention.default._schema)
    assert schema.startswith("qkv::attention(Tensor q, Tensor k, Tensor v, Tensor? w")
    assert "Tensor[] score_parameters, str config" in schema


def test_trace_records_the_operator_instead_of_a_constant():
    def function(q, k, v):
        return qkv.scaled_dot_product_attention(q, k, v, is_causal=True)

    with torch.no_grad():
        traced = torch.jit.trace(function, (bhnd(0), bhnd(1), bhnd(2)), check_trace=False)
    assert "qkv::attention" in str(traced.graph)
    fresh = (bhnd(3), bhnd(4), bhnd(5))
    assert torch.equal(traced(*fresh), function(*fresh))


def operators_called(function):
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as profile:
        result = function()
    return result, {event.key for event in profile.key_averages()}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_inference_goes_straight_to_the_core_with_the_operators_results(dtype):
    # What nothing differentiates or records skips the dispatcher (a short sequence's attention
    # costs about as much as the two hops); what autograd needs goes through the operator.
    q, k, v = (bhnd(seed).to(dtype) for seed in range(3))
    mask = torch.ones(5, 5, dtype=torch.bool).tril()
    bias = torch.randn(5, 5)

    def call():
        out, lse = qkv.attention(*(x.transpose(1, 2) for x in (q, k, v)), bias=bias, causal=True,
                                 return_lse=True)
        return qkv.scaled_dot_product_attention(q, k, v, attn_mask=mask), out, lse

    with torch.no_grad():
        direct, names = operators_called(call)
    assert "qkv::attention" not in names
    q.requires_grad_(True)
    through_operator, names = operators_called(call)
    assert "qkv::attention" in names
    for a, b in zip(direct, through_operator):
        assert a.dtype == b.dtype and a.shape == b.shape
        assert torch.equal(a, b.detach())


def test_a_traced_layer_saves_loads_and_differentiates():
    torch.manual_seed(0)
    layer = qkv.nn.MultiheadAttention(8, 2, batch_first=True)
    x = torch.randn(2, 5, 8)

    class SelfAttention(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.layer = layer

        def forward(self, x):
            return self.layer(x, x, x, need_weights=False)[0]

    traced = torch.jit.trace(SelfAttention(), (x,))
    buffer = io.BytesIO()
    torch.jit.save(traced, buffer)
    buffer.seek(0)
    loaded = torch.jit.load(buffer)
    assert "qkv::attention" in str(loaded.inlined_graph)
    fresh = torch.randn(2, 5, 8, requires_grad=True)  # a trace keeps the traced shapes
    expected = layer(fresh, fresh, fresh, need_weights=False)[0]
    got = loaded(fresh)
    assert torch.equal(got, expected)
    grad, = torch.autograd.grad(got.sum(), fresh)
    want, = torch.autograd.grad(expected.sum(), fresh)
    assert torch.equal(grad, want)


@pytest.mark.parametrize("name,call", [
    ("scaled_dot_product_attention",
     lambda q, k, v: qkv.scaled_dot_product_attention(q, k, v, is_causal=True)),
    ("attention", lambda q, k, v: qkv.attention(q, k, v, score="cosine", window=(2, 0))),
    ("flash_attn_func", lambda q, k, v: qkv.flash_attn_func(q, k, v, causal=True, softcap=5.0)),
    ("flex_attention", lambda q, k, v: qkv.flex_attention(
        q, k, v, score_mod=qkv.score_mods.soft_cap(4.0), block_mask=CAUSAL)),
])
def test_fx_sees_one_node_per_call(name, call):
    class Model(torch.nn.Module):
        def forward(self, q, k, v):
            return call(q * 2, k, v) + 1

    graph_module = torch.fx.symbolic_trace(Model())
    calls = [n for n in graph_module.graph.nodes if n.op == "call_function" and
             n.target is not qkv.score_mods.ScoreMod]  # a score_mod is built by its own node
    targets = [getattr(n.target, "__name__", str(n.target)) for n in calls]
    assert targets.count(name) == 1, targets
    assert len(calls) == 3  # the product, qkv's function and the sum
    q, k, v = bhnd(6), bhnd(7), bhnd(8)
    assert torch.equal(graph_module(q, k, v), Model()(q, k, v))


@pytest.mark.parametrize("layer_type", ["MultiheadAttention", "DifferentialAttention"])
def test_fx_sees_a_layer_as_one_module_call(layer_type):
    torch.manual_seed(1)

    class Model(torch.nn.Module):
        def __init__(self):
            super().__init__()
            if layer_type == "MultiheadAttention":
                self.attention = qkv.nn.MultiheadAttention(8, 2, batch_first=True)
            else:
                self.attention = qkv.nn.DifferentialAttention(8, 2, depth=1)
            self.norm = torch.nn.LayerNorm(8)

        def forward(self, x):
            h = self.norm(x)
            if layer_type == "MultiheadAttention":
                return x + self.attention(h, h, h, need_weights=False)[0]
            return x + self.attention(h)

    model = Model()
    graph_module = torch.fx.symbolic_trace(model)
    modules = [n.target for n in graph_module.graph.nodes if n.op == "call_module"]
    assert modules == ["norm", "attention"]
    x = torch.randn(2, 6, 8)
    assert torch.equal(graph_module(x), model(x))


def test_fx_says_why_the_layer_cannot_be_the_root():
    with pytest.raises(qkv.Error, match="a model that contains the MultiheadAttention"):
        torch.fx.symbolic_trace(qkv.nn.MultiheadAttention(8, 2))


def test_meta_tensors_give_shapes_and_dtypes():
    q = torch.empty(2, 3, 5, 8, device="meta")
    k = torch.empty(2, 1, 7, 8, device="meta")
    v = torch.empty(2, 1, 7, 6, device="meta")
    out = qkv.scaled_dot_product_attention(q, k, v, enable_gqa=True)
    assert out.device.type == "meta" and out.shape == (2, 3, 5, 6)
    float_mask = torch.empty(5, 7, device="meta")  # no values to read as a boolean mask
    out = qkv.scaled_dot_product_attention(q, k, v, attn_mask=float_mask, enable_gqa=True)
    assert out.device.type == "meta" and out.shape == (2, 3, 5, 6)
    out, lse, probabilities = qkv.flash_attn_func(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), causal=True,
        return_attn_probs=True)
    assert (out.shape, lse.shape, probabilities.shape) == ((2, 5, 3, 6), (2, 3, 5), (2, 3, 5, 7))
    assert lse.dtype == torch.float32 and out.device.type == "meta"
    bf16 = qkv.attention(q.transpose(1, 2).bfloat16(), k.transpose(1, 2).bfloat16(),
                         v.transpose(1, 2).bfloat16(), return_lse=True)
    assert bf16[0].dtype == torch.bfloat16 and bf16[1].dtype == torch.float32


def test_a_layer_on_the_meta_device_runs_forward_and_backward():
    layer = qkv.nn.MultiheadAttention(16, 4, batch_first=True, device="meta")
    x = torch.empty(3, 10, 16, device="meta", requires_grad=True)
    out, weights = layer(x, x, x, attn_mask=torch.zeros(10, 10, dtype=torch.bool, device="meta"))
    assert out.device.type == "meta" and out.shape == (3, 10, 16)
    assert weights.shape == (3, 10, 10)
    out.sum().backward()
    assert layer.in_proj_weight.grad.shape == (48, 16)
    assert x.grad.device.type == "meta"


def test_fx_keeps_a_score_mod_built_from_parameters_in_the_graph():
    class Model(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.slopes = torch.nn.Parameter(torch.tensor([0.5, 0.25]))

        def forward(self, q, k, v):
            mod = qkv.score_mods.compose(qkv.score_mods.alibi(self.slopes),
                                         qkv.score_mods.soft_cap(3.0))
            return qkv.flex_attention(q, k, v, score_mod=mod, block_mask=CAUSAL)

    model = Model()
    graph_module = torch.fx.symbolic_trace(model)
    q, k, v = bhnd(9), bhnd(10), bhnd(11)
    assert torch.equal(graph_module(q, k, v), model(q, k, v))
    with torch.no_grad():
        graph_module.slopes.mul_(2)  # the graph reads the parameter, not a copy of it
    assert torch.equal(graph_module(q, k, v), model(q, k, v))


def test_numpy_scalars_as_options():
    q = bhnd(12)
    want = qkv.scaled_dot_product_attention(q, q, q, scale=0.25)
    assert torch.equal(qkv.scaled_dot_product_attention(q, q, q, scale=np.float32(0.25)), want)
