"""qkv.nn.MultiheadAttention: torch.nn.MultiheadAttention with qkv computing the attention; and
qkv.nn.DifferentialAttention, the Differential Transformer's attention on qkv's.

The constructor, the parameters (and so the state_dict), forward's arguments and its results are
PyTorch's: swapping the import is the whole migration. The projections stay torch's F.linear; the
attention between them is qkv's (forward and fused backward). Added: the other scores, each with
the parameters its C++ unit declares (qkv::score_layer): score="bilinear" (a per-head W
[H, E/H, E/H] `score_weight`, starting at the identity), score="additive" (per-head `score_wq`,
`score_wk` [H, A, E/H] and `score_v` [H, A]), score="cosine" (a per-head `score_temperature` [H],
starting at 10), score="dot" (none). sinks=True adds a learned attention sink per head (`sinks`
[H], starting at 0, gpt-oss's); normalization="sigmoid" (with sigmoid_bias, default -log S)
computes sigmoid attention. A query that may attend to no key gets zero attention (the
output is out_proj.bias) where PyTorch gives NaN.
"""
import math
import warnings

import torch
import torch.nn.functional as F
from torch import nn as _nn

from ._functions import (_ATTN_MASK_WITH_IS_CAUSAL, _Config, _float_mask_as_read, _proxy_among,
                         _run, _seed, attention)
from ._qkv import Error, score_layer, score_names

__all__ = ["MultiheadAttention", "DifferentialAttention"]


def _fx_module_call(module, args, kwargs):
    """Under torch.fx symbolic tracing (proxies among the arguments), the layer as one call_module
    node, as fx treats torch.nn's own layers; else None. The layer itself cannot be the root of
    a trace: its forward checks shapes and options in Python, which fx cannot record."""
    proxy = _proxy_among((*args, kwargs))
    if proxy is None:
        return None
    tracer = proxy.tracer
    if module is getattr(tracer, "root", None):
        raise Error(f"torch.fx.symbolic_trace: expected a model that contains the "
                    f"{type(module).__name__} (it becomes one call_module node there), got the "
                    f"layer itself as the root")
    return tracer.create_proxy("call_module", tracer.path_of_module(module), args, kwargs)


class MultiheadAttention(_nn.Module):
    """See torch.nn.MultiheadAttention; score, additive_dim, sinks, normalization and
    sigmoid_bias are qkv's additions."""

    __constants__ = ["batch_first"]

    def __init__(self, embed_dim, num_heads, dropout=0.0, bias=True, add_bias_kv=False,
                 add_zero_attn=False, kdim=None, vdim=None, batch_first=False, device=None,
                 dtype=None, score="scaled_dot", additive_dim=None, sinks=False,
                 normalization="softmax", sigmoid_bias=None):
        if embed_dim <= 0 or num_heads <= 0 or embed_dim % num_heads != 0:
            raise Error(f"embed_dim: expected a positive multiple of num_heads ({num_heads}), "
                        f"got {embed_dim}")
        if normalization not in ("softmax", "sigmoid"):
            raise Error(f"normalization: expected softmax or sigmoid, got '{normalization}'")
        if score not in score_names():
            raise Error(f"score: expected one of {', '.join(score_names())}, got '{score}'")
        factory = {"device": device, "dtype": dtype}
        super().__init__()
        self.embed_dim = embed_dim
        self.kdim = kdim if kdim is not None else embed_dim
        self.vdim = vdim if vdim is not None else embed_dim
        self._qkv_same_embed_dim = self.kdim == embed_dim and self.vdim == embed_dim
        self.num_heads = num_heads
        self.dropout = dropout
        self.batch_first = batch_first
        self.head_dim = embed_dim // num_heads
        self.score = score
        self.normalization = normalization
        self.sigmoid_bias = sigmoid_bias
        if self._qkv_same_embed_dim:
            self.in_proj_weight = _nn.Parameter(torch.empty((3 * embed_dim, embed_dim), **factory))
            self.register_parameter("q_proj_weight", None)
            self.register_parameter("k_proj_weight", None)
            self.register_parameter("v_proj_weight", None)
        else:
            self.q_proj_weight = _nn.Parameter(torch.empty((embed_dim, embed_dim), **factory))
            self.k_proj_weight = _nn.Parameter(torch.empty((embed_dim, self.kdim), **factory))
            self.v_proj_weight = _nn.Parameter(torch.empty((embed_dim, self.vdim), **factory))
            self.register_parameter("in_proj_weight", None)
        if bias:
            self.in_proj_bias = _nn.Parameter(torch.empty(3 * embed_dim, **factory))
        else:
            self.register_parameter("in_proj_bias", None)
        self.out_proj = _nn.Linear(embed_dim, embed_dim, bias=bias, **factory)
        if add_bias_kv:
            self.bias_k = _nn.Parameter(torch.empty((1, 1, embed_dim), **factory))
            self.bias_v = _nn.Parameter(torch.empty((1, 1, embed_dim), **factory))
        else:
            self.bias_k = self.bias_v = None
        self.add_zero_attn = add_zero_attn
        self.additive_dim = additive_dim or self.head_dim
        # (name, option, shape, start, value) of each parameter the score learns, and its scale.
        self._score_parameters, self._score_scale = score_layer(
            score, num_heads, self.head_dim, self.additive_dim)
        if sinks:  # one learned sink per head (the attention call's sinks)
            self._score_parameters.append(("sinks", "sinks", (num_heads,), "constant", 0.0))
        else:
            self.register_parameter("sinks", None)
        for name, _, shape, _, _ in self._score_parameters:
            setattr(self, name, _nn.Parameter(torch.empty(shape, **factory)))
        self._reset_parameters()

    def _reset_parameters(self):
        if self._qkv_same_embed_dim:
            _nn.init.xavier_uniform_(self.in_proj_weight)
        else:
            _nn.init.xavier_uniform_(self.q_proj_weight)
            _nn.init.xavier_uniform_(self.k_proj_weight)
            _nn.init.xavier_uniform_(self.v_proj_weight)
        if self.in_proj_bias is not None:
            _nn.init.constant_(self.in_proj_bias, 0.0)
            _nn.init.constant_(self.out_proj.bias, 0.0)
        if self.bias_k is not None:
            _nn.init.xavier_normal_(self.bias_k)
            _nn.init.xavier_normal_(self.bias_v)
        for name, _, shape, start, value in self._score_parameters:
            parameter = getattr(self, name)
            with torch.no_grad():
                if start == "identity":
                    parameter.copy_(torch.eye(shape[-2], shape[-1]).expand_as(parameter))
                elif start == "xavier":
                    for matrix in parameter.view(-1, shape[-2], shape[-1]):
                        _nn.init.xavier_uniform_(matrix)
                elif start == "uniform":
                    _nn.init.uniform_(parameter, -value, value)
                else:
                    _nn.init.constant_(parameter, value)

    def _projections(self):
        e = self.embed_dim
        if self._qkv_same_embed_dim:
            w_q, w_k, w_v = self.in_proj_weight[:e], self.in_proj_weight[e:2 * e], self.in_proj_weight[2 * e:]
        else:
            w_q, w_k, w_v = self.q_proj_weight, self.k_proj_weight, self.v_proj_weight
        if self.in_proj_bias is None:
            return (w_q, None), (w_k, None), (w_v, None)
        b = self.in_proj_bias
        return (w_q, b[:e]), (w_k, b[e:2 * e]), (w_v, b[2 * e:])

    def forward(self, query, key, value, key_padding_mask=None, need_weights=True, attn_mask=None,
                average_attn_weights=True, is_causal=False):
        """query [L, N, E] (or [N, L, E] with batch_first, or [L, E] unbatched), key [S, N, kdim],
        value [S, N, vdim]; key_padding_mask [N, S] (True = padding) ; attn_mask [L, S] or
        [N·H, L, S], bool (True = not allowed) or float (added; one of only 0 and -inf is the
        boolean mask it spells); is_causal hides key j > i (not with attn_mask: one or the other,
        as in qkv.scaled_dot_product_attention).
        Returns (output like query, weights [N, L, S'] averaged or [N, H, L, S'], or None)."""
        traced = _fx_module_call(self, (query, key, value), dict(
            key_padding_mask=key_padding_mask, need_weights=need_weights, attn_mask=attn_mask,
            average_attn_weights=average_attn_weights, is_causal=is_causal))
        if traced is not None:
            return traced
        attn_mask = self._check_arguments(query, key, value, key_padding_mask, attn_mask)
        if is_causal and attn_mask is not None:
            raise Error(_ATTN_MASK_WITH_IS_CAUSAL)
        batched = query.dim() == 3
        if not batched:
            query, key, value = query.unsqueeze(1), key.unsqueeze(1), value.unsqueeze(1)
            if key_padding_mask is not None:
                key_padding_mask = key_padding_mask.unsqueeze(0)
        if self.batch_first and batched:  # the computation runs batch first: [N, L, E]
            q_in, k_in, v_in = query, key, value
        else:
            q_in, k_in, v_in = query.transpose(0, 1), key.transpose(0, 1), value.transpose(0, 1)
        n, length, _ = q_in.shape
        keys = k_in.shape[1]
        if self._qkv_same_embed_dim and query is key and key is value:
            # Self-attention: one product with the stacked weights, as PyTorch's layer does (q, k
            # and v are then strided views of it, which qkv reads where they lie).
            q, k, v = F.linear(q_in, self.in_proj_weight, self.in_proj_bias).chunk(3, dim=-1)
        else:
            (w_q, b_q), (w_k, b_k), (w_v, b_v) = self._projections()
            q = F.linear(q_in, w_q, b_q)
            k = F.linear(k_in, w_k, b_k)
            v = F.linear(v_in, w_v, b_v)
        extra = 0  # key columns appended after the S given ones
        if self.bias_k is not None:
            k = torch.cat([k, self.bias_k.expand(n, 1, self.embed_dim)], 1)
            v = torch.cat([v, self.bias_v.expand(n, 1, self.embed_dim)], 1)
            extra += 1
        h, d = self.num_heads, self.head_dim
        q = q.reshape(n, length, h, d)
        k = k.reshape(n, keys + extra, h, d)
        v = v.reshape(n, keys + extra, h, d)
        if self.add_zero_attn:
            k = torch.cat([k, k.new_zeros((n, 1, h, d))], 1)
            v = torch.cat([v, v.new_zeros((n, 1, h, d))], 1)
            extra += 1

        options = {"score": self.score, "causal": bool(is_causal), "causal_align": "top-left",
                   "normalization": self.normalization, "sigmoid_bias": self.sigmoid_bias}
        if self._score_scale is not None:
            options["scale"] = self._score_scale
        parameters = {option: getattr(self, name) for name, option, _, _, _ in self._score_parameters}
        allowed, added = self._masks(attn_mask, key_padding_mask, n, length, keys, extra)
        if allowed is not None:
            options["mask"] = allowed
        if added is not None:
            parameters["bias"] = added
        dropout = self.dropout if self.training else 0.0
        options["dropout"] = float(dropout)
        options["dropout_seed"] = _seed(dropout, None)
        out, _, weights = _run(_Config(options, False, need_weights), q, k, v, parameters)
        attention = out.reshape(n, length, self.embed_dim)
        output = self.out_proj(attention)
        if not (self.batch_first and batched):
            output = output.transpose(0, 1)
        if not batched:
            output = output.squeeze(1)
        if weights is not None and average_attn_weights:
            weights = weights.mean(dim=1)
        if weights is not None and not batched:
            weights = weights.squeeze(0)
        return output, weights

    def _check_arguments(self, query, key, value, key_padding_mask, attn_mask):
        """torch.nn.MultiheadAttention.forward's own checks, each a qkv.Error naming the argument,
        the expected and the given (PyTorch raises AssertionError or RuntimeError for these; a
        qkv.Error is a RuntimeError). Returns attn_mask, a uint8 one turned bool as PyTorch does."""
        if query.dim() not in (2, 3):
            raise Error(f"query: expected [L, E] (unbatched) or [L, N, E] (batched; [N, L, E] "
                        f"with batch_first), got shape {list(query.shape)}")
        batched = query.dim() == 3
        if key.dim() != query.dim() or value.dim() != query.dim():
            raise Error(f"key, value: expected {query.dim()}-D like query, got {key.dim()}-D and "
                        f"{value.dim()}-D")
        if not (query.dtype == key.dtype == value.dtype):
            raise Error(f"query, key, value: expected one dtype, got {query.dtype}, {key.dtype} "
                        f"and {value.dtype}")
        weight = self.in_proj_weight if self._qkv_same_embed_dim else self.q_proj_weight
        if query.dtype != weight.dtype:
            raise Error(f"query: expected the parameters' dtype {weight.dtype}, got {query.dtype}")
        for name, x, width, option in (("query", query, self.embed_dim, "embed_dim"),
                                       ("key", key, self.kdim, "kdim"),
                                       ("value", value, self.vdim, "vdim")):
            if x.shape[-1] != width:
                raise Error(f"{name}: expected a last dimension of {width} ({option}), got shape "
                            f"{list(x.shape)}")
        # Sequence and batch dimensions: [L, N] of query, [S, N] of key and value (batch first:
        # [N, L] and [N, S]; unbatched: [L] and [S]).
        first = self.batch_first and batched
        length = query.shape[1] if first else query.shape[0]
        keys = key.shape[1] if first else key.shape[0]
        if key.shape[:-1] != value.shape[:-1]:
            raise Error(f"value: expected the sequence and batch dimensions of key "
                        f"{list(key.shape[:-1])}, got shape {list(value.shape)}")
        if batched:
            n = query.shape[0] if first else query.shape[1]
            key_n = key.shape[0] if first else key.shape[1]
            if key_n != n:
                raise Error(f"key, value: expected the query's batch size {n}, got shape "
                            f"{list(key.shape)}")
        if key_padding_mask is not None:
            expected = [n, keys] if batched else [keys]
            if key_padding_mask.dtype != torch.bool and not key_padding_mask.is_floating_point():
                raise Error(f"key_padding_mask: expected dtype bool or a floating dtype, got "
                            f"{key_padding_mask.dtype}")
            if list(key_padding_mask.shape) != expected:
                raise Error(f"key_padding_mask: expected {'[N, S]' if batched else '[S]'} = "
                            f"{expected}, got {list(key_padding_mask.shape)}")
        if attn_mask is not None:
            if attn_mask.dtype == torch.uint8:
                warnings.warn("Byte tensor for attn_mask in nn.MultiheadAttention is deprecated. "
                              "Use bool tensor instead.")
                attn_mask = attn_mask.to(torch.bool)
            elif attn_mask.dtype != torch.bool and not attn_mask.is_floating_point():
                raise Error(f"attn_mask: expected dtype bool, uint8 or a floating dtype, got "
                            f"{attn_mask.dtype}")
            heads = (n if batched else 1) * self.num_heads
            if attn_mask.dim() == 2:
                expected, layout = [length, keys], "[L, S]"
            elif attn_mask.dim() == 3:
                expected, layout = [heads, length, keys], "[N·num_heads, L, S]"
            else:
                expected, layout = None, "[L, S] or [N·num_heads, L, S]"
            if expected is None or list(attn_mask.shape) != expected:
                shown = f" = {expected}" if expected else ""
                raise Error(f"attn_mask: expected {layout}{shown}, got {list(attn_mask.shape)}")
        return attn_mask

    def _masks(self, attn_mask, key_padding_mask, n, length, keys, extra):
        """PyTorch's masks as qkv's: (bool mask, True = may attend) and (float bias), each
        broadcastable to [N, H, L, S'], the appended key columns visible and unbiased."""
        allowed, added = None, None

        def widen(mask, fill):
            if extra == 0:
                return mask
            pad = mask.new_full(tuple(mask.shape[:-1]) + (extra,), fill)
            return torch.cat([mask, pad], -1)

        if attn_mask is not None:  # its shape is checked (_check_arguments)
            if attn_mask.dim() == 2:
                shaped = attn_mask.reshape(1, 1, length, keys)
            else:
                shaped = attn_mask.reshape(n, self.num_heads, length, keys)
            if attn_mask.dtype == torch.bool:
                allowed = widen(~shaped, True)
            else:
                read = _float_mask_as_read(shaped)  # a boolean mask if it spells one
                if read.dtype == torch.bool:
                    allowed = widen(read, True)
                else:
                    added = widen(read, 0.0)
        if key_padding_mask is not None:
            shaped = key_padding_mask.reshape(n, 1, 1, keys)
            if key_padding_mask.dtype == torch.bool:
                visible = widen(~shaped, True)
                allowed = visible if allowed is None else (allowed & visible)
            else:
                padding = widen(shaped, 0.0)
                added = padding if added is None else added + padding
        if allowed is not None:
            allowed = allowed.contiguous()
        return allowed, added


class DifferentialAttention(_nn.Module):
    """Differential attention (Ye et al., ICLR 2025, "Differential Transformer"), self-attention
    on x [N, L, E] (batch first).

    Each of the num_heads heads has two query/key pairs of head_dim = E / num_heads / 2 features
    and one value of 2·head_dim; its output is

        (softmax(Q1 K1ᵀ·s) − λ·softmax(Q2 K2ᵀ·s)) V,   s = 1/sqrt(head_dim),

    computed as two qkv attention calls on strided views of the projections (neither map is
    formed), then normalized per head (RMS over its 2·head_dim features, a learned weight
    `subln_weight`, eps 1e-5) and scaled by 1 − λ_init, heads concatenated and projected out.
    λ = exp(λ_q1·λ_k1) − exp(λ_q2·λ_k2) + λ_init, one per layer, with λ_init =
    0.8 − 0.6·exp(−0.3·depth) for the layer's depth (its index from 0). num_kv_heads < num_heads
    shares each key/value head among num_heads / num_kv_heads heads (GQA). Causal by default;
    forward(x, is_causal=False) attends both ways. Differentiable (qkv's fused backward twice).
    """

    def __init__(self, embed_dim, num_heads, depth, num_kv_heads=None, bias=False, device=None,
                 dtype=None):
        num_kv_heads = num_heads if num_kv_heads is None else num_kv_heads
        if num_heads <= 0 or embed_dim % (2 * num_heads) != 0:
            raise Error(f"embed_dim: expected a positive multiple of 2·num_heads "
                        f"({2 * num_heads}), got {embed_dim}")
        if num_kv_heads <= 0 or num_heads % num_kv_heads != 0:
            raise Error(f"num_kv_heads: expected a divisor of num_heads ({num_heads}), got "
                        f"{num_kv_heads}")
        if depth < 0:
            raise Error(f"depth: expected the layer's index >= 0, got {depth}")
        factory = {"device": device, "dtype": dtype}
        super().__init__()
        self.embed_dim, self.num_heads, self.num_kv_heads = embed_dim, num_heads, num_kv_heads
        self.head_dim = embed_dim // num_heads // 2
        kv_width = embed_dim // (num_heads // num_kv_heads)
        self.q_proj = _nn.Linear(embed_dim, embed_dim, bias=bias, **factory)
        self.k_proj = _nn.Linear(embed_dim, kv_width, bias=bias, **factory)
        self.v_proj = _nn.Linear(embed_dim, kv_width, bias=bias, **factory)
        self.out_proj = _nn.Linear(embed_dim, embed_dim, bias=bias, **factory)
        self.lambda_init = 0.8 - 0.6 * math.exp(-0.3 * depth)
        for name in ("lambda_q1", "lambda_k1", "lambda_q2", "lambda_k2"):
            setattr(self, name, _nn.Parameter(torch.empty(self.head_dim, **factory)))
        self.subln_weight = _nn.Parameter(torch.empty(2 * self.head_dim, **factory))
        self.reset_parameters()

    def reset_parameters(self):
        for name in ("lambda_q1", "lambda_k1", "lambda_q2", "lambda_k2"):
            _nn.init.normal_(getattr(self, name), mean=0.0, std=0.1)
        _nn.init.ones_(self.subln_weight)
        for projection in (self.q_proj, self.k_proj, self.v_proj, self.out_proj):
            projection.reset_parameters()

    def lambda_full(self):
        """λ of this layer: exp(λ_q1·λ_k1) − exp(λ_q2·λ_k2) + λ_init."""
        return (torch.exp(torch.dot(self.lambda_q1, self.lambda_k1))
                - torch.exp(torch.dot(self.lambda_q2, self.lambda_k2)) + self.lambda_init)

    def forward(self, x, is_causal=True):
        """x [N, L, E] → [N, L, E]."""
        traced = _fx_module_call(self, (x,), {"is_causal": is_causal})
        if traced is not None:
            return traced
        if x.dim() != 3 or x.shape[-1] != self.embed_dim:
            raise Error(f"x: expected [N, L, E] with E = {self.embed_dim}, got shape "
                        f"{list(x.shape)}")
        n, length, _ = x.shape
        d, h, hk = self.head_dim, self.num_heads, self.num_kv_heads
        q = self.q_proj(x).view(n, length, 2 * h, d)
        k = self.k_proj(x).view(n, length, 2 * hk, d)
        v = self.v_proj(x).view(n, length, hk, 2 * d)
        # The two maps of each head: queries and keys 2h and 2h + 1, read through strides.
        first = attention(q[:, :, 0::2], k[:, :, 0::2], v, causal=bool(is_causal))
        second = attention(q[:, :, 1::2], k[:, :, 1::2], v, causal=bool(is_causal))
        heads = first - self.lambda_full() * second
        normalized = heads * torch.rsqrt(heads.pow(2).mean(-1, keepdim=True) + 1e-5)
        heads = normalized * self.subln_weight * (1.0 - self.lambda_init)
        return self.out_proj(heads.reshape(n, length, self.embed_dim))
