"""qkv.nn.MultiheadAttention written out in float64 PyTorch around a given attention step, and its
check: the layer's output and every parameter's gradient against the literal ones."""
import torch
import torch.nn.functional as F


def expect_layer_equals_literal(layer, x, attend, tolerance=1e-5, **call):
    """layer(x, x, x, **call) (batch first, self-attention) against out_proj(attend(q, k, v,
    params)) on float64 copies of the parameters, q, k, v [N, H, L, d] from in_proj; the loss is
    Σ output². attend returns [N, H, L, d]."""
    out, _ = layer(x, x, x, need_weights=False, **call)
    out.square().sum().backward()
    params = {name: p.detach().double().requires_grad_() for name, p in layer.named_parameters()}
    n, length, e = x.shape
    h = layer.num_heads
    q, k, v = F.linear(x.double(), params["in_proj_weight"], params["in_proj_bias"]).chunk(3, -1)
    q, k, v = (t.reshape(n, length, h, e // h).transpose(1, 2) for t in (q, k, v))
    attended = attend(q, k, v, params).transpose(1, 2).reshape(n, length, e)
    expected = F.linear(attended, params["out_proj.weight"], params["out_proj.bias"])
    expected.square().sum().backward()

    def relative(a, b):
        return float((a.double() - b).abs().max() / (1 + b.abs().max()))

    assert relative(out, expected) <= tolerance
    for name, p in layer.named_parameters():
        assert relative(p.grad, params[name].grad) <= tolerance, name
