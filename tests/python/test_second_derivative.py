"""No silently wrong second derivative: qkv computes first derivatives only, and a backward through
them (create_graph=True followed by a gradient penalty, gradgradcheck) raises qkv.Error instead of
treating them as constants — for the functions and the layers, also when the output's gradient is
a constant (nothing but q, k, v ties the first derivatives to the graph). First derivatives taken
with create_graph=True are the same as without, and PyTorch's."""
import pytest

torch = pytest.importorskip("torch")
import qkv  # noqa: E402

SECOND = "attention: expected first derivatives only, got a second derivative"


def inputs(seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(1, 2, 6, 4, generator=g, dtype=dtype, requires_grad=True)
            for _ in range(3)]


def test_first_derivatives_with_create_graph_are_unchanged():
    q, k, v = inputs()
    out = qkv.scaled_dot_product_attention(q, k, v, is_causal=True)
    with_graph = torch.autograd.grad(out.sum(), (q, k, v), create_graph=True)
    plain = torch.autograd.grad(qkv.scaled_dot_product_attention(q, k, v, is_causal=True).sum(),
                                (q, k, v))
    reference = torch.autograd.grad(torch.nn.functional.scaled_dot_product_attention(
        q, k, v, is_causal=True).sum(), (q, k, v)) if hasattr(
            torch.nn.functional, "scaled_dot_product_attention") else plain
    for a, b, c in zip(with_graph, plain, reference):
        assert a.requires_grad
        assert torch.equal(a.detach(), b)
        torch.testing.assert_close(b, c, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("function", [
    lambda q, k, v: qkv.scaled_dot_product_attention(q, k, v),
    lambda q, k, v: qkv.attention(q, k, v, causal=True),
    lambda q, k, v: qkv.flash_attn_func(q, k, v, causal=True),
    lambda q, k, v: qkv.flex_attention(q, k, v),
])
def test_a_second_derivative_raises(function):
    q, k, v = inputs(1)
    # A constant output gradient: only q, k and v tie the first derivatives to the graph.
    dq, = torch.autograd.grad(function(q, k, v).sum(), q, create_graph=True)
    with pytest.raises(qkv.Error, match=SECOND):
        (dq ** 2).sum().backward()
    with pytest.raises(qkv.Error, match=SECOND):
        torch.autograd.gradgradcheck(function, inputs(2))


def test_the_gradient_penalty_loop_raises_where_pytorch_computes_one():
    """A WGAN-GP style step through the layer: PyTorch's layer gives the penalty's gradient;
    qkv's raises rather than the wrong one it used to return."""
    torch.manual_seed(0)
    reference = torch.nn.MultiheadAttention(8, 2, batch_first=True, dtype=torch.float64)
    layer = qkv.nn.MultiheadAttention(8, 2, batch_first=True, dtype=torch.float64)
    layer.load_state_dict(reference.state_dict())
    x = torch.randn(2, 5, 8, dtype=torch.float64, requires_grad=True)

    def penalty(module):
        y = module(x, x, x, need_weights=False)[0]
        grad_x, = torch.autograd.grad(y.pow(2).sum(), x, create_graph=True)
        return grad_x.pow(2).sum()

    penalty(reference).backward()
    assert reference.in_proj_weight.grad.norm() > 0
    with pytest.raises(qkv.Error, match=SECOND):
        penalty(layer).backward()


def test_the_differential_layer_raises_too():
    torch.manual_seed(1)
    layer = qkv.nn.DifferentialAttention(16, 2, depth=1).double()
    x = torch.randn(1, 6, 16, dtype=torch.float64, requires_grad=True)
    grad_x, = torch.autograd.grad(layer(x).sum(), x, create_graph=True)
    with pytest.raises(qkv.Error, match=SECOND):
        grad_x.pow(2).sum().backward()
