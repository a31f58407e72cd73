"""qkv's attention as a PyTorch operator, torch.ops.qkv.attention (torch.library), so that PyTorch
sees one operation where it would otherwise see Python code:

- a CPU kernel (the C++ core, writing into fresh tensors), a Meta kernel (shapes and dtypes only:
  meta tensors go through a model without computing), and an Autograd kernel (qkv's fused
  backward, and a second derivative, below);
- so torch.jit.trace records the operator with its inputs instead of baking its result in as a
  constant, torch.fx sees one node per call, and TorchScript code can call it.

The schema carries every tensor a call may read as its own argument (the differentiable ones,
then the masks' and the block mask's), the score_mod's parameters as a list, and the rest of
the call — scores, masks, scale, which results — as a JSON string: an operator takes only
tensors, numbers and strings. Results: O (in the requested layout), LSE in float64 (the backward
recomputes the weights from it) and the weights, or an empty tensor when not asked for.

Second derivatives. qkv's fused backward computes first derivatives only. When a first
derivative is itself differentiated (create_graph=True: a gradient penalty, gradgradcheck), the
backward's own backward evaluates attention literally in float64 torch operations — the N×N
scores built from the score's formula (contract §2), the masks and the dropout taken from qkv's
float64 reference, so that they are exactly the call's — and lets autograd differentiate that
twice. O(N²) memory, meant for the penalty terms of training, not for speed.
"""
import collections
import functools
import json
import math

import torch

from . import _qkv
from .score_mods import ScoreMod
from ._functions import (_GRADIENT_NAMES, _PARAMETERS, _TENSOR_OPTIONS, _Config, _empty,
                         _forward, _numpy_view, _result_dtypes)
from ._qkv import Error

_SCHEMA = ("attention(Tensor q, Tensor k, Tensor v, Tensor? w, Tensor? wq, Tensor? wk, Tensor? va, "
           "Tensor? temperature, Tensor? sinks, Tensor? bias, Tensor? alibi_slopes, "
           "Tensor? key_lengths, Tensor? key_starts, Tensor? mask, Tensor? block_kinds, Tensor? block_partial, "
           "Tensor[] score_parameters, str config) -> (Tensor, Tensor, Tensor)")
# Positions in the operator's arguments after q, k, v: the differentiable tensors, then the rest.
_OTHER_TENSORS = _TENSOR_OPTIONS + ("block_kinds", "block_partial")

_library = torch.library.Library("qkv", "DEF")
_library.define(_SCHEMA)


# ---- The call as a string, and back ------------------------------------------------------------

def _config_string(config):
    """The JSON that, with the tensors, fixes a call."""
    options = {name: value for name, value in config.options.items()
               if name not in _TENSOR_OPTIONS and name != "block_mask"}
    block_mask = config.options.get("block_mask")
    block = None if block_mask is None else [list(block_mask.shape), list(block_mask.BLOCK_SIZE)]
    pieces = None if config.score_pieces is None else [list(p) for p in config.score_pieces]
    return json.dumps({"options": options, "want_weights": bool(config.want_weights),
                       "out_layout": config.out_layout, "score_pieces": pieces,
                       "block_mask": block}, sort_keys=True, default=_plain_number)


def _plain_number(value):
    """A NumPy or torch scalar (a scale given as np.float32, say) as the Python number it holds."""
    if hasattr(value, "item"):
        return value.item()
    raise Error(f"config: expected numbers, strings and lists, got {type(value).__name__}")


class _ParsedConfig(collections.namedtuple(
        "_ParsedConfig", "options want_weights out_layout score_pieces block_mask")):
    """A config string read back (cached: a model calls with a few configs again and again)."""


@functools.lru_cache(maxsize=256)
def _parse(config):
    try:
        doc = json.loads(config)
        pieces = doc["score_pieces"]
        return _ParsedConfig(doc["options"], doc["want_weights"], doc["out_layout"],
                             None if pieces is None else [tuple(p) for p in pieces],
                             doc["block_mask"])
    except (ValueError, KeyError, TypeError) as error:
        raise Error(f"config: expected the JSON qkv's Python layer writes, got {config!r} "
                    f"({error})") from None


# Block masks built in C++, by their tensors: a BlockMask registers its own when it is made, so
# calls find it instead of building it again. Entries keep their tensors alive, so a data pointer
# in a key is never reused by another mask while the entry exists.
_native_block_masks = collections.OrderedDict()
_NATIVE_BLOCK_MASKS_KEPT = 32


def _block_key(kinds, partial, block):
    return (kinds.data_ptr(), partial.data_ptr(), tuple(kinds.shape), tuple(partial.shape),
            json.dumps(block))


def register_block_mask(kinds, partial, block, native):
    """Remembers `native` as the C++ block mask of these tensors (qkv.BlockMask does this)."""
    _native_block_masks[_block_key(kinds, partial, block)] = (kinds, partial, native)
    while len(_native_block_masks) > _NATIVE_BLOCK_MASKS_KEPT:
        _native_block_masks.popitem(last=False)


def _native_block_mask(kinds, partial, block):
    key = _block_key(kinds, partial, block)
    if key in _native_block_masks:
        _native_block_masks.move_to_end(key)
        return _native_block_masks[key][2]
    (batch, heads, q_len, kv_len), (q_block, kv_block) = block
    native = _qkv.BlockMask(batch, heads, q_len, kv_len, q_block, kv_block,
                            _numpy_view(kinds.contiguous(), "block_kinds"),
                            _numpy_view(partial.contiguous(), "block_partial"))
    register_block_mask(kinds, partial, block, native)
    return native


def _call_config(parsed, others, block_tensors):
    """A _Config for the core from a parsed string and the operator's mask tensors."""
    options = dict(parsed.options)
    for name, tensor in zip(_TENSOR_OPTIONS, others):
        if tensor is not None:
            options[name] = tensor
    if parsed.block_mask is not None:
        kinds, partial = block_tensors
        if kinds is None or partial is None:
            raise Error("block_kinds, block_partial: expected the block mask's tensors, got None")
        options["block_mask"] = _native_block_mask(kinds, partial, parsed.block_mask)
    return _Config(options, False, parsed.want_weights, parsed.out_layout, parsed.score_pieces)


def _split(arguments):
    """The operator's arguments after q, k, v as (differentiable dict, mask tensors, block
    tensors)."""
    named = arguments[:len(_PARAMETERS)]
    rest = arguments[len(_PARAMETERS):]
    others, block_tensors = rest[:len(_TENSOR_OPTIONS)], rest[len(_TENSOR_OPTIONS):]
    parameters = {n: t for n, t in zip(_PARAMETERS, named) if t is not None}
    return parameters, others, block_tensors


# ---- The kernels -------------------------------------------------------------------------------

def _attention_cpu(q, k, v, *arguments):
    *tensors, score_parameters, config = arguments
    parsed = _parse(config)
    parameters, others, block_tensors = _split(tensors)
    call = _call_config(parsed, others, block_tensors)
    out, lse, weights = _forward(call, q, k, v, parameters, True, score_parameters)
    if weights is None:
        weights = _empty((0,), _result_dtypes(v)[1], True)
    return out, lse, weights


def _attention_meta(q, k, v, *arguments):
    *_, config = arguments
    parsed = _parse(config)
    b, nq, hq, _ = q.shape
    nk, dv = k.shape[1], v.shape[3]
    out_dtype, wide = _result_dtypes(v)
    if parsed.out_layout == "bhnd":
        out = q.new_empty((b, hq, nq, dv), dtype=out_dtype).transpose(1, 2)
    else:
        out = q.new_empty((b, nq, hq, dv), dtype=out_dtype)
    lse = q.new_empty((b, hq, nq), dtype=torch.float64)
    weights = q.new_empty((b, hq, nq, nk) if parsed.want_weights else (0,), dtype=wide)
    return out, lse, weights


def _below_autograd(*arguments):
    """torch.ops.qkv.attention past the Autograd kernel (to the CPU or the Meta one)."""
    guard = torch._C._AutoDispatchBelowAutograd()
    try:
        return torch.ops.qkv.attention(*arguments)
    finally:
        del guard


def _attention_autograd(q, k, v, *arguments):
    *tensors, score_parameters, config = arguments
    differentiable = (q, k, v, *tensors[:len(_PARAMETERS)], *score_parameters)
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in differentiable):
        return _AttentionFunction.apply(config, len(score_parameters), q, k, v, *tensors,
                                        *score_parameters)
    return _below_autograd(q, k, v, *tensors, score_parameters, config)


_library.impl("attention", _attention_cpu, "CPU")
_library.impl("attention", _attention_meta, "Meta")
_library.impl("attention", _attention_autograd, "Autograd")


def _plain_cpu_call(tensors):
    """Whether a call on these tensors may go to the core without the operator: no gradient will
    be asked of it, torch.jit.trace is not recording, and each is a plain CPU tensor (not a meta,
    fake or other subclass' tensor, whose kernels the dispatcher picks)."""
    if torch.is_grad_enabled() and any(t.requires_grad for t in tensors):
        return False
    if torch._C._get_tracing_state() is not None:
        return False
    return all(type(t) in _PLAIN_TENSOR_TYPES and t.device.type == "cpu" for t in tensors)


_PLAIN_TENSOR_TYPES = (torch.Tensor, torch.nn.Parameter)


def attention(config, q, k, v, parameters, score_parameters):
    """(O, LSE, P or None) of torch [B, N, H, D] views through torch.ops.qkv.attention; LSE in
    float32 (float64 for float64 inputs) when config.want_lse, else None.

    A call that nothing differentiates or records (inference, generation) goes straight to the
    core: the same kernels and results without the dispatcher's two hops and the JSON round trip
    of the call's options, which cost as much as the attention of a short sequence."""
    tensors = [t for t in (q, k, v, *parameters.values(), *score_parameters,
                           *(config.options.get(name) for name in _TENSOR_OPTIONS))
               if isinstance(t, torch.Tensor)]
    if _plain_cpu_call(tensors):
        out, lse, weights = _forward(config, q, k, v, parameters, False, score_parameters)
        return out, (lse if config.want_lse else None), weights
    others = [None if config.options.get(name) is None else
              torch.as_tensor(config.options[name]) for name in _TENSOR_OPTIONS]
    block_mask = config.options.get("block_mask")
    block_tensors = ((None, None) if block_mask is None else
                     (block_mask._kinds_tensor, block_mask._partial_tensor))
    out, lse, weights = torch.ops.qkv.attention(
        q, k, v, *(parameters.get(name) for name in _PARAMETERS), *others, *block_tensors,
        list(score_parameters), _config_string(config))
    if not config.want_lse:
        lse = None
    elif v.dtype != torch.float64:  # the caller's LSE in the public dtype
        lse = lse.to(torch.float32)
    return out, lse, (weights if config.want_weights else None)


# ---- First derivatives: qkv's fused backward ----------------------------------------------------

def _fused_gradients(config, dout, dlse, q, k, v, tensors, out, lse, score_parameters, wanted):
    """The first derivatives qkv's backward computes, one per differentiable input in the order
    (q, k, v, the _PARAMETERS, the score parameters), None where not wanted."""
    parameters, others, block_tensors = _split(tensors)
    call = _call_config(_parse(config), others, block_tensors)
    primals = (q, k, v, *tensors[:len(_PARAMETERS)])
    if q.device.type == "meta":  # shapes only
        return [p.new_empty(p.shape) if w and p is not None else None
                for p, w in zip((*primals, *score_parameters), wanted)]
    if dout is None:
        dout = torch.zeros(out.shape, dtype=out.dtype)
    gradients = {name: _empty(tuple(primal.shape), primal.dtype, True)
                 for name, primal, w in zip(_GRADIENT_NAMES, primals, wanted) if w}
    # A score_mod parameter's gradient in float32 or float64 (bfloat16 through float32).
    score_gradients = [
        _empty(tuple(p.shape), torch.float64 if p.dtype == torch.float64 else torch.float32, True)
        if w else None for p, w in zip(score_parameters, wanted[len(primals):])]
    options = call.options_with(parameters, score_parameters)
    views = {n: _numpy_view(g, n) for n, g in gradients.items()}
    if score_parameters:
        views["dscore_mod"] = [_numpy_view(g, "dscore_mod") for g in score_gradients]
    _qkv.backward(_numpy_view(q, "q"), _numpy_view(k, "k"), _numpy_view(v, "v"), options,
                  _numpy_view(dout, "dout"), _numpy_view(dlse, "dlse"), _numpy_view(out, "out"),
                  _numpy_view(lse, "lse"), views)
    score_gradients = [g if g is None else g.to(p.dtype)
                       for g, p in zip(score_gradients, score_parameters)]
    return [*(gradients.get(name) for name in _GRADIENT_NAMES), *score_gradients]


class _AttentionFunction(torch.autograd.Function):
    """The operator's autograd: qkv's forward, and qkv's fused backward for every input that
    requires grad (through _AttentionBackward when the backward is itself differentiated)."""

    @staticmethod
    def forward(ctx, config, count, q, k, v, *rest):
        tensors, score_parameters = rest[:len(rest) - count], rest[len(rest) - count:]
        out, lse, weights = _below_autograd(q, k, v, *tensors, list(score_parameters), config)
        ctx.config, ctx.count, ctx.tensor_count = config, count, len(tensors)
        ctx.save_for_backward(q, k, v, *tensors, out, lse, *score_parameters)
        ctx.mark_non_differentiable(weights)
        ctx.set_materialize_grads(False)
        return out, lse, weights

    @staticmethod
    def backward(ctx, dout, dlse, _dweights):
        q, k, v, *rest = ctx.saved_tensors
        tensors = rest[:ctx.tensor_count]
        out, lse, *score_parameters = rest[ctx.tensor_count:]
        differentiable = len(_PARAMETERS)
        needs = ctx.needs_input_grad[2:]  # after config and count
        wanted = (*needs[:3 + differentiable], *needs[3 + ctx.tensor_count:])
        if dout is None and dlse is None:
            results = [None] * len(wanted)
        elif torch.is_grad_enabled():  # create_graph=True: a second derivative may follow
            results = _AttentionBackward.apply(ctx.config, wanted, dout, dlse, q, k, v, *tensors,
                                               out, lse, *score_parameters)
        else:
            results = _fused_gradients(ctx.config, dout, dlse, q, k, v, tensors, out, lse,
                                       score_parameters, wanted)
        results = list(results)
        main, scores = results[:3 + differentiable], results[3 + differentiable:]
        others = [None] * (ctx.tensor_count - differentiable)
        return (None, None, *main, *others, *scores)


class _AttentionBackward(torch.autograd.Function):
    """qkv's fused backward as a differentiable function of (dO, dLSE, q, k, v, parameters): its
    own backward is the second derivative, from literal float64 attention (module docstring)."""

    @staticmethod
    def forward(ctx, config, wanted, dout, dlse, q, k, v, *rest):
        count = len(wanted) - 3 - len(_PARAMETERS)
        tensors = rest[:len(_OTHER_TENSORS) + len(_PARAMETERS)]
        out, lse = rest[len(tensors):len(tensors) + 2]
        score_parameters = rest[len(tensors) + 2:]
        assert len(score_parameters) == count
        ctx.config, ctx.wanted, ctx.tensor_count = config, wanted, len(tensors)
        ctx.save_for_backward(dout, dlse, q, k, v, *tensors, *score_parameters)
        ctx.set_materialize_grads(False)
        gradients = _fused_gradients(config, dout, dlse, q, k, v, tensors, out, lse,
                                     score_parameters, wanted)
        return tuple(gradients)

    @staticmethod
    def backward(ctx, *upstream):
        dout, dlse, q, k, v, *rest = ctx.saved_tensors
        tensors, score_parameters = rest[:ctx.tensor_count], rest[ctx.tensor_count:]
        needs = ctx.needs_input_grad[2:]  # after config and wanted
        seconds = _second_derivative(ctx.config, ctx.wanted, upstream, dout, dlse, q, k, v,
                                     tensors, score_parameters, needs)
        # Gradients for (config, wanted, dout, dlse, q, k, v, tensors..., out, lse, score...).
        (d_dout, d_dlse, dq, dk, dv), rest = seconds[:5], seconds[5:]
        named, scores = rest[:len(_PARAMETERS)], rest[len(_PARAMETERS):]
        others = [None] * (ctx.tensor_count - len(_PARAMETERS))
        return (None, None, d_dout, d_dlse, dq, dk, dv, *named, *others, None, None, *scores)


# ---- Second derivatives: attention literally, in float64 -----------------------------------------

def _head_matrix(weight, equation_shared, equation_per_head, x):
    return torch.einsum(equation_shared if weight.dim() == 2 else equation_per_head, x, weight)


def _base_scores(score, q, k, parameters):
    """s(q, k) of contract §2 before the scale: [B, Hq, Nq, Nk], q and k of Hq heads."""
    if score in ("dot", "scaled_dot"):
        return torch.einsum("bihd,bjhd->bhij", q, k)
    if score == "bilinear":
        qw = _head_matrix(parameters["w"], "bihd,de->bihe", "bihd,hde->bihe", q)
        return torch.einsum("bihe,bjhe->bhij", qw, k)
    if score == "additive":
        qa = _head_matrix(parameters["wq"], "bihd,ad->bhia", "bihd,had->bhia", q)
        ka = _head_matrix(parameters["wk"], "bjhd,ad->bhja", "bjhd,had->bhja", k)
        va = parameters["va"]
        va = va if va.dim() == 1 else va[None, :, None, None, :]
        return (torch.tanh(qa[:, :, :, None, :] + ka[:, :, None, :, :]) * va).sum(-1)
    if score == "cosine":
        def unit(x):
            norm = x.norm(dim=-1, keepdim=True)
            return torch.where(norm > 0, x / torch.where(norm > 0, norm, torch.ones_like(norm)),
                               torch.zeros_like(x))
        s = torch.einsum("bihd,bjhd->bhij", unit(q), unit(k))
        temperature = parameters.get("temperature")  # [Hq] or [1]
        return s if temperature is None else s * temperature.reshape(1, -1, 1, 1)
    raise Error(f"score: expected one of dot, scaled_dot, bilinear, additive, cosine, got {score}")


def _literal_attention(call, q, k, v, parameters, score_parameters, visible, dropout_factor):
    """(O [B, Nq, Hq, Dv], LSE [B, Hq, Nq]) of contract §2–4 in torch operations, differentiable
    in everything; `visible` (bool) and `dropout_factor` come from qkv's reference."""
    options = call.options
    b, nq, hq, dim = q.shape
    nk, hk = k.shape[1], k.shape[2]
    group = hq // hk
    if group > 1:
        k, v = k.repeat_interleave(group, 2), v.repeat_interleave(group, 2)
    score = options.get("score", "scaled_dot")
    s = _base_scores(score, q, k, parameters)
    scale = options.get("scale")
    if scale is None:
        scale = 1.0 / math.sqrt(dim) if score == "scaled_dot" else 1.0
    s = s * scale
    softcap = options.get("softcap", 0.0)
    if softcap > 0:
        s = softcap * torch.tanh(s / softcap)
    i = torch.arange(nq, dtype=s.dtype).reshape(1, 1, nq, 1)
    j = torch.arange(nk, dtype=s.dtype).reshape(1, 1, 1, nk)
    slopes = options.get("alibi_slopes")
    if slopes is not None:
        slopes = torch.as_tensor(slopes).to(s.dtype)  # not differentiated
        slopes = slopes.reshape(1, hq, 1, 1) if slopes.dim() == 1 else slopes.reshape(b, hq, 1, 1)
        s = s - slopes * (i + nk - nq - j).abs()
    if "bias" in parameters:
        s = s + parameters["bias"]
    if call.score_pieces is not None:
        pieces = [(kind, None if index < 0 else score_parameters[index], constant)
                  for kind, index, constant in call.score_pieces]
        index = (torch.arange(b).reshape(b, 1, 1, 1), torch.arange(hq).reshape(1, hq, 1, 1),
                 torch.arange(nq).reshape(1, 1, nq, 1), torch.arange(nk).reshape(1, 1, 1, nk))
        s = ScoreMod(pieces)(s, *index)
    s = s.expand(b, hq, nq, nk)
    # Hidden pairs: a stand-in score that keeps exp finite, and weight 0.
    if options.get("normalization", "softmax") == "sigmoid":
        bias = options.get("sigmoid_bias")
        bias = -math.log(nk) if bias is None else bias
        weights = torch.where(visible, torch.sigmoid(torch.where(visible, s, torch.zeros_like(s))
                                                     + bias), torch.zeros_like(s))
        total = weights.sum(-1)
        lse = torch.where(total > 0, torch.log(torch.where(total > 0, total,
                                                           torch.ones_like(total))),
                          torch.full_like(total, -math.inf))
    else:
        sinks = parameters.get("sinks")
        masked = torch.where(visible, s, torch.full_like(s, -math.inf))
        row_max = masked.amax(-1).detach()
        if sinks is not None:
            row_max = torch.maximum(row_max, sinks.detach().reshape(1, hq, 1).expand_as(row_max))
        row_max = torch.where(torch.isfinite(row_max), row_max, torch.zeros_like(row_max))
        safe = torch.where(visible, s, row_max[..., None].expand_as(s))
        exponentials = torch.where(visible, torch.exp(safe - row_max[..., None]),
                                   torch.zeros_like(s))
        total = exponentials.sum(-1)
        if sinks is not None:
            total = total + torch.exp(sinks.reshape(1, hq, 1) - row_max)
        positive = total > 0
        safe_total = torch.where(positive, total, torch.ones_like(total))
        lse = torch.where(positive, row_max + torch.log(safe_total),
                          torch.full_like(total, -math.inf))
        weights = exponentials / safe_total[..., None]
    if dropout_factor is not None:
        weights = weights * dropout_factor
    out = torch.einsum("bhij,bjhd->bihd", weights, v)
    return out, lse


def _second_derivative(config, wanted, upstream, dout, dlse, q, k, v, tensors, score_parameters,
                       needs):
    """∂⟨upstream, first derivatives⟩ / ∂(dO, dLSE, q, k, v, parameters, score parameters), in
    each input's dtype, None where `needs` says no."""
    parameters, others, block_tensors = _split(tensors)
    call = _call_config(_parse(config), others, block_tensors)
    reference_scores, reference_weights = _qkv.reference_scores(
        _numpy_view(q, "q"), _numpy_view(k, "k"), _numpy_view(v, "v"),
        call.options_with(parameters, score_parameters))
    visible = torch.from_numpy(reference_scores) > -math.inf
    dropout = call.options.get("dropout", 0.0)
    dropout_factor = None
    if dropout > 0:  # kept weights are those the reference left nonzero
        dropout_factor = (torch.from_numpy(reference_weights) > 0).to(torch.float64) / (
            1.0 - dropout)
    named = tensors[:len(_PARAMETERS)]
    primals = [q, k, v, *named, *score_parameters]
    with torch.enable_grad():
        def leaf(t):
            return None if t is None else t.detach().to(torch.float64).requires_grad_(True)
        leaves = [leaf(t) for t in primals]
        dout_leaf = leaf(dout) if dout is not None else None
        dlse_leaf = leaf(dlse) if dlse is not None else None
        lq, lk, lv, *rest = leaves
        lparameters = {n: t for n, t in zip(_PARAMETERS, rest[:len(_PARAMETERS)])
                       if t is not None}
        out, lse = _literal_attention(call, lq, lk, lv, lparameters,
                                      rest[len(_PARAMETERS):], visible, dropout_factor)
        outputs, cotangents = [], []
        if dout_leaf is not None:
            outputs.append(out)
            cotangents.append(dout_leaf)
        if dlse_leaf is not None:
            finite = torch.isfinite(lse)
            outputs.append(torch.where(finite, lse, torch.zeros_like(lse)))
            cotangents.append(torch.where(finite, dlse_leaf, torch.zeros_like(dlse_leaf)))
        chosen = [t for t, w in zip(leaves, wanted) if w and t is not None]
        firsts = torch.autograd.grad(outputs, chosen, cotangents, create_graph=True,
                                     allow_unused=True)
        pairs = []
        firsts_iter = iter(firsts)
        for t, w, u in zip(leaves, wanted, upstream):
            if not (w and t is not None):
                continue
            first = next(firsts_iter)
            if first is not None and u is not None:
                pairs.append((first, u.to(torch.float64)))
        inputs = [dout_leaf, dlse_leaf, *leaves]
        asked = [t for t, n in zip(inputs, _needs_for(needs, len(named), len(score_parameters)))
                 if n and t is not None]
        if pairs and asked:
            seconds = torch.autograd.grad([f for f, _ in pairs], asked, [u for _, u in pairs],
                                          allow_unused=True)
        else:
            seconds = [None] * len(asked)
    found = iter(seconds)
    originals = [dout, dlse, *primals]
    results = []
    for t, original, n in zip(inputs, originals,
                              _needs_for(needs, len(named), len(score_parameters))):
        if n and t is not None:
            g = next(found)
            results.append(None if g is None else g.to(original.dtype))
        else:
            results.append(None)
    return results


def _needs_for(needs, named_count, score_count):
    """needs_input_grad of _AttentionBackward (after config and wanted) for (dO, dLSE, q, k, v,
    the named parameters, the score parameters), skipping the masks and out, lse."""
    dout_dlse_qkv = needs[:5]
    named = needs[5:5 + named_count]
    scores = needs[len(needs) - score_count:] if score_count else ()
    return (*dout_dlse_qkv, *named, *scores)
