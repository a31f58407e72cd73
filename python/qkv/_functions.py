"""The public functions: each puts its layout into qkv's [B, N, H, D] views (transposes are views,
never copies) and hands them to one runner, which calls the C++ core directly for NumPy arrays
and through a torch.autograd.Function for torch tensors."""
import functools
import math

import numpy as np

from . import _qkv
from ._qkv import Error

try:
    import torch
except ImportError:  # NumPy alone works; torch tensors need torch
    torch = None

# Differentiable tensors besides q, k, v, and the names of all their gradients.
_PARAMETERS = ("w", "wq", "wk", "va", "temperature", "sinks", "bias")
_GRADIENT_NAMES = ("dq", "dk", "dv") + tuple("d" + name for name in _PARAMETERS)


def _proxy_among(values):
    """A torch.fx.Proxy among values (and one level into lists, tuples and dicts), or None."""
    if torch is None:
        return None
    for value in values:
        inner = value.values() if isinstance(value, dict) else (
            value if isinstance(value, (list, tuple)) else (value,))
        for item in inner:
            if isinstance(item, torch.fx.Proxy):
                return item
    return None


def one_fx_node(function):
    """Makes `function` one node of a torch.fx graph: called on fx proxies (symbolic tracing), it
    records a call of itself instead of running, as torch.fx.wrap does for a module's own calls."""
    @functools.wraps(function)
    def traced(*args, **kwargs):
        proxy = _proxy_among((*args, kwargs))
        if proxy is not None:
            return proxy.tracer.create_proxy("call_function", traced, args, kwargs)
        return function(*args, **kwargs)
    return traced


def simd_target():
    """The SIMD target qkv's kernels run on here (e.g. "AVX3" for AVX-512)."""
    return _qkv.simd_target()


def _is_torch(x):
    return torch is not None and isinstance(x, torch.Tensor)


def _numpy_view(x, name):
    """x as a NumPy array over the same memory: NumPy arrays as they are, CPU torch tensors through
    .numpy() (bfloat16 as its uint16 bits); other sequences through np.asarray."""
    if x is None:
        return None
    if _is_torch(x):
        if x.device.type != "cpu":
            raise Error(f"{name}: expected a CPU tensor, got one on {x.device}")
        x = x.detach()
        if x.dtype == torch.bfloat16:
            return x.view(torch.int16).numpy().view(np.uint16)
        return x.numpy()
    if isinstance(x, np.ndarray):
        return x
    return np.asarray(x)


def _empty(shape, dtype, like_torch):
    """An uninitialized result: a torch tensor (dtype a torch dtype) or a NumPy array.

    Torch results are NumPy memory seen by torch.from_numpy: glibc's malloc keeps freed blocks of
    this size for reuse, where a fresh torch.empty pays a page fault per 4 KiB on first write
    (13 ms for the 8 MiB output of B1 H8 N4096 D64 here)."""
    if not like_torch:
        return np.empty(shape, dtype=dtype)
    if dtype == torch.bfloat16:
        return torch.from_numpy(np.empty(shape, dtype=np.int16)).view(torch.bfloat16)
    numpy_dtype = {torch.float32: np.float32, torch.float64: np.float64,
                   torch.float16: np.float16}[dtype]
    return torch.from_numpy(np.empty(shape, dtype=numpy_dtype))


def _result_dtypes(v):
    """(dtype of O, dtype of LSE and P) for values v: O in v's dtype; LSE and P in float32, or
    float64 for float64 inputs."""
    if _is_torch(v):
        wide = torch.float64 if v.dtype == torch.float64 else torch.float32
        return v.dtype, wide
    dtype = np.asarray(v).dtype if not isinstance(v, np.ndarray) else v.dtype
    wide = np.float64 if dtype == np.float64 else np.float32
    return dtype, wide


# Options that are tensors (not differentiated), and the one that is a block mask: torch calls hand
# them to the operator as tensors, so that a trace records them as inputs or constants.
_TENSOR_OPTIONS = ("alibi_slopes", "key_lengths", "key_starts", "mask")


class _Config:
    """What a call fixes besides its tensors: the keyword options of the C++ core (the tensors among
    them as given: NumPy arrays or torch tensors; block_mask a qkv.BlockMask), which results to
    return, the physical layout of O ("bnhd", or "bhnd" for PyTorch's layout), and the pieces of a
    built-in score_mod (kind, parameter index, constant), whose parameters come as tensors."""

    def __init__(self, options, want_lse, want_weights, out_layout="bnhd", score_pieces=None):
        self.options = options
        self.want_lse = want_lse
        self.want_weights = want_weights
        self.out_layout = out_layout
        self.score_pieces = score_pieces

    def options_with(self, parameters, score_parameters):
        """The core's options with the tensors of this call as NumPy views."""
        options = dict(self.options)
        for name in _TENSOR_OPTIONS:
            options[name] = _numpy_view(options.get(name), name)
        block_mask = options.get("block_mask")
        if block_mask is not None and not isinstance(block_mask, _qkv.BlockMask):
            options["block_mask"] = block_mask._native
        for name, value in parameters.items():
            options[name] = _numpy_view(value, name)
        if self.score_pieces is not None:
            options["score_pieces"] = self.score_pieces
            options["score_parameters"] = [_numpy_view(p, "score_mod parameter")
                                           for p in score_parameters]
        return options


def _allocate(config, q, k, v, like_torch, saved_lse=False):
    b, nq, hq, _ = q.shape
    nk, dv = k.shape[1], v.shape[3]
    out_dtype, wide = _result_dtypes(v)
    lse_dtype = torch.float64 if saved_lse else wide
    if config.out_layout == "bhnd":
        out = _empty((b, hq, nq, dv), out_dtype, like_torch)
        out = out.transpose(1, 2) if like_torch else out.swapaxes(1, 2)
    else:
        out = _empty((b, nq, hq, dv), out_dtype, like_torch)
    # LSE is kept whenever torch may differentiate: the backward recomputes P from it, so the
    # copy kept for it is float64 (a float32 LSE would cost the gradients |LSE|·2^-24).
    lse = _empty((b, hq, nq), lse_dtype, like_torch) if (config.want_lse or like_torch) else None
    weights = _empty((b, hq, nq, nk), wide, like_torch) if config.want_weights else None
    return out, lse, weights


def _check_rank4(q, k, v):
    for name, x in (("q", q), ("k", k), ("v", v)):
        if len(x.shape) != 4:
            raise Error(f"{name}: expected [B, N, H, D] (rank 4), got shape {tuple(x.shape)}")


def _forward(config, q, k, v, parameters, saved_lse=False, score_parameters=()):
    """O, LSE, P for [B, N, H, D] inputs of one kind (NumPy or torch), without autograd; with
    saved_lse, LSE in float64 (torch), as the backward wants it."""
    like_torch = _is_torch(q)
    out, lse, weights = _allocate(config, q, k, v, like_torch, saved_lse)
    options = config.options_with(parameters, score_parameters)
    _qkv.forward(_numpy_view(q, "q"), _numpy_view(k, "k"), _numpy_view(v, "v"), options,
                 _numpy_view(out, "out"), _numpy_view(lse, "lse"), _numpy_view(weights, "weights"))
    return out, lse, weights


def _run(config, q, k, v, parameters, score_parameters=()):
    """(O, LSE, P) of [B, N, H, D] views; torch tensors go through the operator qkv::attention
    (_operators.py: differentiable, traceable, meta-aware), NumPy arrays straight to the core."""
    _check_rank4(q, k, v)
    tensors = [q, k, v, *parameters.values(), *score_parameters]
    kinds = {_is_torch(t) for t in tensors if t is not None}
    if len(kinds) > 1:
        raise TypeError("q, k, v and the parameters: expected all NumPy arrays or all torch "
                        "tensors, got a mix")
    if _is_torch(q):
        return _operators.attention(config, q, k, v, parameters, score_parameters)
    return _forward(config, q, k, v, parameters, score_parameters=score_parameters)


def _seed(dropout_p, seed):
    """The dropout seed: the caller's, else a fresh one from torch's (or NumPy's) generator."""
    if dropout_p == 0.0:
        return 0
    if seed is not None:
        return int(seed)
    if torch is not None:
        return int(torch.randint(0, 2**62, (1,)).item())
    return int(np.random.randint(0, 2**62))


@one_fx_node
def attention(q, k, v, *, score="scaled_dot", scale=None, w=None, wq=None, wk=None, va=None,
              temperature=None, softcap=0.0, alibi_slopes=None, bias=None, sinks=None, causal=False,
              causal_align="bottom-right", prefix_length=0, sink_tokens=0,
              normalization="softmax", sigmoid_bias=None, window=(-1, -1), key_lengths=None,
              key_starts=None, mask=None, return_lse=False,
              return_weights=False, dropout_p=0.0, dropout_seed=None, threads=None):
    """Attention in qkv's layout: q [B, Nq, Hq, Dq], k [B, Nk, Hk, Dk], v [B, Nk, Hk, Dv].

    score: "dot", "scaled_dot" (default scale 1/sqrt(Dq)), "bilinear" (w [Dq, Dk] or
    [Hq, Dq, Dk]), "additive" (wq [A, Dq], wk [A, Dk], va [A], or each with a leading Hq) or
    "cosine" (temperature [Hq] or [1] times q·k/(|q||k|); none: 1).
    softcap c > 0: s <- c·tanh(s/c). alibi_slopes [Hq] or [B, Hq]. bias: float, broadcastable to
    [B, Hq, Nq, Nk]. sinks [Hq]: one learned logit per query head that joins each row's softmax
    as a column with no value (gpt-oss; a sink of 0 is "softmax plus one").
    normalization "softmax" (default) or "sigmoid": P = sigmoid(s + sigmoid_bias) over the visible
    keys, no normalization over the row (Ramapuram et al., 2025), sigmoid_bias None = -log(Nk);
    LSE is then log Σ_j P_ij, the log of the row's total weight. causal with causal_align "bottom-right" (FlashAttention) or "top-left"
    (PyTorch); prefix_length P (with causal): the first P keys are visible to every query
    (prefix LM). window (left, right), -1 unbounded; sink_tokens n (with a left window edge): the
    first n keys stay visible past it (StreamingLLM). key_lengths [B] ints: keys j >= length are
    padding; key_starts [B] ints: keys j < start are padding too (left padding). mask: bool,
    broadcastable to [B, Hq, Nq, Nk], True = may attend. dropout_p on the weights, with
    dropout_seed (drawn when None). threads: None = as many as OpenMP's count, which PyTorch sets
    once torch is imported (torch.set_num_threads; until then its own choice, which was 1 on a
    2-core virtual machine), else OMP_NUM_THREADS or every core.

    Returns O [B, Nq, Hq, Dv] in v's dtype, followed by LSE [B, Hq, Nq] and the weights
    [B, Hq, Nq, Nk] when asked for (float32; float64 for float64 inputs). A query that sees no
    key gets O = 0, weights 0 and LSE = -inf (its sink with sinks), never NaN. Differentiable for
    torch tensors in q, k, v, w, wq, wk, va, temperature, sinks and bias.
    """
    options = dict(score=score, scale=scale, softcap=float(softcap), normalization=normalization,
        sigmoid_bias=None if sigmoid_bias is None else float(sigmoid_bias),
        alibi_slopes=alibi_slopes, causal=bool(causal), causal_align=causal_align,
        prefix_length=int(prefix_length), sink_tokens=int(sink_tokens),
        window_left=int(window[0]), window_right=int(window[1]),
        key_lengths=key_lengths, key_starts=key_starts, mask=mask,
        dropout=float(dropout_p), dropout_seed=_seed(dropout_p, dropout_seed),
        threads=0 if threads is None else int(threads))
    parameters = {n: t for n, t in (("w", w), ("wq", wq), ("wk", wk), ("va", va),
                                    ("temperature", temperature), ("sinks", sinks),
                                    ("bias", bias))
                  if t is not None}
    config = _Config(options, return_lse, return_weights)
    out, lse, weights = _run(config, q, k, v, parameters)
    results = (out,) + ((lse,) if return_lse else ()) + ((weights,) if return_weights else ())
    return results[0] if len(results) == 1 else results


def _swap(x, a, b):
    return x.transpose(a, b) if _is_torch(x) else np.swapaxes(x, a, b)


def _as_rank4(x, name):
    """[..., H, N, D] as [B, H, N, D]: rank 2 and 3 gain leading 1s, rank > 4 folds its batch
    dimensions (a view when the storage allows it)."""
    shape = tuple(x.shape)
    if len(shape) < 2:
        raise Error(f"{name}: expected [..., N, D] (rank >= 2), got shape {shape}")
    lead = shape[:-3] if len(shape) >= 3 else ()
    heads = shape[-3] if len(shape) >= 3 else 1
    batch = math.prod(int(n) for n in lead)
    return x.reshape((batch, heads) + shape[-2:])


def _dtype_name(x):
    return str(x.dtype).replace("torch.", "")


def _is_floating(x):
    if _is_torch(x):
        return x.is_floating_point()
    return np.issubdtype(np.asarray(x).dtype, np.floating)


def _is_bool(x):
    return x.dtype == torch.bool if _is_torch(x) else np.asarray(x).dtype == bool


def _float_mask_as_read(mask):
    """A float attn_mask as qkv reads it: one that nothing differentiates and that holds only 0
    and -inf, as torch.nn.Transformer.generate_square_subsequent_mask's does, is the boolean mask
    it spells (True where 0: may attend), which qkv reads as runs of keys and skips where a bias
    would be added to every pair; any other mask (numpy, meta or fake tensors: no values) is
    returned as it is, a bias."""
    if not _is_torch(mask) or (torch.is_grad_enabled() and mask.requires_grad):
        return mask
    if type(mask) is not torch.Tensor or mask.device.type != "cpu":
        return mask
    allowed = mask == 0
    return allowed if bool(torch.logical_or(allowed, torch.isneginf(mask)).all()) else mask


# One rule for the functions and the layers (PyTorch's scaled_dot_product_attention's).
_ATTN_MASK_WITH_IS_CAUSAL = ("attn_mask, is_causal: expected at most one of them (is_causal=True "
                             "is the causal mask itself: pass it alone, or attn_mask alone), "
                             "got both")


def _check_sdpa_arguments(query, key, value, attn_mask, dropout_p, is_causal, enable_gqa):
    """PyTorch's argument checks of scaled_dot_product_attention, one qkv.Error (a ValueError and
    a RuntimeError, as PyTorch raises) naming the argument, the expected and the given."""
    shapes = {"query": tuple(query.shape), "key": tuple(key.shape), "value": tuple(value.shape)}
    for name, shape in shapes.items():
        if len(shape) < 2:
            raise Error(f"{name}: expected at least 2 dimensions [..., N, E], got shape {shape}")
    if not (str(query.dtype) == str(key.dtype) == str(value.dtype)):
        raise Error(f"query, key, value: expected one dtype, got {_dtype_name(query)}, "
                    f"{_dtype_name(key)} and {_dtype_name(value)}")
    q_shape, k_shape, v_shape = shapes["query"], shapes["key"], shapes["value"]
    if k_shape[-1] != q_shape[-1]:
        raise Error(f"key: expected the query's last dimension E = {q_shape[-1]}, got shape "
                    f"{k_shape}")
    if v_shape[-2] != k_shape[-2] or v_shape[:-2] != k_shape[:-2]:
        raise Error(f"value: expected [..., S, Ev] with key's leading dimensions and S = "
                    f"{k_shape[-2]}, got shape {v_shape} (key {k_shape})")
    if len(k_shape) != len(q_shape) or k_shape[:-3] != q_shape[:-3]:
        raise Error(f"key: expected the query's batch dimensions {q_shape[:-3]} (rank "
                    f"{len(q_shape)}), got shape {k_shape}")
    q_heads = q_shape[-3] if len(q_shape) >= 3 else 1
    kv_heads = k_shape[-3] if len(k_shape) >= 3 else 1
    if q_heads != kv_heads and not (enable_gqa and kv_heads > 0 and q_heads % kv_heads == 0):
        expected = "a divisor of the query's" if enable_gqa else "the query's (or enable_gqa=True)"
        raise Error(f"key, value: expected {expected} {q_heads} heads, got {kv_heads}")
    if not 0.0 <= float(dropout_p) < 1.0:
        raise Error(f"dropout_p: expected a probability in [0, 1), got {dropout_p}")
    if attn_mask is None:
        return
    if is_causal:
        raise Error(_ATTN_MASK_WITH_IS_CAUSAL)
    if not (_is_bool(attn_mask) or _is_floating(attn_mask)):
        raise Error(f"attn_mask: expected dtype bool or a floating dtype, got "
                    f"{_dtype_name(attn_mask)}")
    target = q_shape[:-1] + (k_shape[-2],)
    mask_shape = tuple(attn_mask.shape)
    fits = len(mask_shape) <= len(target) and all(
        m in (1, t) for m, t in zip(reversed(mask_shape), reversed(target)))
    if not fits:
        raise Error(f"attn_mask: expected a shape broadcastable to [..., L, S] = {list(target)}, "
                    f"got {list(mask_shape)}")


@one_fx_node
def scaled_dot_product_attention(query, key, value, attn_mask=None, dropout_p=0.0,
                                 is_causal=False, scale=None, enable_gqa=False):
    """torch.nn.functional.scaled_dot_product_attention, computed by qkv.

    query [..., Hq, L, E], key [..., Hk, S, E], value [..., Hk, S, Ev] (rank 2 and 3 too).
    attn_mask: bool (True = take part in attention) or float (added; one of only 0 and -inf
    that nothing differentiates is taken as the boolean mask it is), broadcastable to
    [..., Hq, L, S]; is_causal: top-left causal mask (an error together with attn_mask).
    scale defaults to 1/sqrt(E). enable_gqa lets Hq be a multiple of Hk. Returns
    [..., Hq, L, Ev]. Unlike PyTorch, a query that may attend to no key gets 0, not NaN.
    """
    _check_sdpa_arguments(query, key, value, attn_mask, dropout_p, is_causal, enable_gqa)
    q, k, v = (_as_rank4(x, n) for x, n in ((query, "query"), (key, "key"), (value, "value")))
    options = dict(score="scaled_dot", scale=scale, causal=bool(is_causal),
                   causal_align="top-left", dropout=float(dropout_p),
                   dropout_seed=_seed(dropout_p, None))
    parameters = {}
    if attn_mask is not None:
        mask = attn_mask
        if len(query.shape) > 4 and len(mask.shape) >= 4:
            # The query's batch dimensions are folded into one: fold the mask's alike, each
            # broadcast dimension first widened to the query's.
            full = (1,) * (len(query.shape) - len(mask.shape)) + tuple(mask.shape)
            widened = tuple(query.shape[:-3]) + full[-3:]
            mask = (mask.reshape(full).expand(widened) if _is_torch(mask) else
                    np.broadcast_to(np.reshape(mask, full), widened))
            mask = mask.reshape((-1,) + full[-3:])
        if not _is_bool(mask):
            mask = _float_mask_as_read(mask)
        if _is_bool(mask):
            options["mask"] = mask
        else:
            parameters["bias"] = mask
    config = _Config(options, False, False, out_layout="bhnd")
    out, _, _ = _run(config, _swap(q, 1, 2), _swap(k, 1, 2), _swap(v, 1, 2), parameters)
    out = _swap(out, 1, 2)  # [B, Hq, L, Ev], dense
    return out.reshape(tuple(query.shape[:-1]) + (value.shape[-1],))


def _flash_options(q, dropout_p, softmax_scale, causal, window_size, softcap, alibi_slopes,
                   seed):
    scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(q.shape[-1])
    return dict(score="dot", scale=float(scale), softcap=float(softcap), causal=bool(causal),
                causal_align="bottom-right", window_left=int(window_size[0]),
                window_right=int(window_size[1]),
                alibi_slopes=alibi_slopes, dropout=float(dropout_p),
                dropout_seed=seed)


@one_fx_node
def flash_attn_func(q, k, v, dropout_p=0.0, softmax_scale=None, causal=False,
                    window_size=(-1, -1), softcap=0.0, alibi_slopes=None, deterministic=True,
                    return_attn_probs=False, sinks=None):
    """flash_attn.flash_attn_func on the CPU: q [B, Nq, Hq, D], k and v [B, Nk, Hk, D].

    Bottom-right causal, sliding window_size (left, right) (-1 = unbounded), softcap, ALiBi
    slopes [Hq] or [B, Hq], softmax_scale default 1/sqrt(D); qkv adds sinks [Hq] (learned
    attention sinks, differentiable; see qkv.attention). qkv's backward is always
    deterministic (the flag is accepted for compatibility). Returns out [B, Nq, Hq, D], or
    (out, softmax_lse [B, Hq, Nq], attention probabilities [B, Hq, Nq, Nk]) with
    return_attn_probs.
    """
    del deterministic  # always so
    options = _flash_options(q, dropout_p, softmax_scale, causal, window_size, softcap,
                             alibi_slopes, _seed(dropout_p, None))
    config = _Config(options, return_attn_probs, return_attn_probs)
    out, lse, weights = _run(config, q, k, v, _sinks_parameter(sinks))
    return (out, lse, weights) if return_attn_probs else out


def _sinks_parameter(sinks):
    return {} if sinks is None else {"sinks": sinks}


@one_fx_node
def flash_attn_varlen_func(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                           dropout_p=0.0, softmax_scale=None, causal=False, window_size=(-1, -1),
                           softcap=0.0, alibi_slopes=None, deterministic=True,
                           return_attn_probs=False, sinks=None, block_table=None, seqused_k=None):
    """flash_attn.flash_attn_varlen_func on the CPU: sequences packed along the first dimension,
    q [total_q, Hq, D], k and v [total_k, Hk, D], sequence i at cu_seqlens[i] : cu_seqlens[i + 1].
    sinks [Hq]: as in flash_attn_func, the same for every sequence. seqused_k [B]: sequence i
    uses only its first seqused_k[i] keys. block_table [B, max_blocks]: k and v are a paged KV
    cache [num_blocks, page_size, Hk, D] (ragged prefill against it, as in
    flash_attn_with_kvcache; forward only, without dropout or probabilities), sequence i's keys
    in the pages of row i, cu_seqlens_k giving their counts.

    Returns out [total_q, Hq, D], or (out, softmax_lse [Hq, total_q], a list of each sequence's
    probabilities [Hq, Nq_i, Nk_i]) with return_attn_probs.
    """
    del deterministic
    paged = block_table is not None
    starts_q = [int(x) for x in _numpy_view(cu_seqlens_q, "cu_seqlens_q")]
    starts_k = [int(x) for x in _numpy_view(cu_seqlens_k, "cu_seqlens_k")]
    if len(starts_q) != len(starts_k) or len(starts_q) < 1:
        raise Error(f"cu_seqlens_q, cu_seqlens_k: expected the same number (>= 1) of "
                    f"offsets, got {len(starts_q)} and {len(starts_k)}")
    for name, starts, total, longest in (("cu_seqlens_q", starts_q, q.shape[0], max_seqlen_q),
                                          ("cu_seqlens_k", starts_k, k.shape[0], max_seqlen_k)):
        lengths = np.diff(starts)
        ends_at_total = starts[-1] == total or (paged and name == "cu_seqlens_k")
        if starts[0] != 0 or not ends_at_total or (lengths < 0).any():
            raise Error(f"{name}: expected offsets rising from 0 to {total}, got {starts}")
        if len(lengths) and lengths.max() > longest:
            raise Error(f"{name}: expected sequences of at most {longest} (the max_seqlen), "
                        f"got {lengths.max()}")
    counts = list(np.diff(starts_k))
    if seqused_k is not None:
        used = [int(x) for x in _numpy_view(seqused_k, "seqused_k")]
        if len(used) != len(counts) or any(not 0 <= u <= c for u, c in zip(used, counts)):
            raise Error(f"seqused_k: expected [B] = [{len(counts)}] counts each within its "
                        f"sequence's keys {counts}, got {used}")
        counts = used
    if paged and (dropout_p or return_attn_probs):
        raise Error("block_table: expected neither dropout nor the probabilities with a paged "
                    "cache (forward only), got " + ("dropout_p > 0" if dropout_p else
                                                    "return_attn_probs=True"))
    seed = _seed(dropout_p, None)
    outs, lses, probs = [], [], []
    for i in range(len(starts_q) - 1):
        qi = q[starts_q[i]:starts_q[i + 1]][None]
        slopes = alibi_slopes
        if slopes is not None and len(slopes.shape) == 2:
            slopes = slopes[i]
        if paged:
            from ._kv_cache import flash_attn_with_kvcache
            out, lse = flash_attn_with_kvcache(
                qi, k, v, cache_seqlens=int(counts[i]), block_table=block_table[i:i + 1],
                softmax_scale=softmax_scale, causal=causal, window_size=window_size,
                softcap=softcap, alibi_slopes=slopes, return_softmax_lse=True, sinks=sinks)
            outs.append(out[0])
            lses.append(lse[0])
            continue
        ki = k[starts_k[i]:starts_k[i] + counts[i]][None]
        vi = v[starts_k[i]:starts_k[i] + counts[i]][None]
        options = _flash_options(q, dropout_p, softmax_scale, causal, window_size, softcap,
                                 slopes, seed + i if dropout_p else 0)
        config = _Config(options, True, return_attn_probs)
        out, lse, weights = _run(config, qi, ki, vi, _sinks_parameter(sinks))
        outs.append(out[0])
        lses.append(lse[0])
        probs.append(None if weights is None else weights[0])
    cat = torch.cat if _is_torch(q) else np.concatenate
    out = cat(outs, 0) if outs else q[:0]
    if not return_attn_probs:
        return out
    return out, cat(lses, 1), probs


if torch is not None:  # the operators need the helpers above
    from . import _operators
