"""FlexAttention's API (torch.nn.attention.flex_attention) on qkv's kernels: block masks built once
from a vectorized mask_mod, and flex_attention with PyTorch's [B, H, N, D] layout and semantics.

A block mask runs natively: qkv skips its empty blocks and tests pairs only in its partial ones.
So do the score_mods of qkv.score_mods (ALiBi, soft cap, relative bias table, per-head scale, and
their compositions), forward and backward, with the gradients of their tensors. Any other
score_mod is a Python function, and Python has no compiler here: flex_attention evaluates it
vectorized on the [B, H, L, S] scores (O(L·S) memory, differentiable through torch autograd, for
tensors it captures too) and hands the modified scores to the fused kernel as a bias. Correct for
any score_mod; fast only as far as that matrix allows (docs/programmable.md)."""
import math

import numpy as np

from . import _qkv, score_mods
from ._functions import _Config, _is_torch, _run, _swap, one_fx_node
from ._qkv import Error

try:
    import torch
except ImportError:  # NumPy alone works
    torch = None

_EMPTY, _PARTIAL, _FULL = 0, 1, 2
# Pairs a mask_mod is evaluated on at once (bytes of booleans) while a block mask is built.
_PAIRS_PER_STEP = 1 << 24


def noop_mask(b, h, q_idx, kv_idx):
    """The mask_mod that lets every pair through."""
    ones = q_idx >= 0
    return ones & (kv_idx >= 0)


def _check_mask_mods(name, mask_mods):
    for mod in mask_mods:
        if not callable(mod):
            raise Error(f"{name}: expected mask_mod functions, got {type(mod).__name__}")


def and_masks(*mask_mods):
    """A mask_mod that lets a pair through where every one of mask_mods does (all pairs when
    given none, as PyTorch's)."""
    _check_mask_mods("and_masks", mask_mods)

    def combined(b, h, q_idx, kv_idx):
        result = noop_mask(b, h, q_idx, kv_idx)
        for mod in mask_mods:
            result = result & mod(b, h, q_idx, kv_idx)
        return result
    return combined


def or_masks(*mask_mods):
    """A mask_mod that lets a pair through where any of mask_mods does (none when given none)."""
    _check_mask_mods("or_masks", mask_mods)

    def combined(b, h, q_idx, kv_idx):
        result = ~noop_mask(b, h, q_idx, kv_idx)
        for mod in mask_mods:
            result = result | mod(b, h, q_idx, kv_idx)
        return result
    return combined


def _arange(n, use_torch):
    return torch.arange(n) if use_torch else np.arange(n)


def _as_bool_numpy(x):
    if _is_torch(x):
        return x.detach().to(torch.bool).numpy()
    return np.asarray(x, dtype=bool)


class BlockMask:
    """Which (b, h, q_idx, kv_idx) pairs may attend, block by block (FlexAttention's BlockMask).

    Built by create_block_mask. Attributes as PyTorch's: BLOCK_SIZE (q, kv), seq_lengths
    (Q_LEN, KV_LEN), shape (B, H, Q_LEN, KV_LEN) with 1 for a broadcast batch or head, mask_mod,
    and per query block the partial and full key blocks: kv_num_blocks and kv_indices,
    full_kv_num_blocks and full_kv_indices (int32; indices ascending, then padded with 0)."""

    def __init__(self, kinds, partial, shape, block_size, mask_mod):
        self._kinds = kinds  # uint8 [B, H, q_blocks, kv_blocks]: 0 empty, 1 partial, 2 full
        self.shape = shape
        self.seq_lengths = shape[2:]
        self.BLOCK_SIZE = block_size
        self.mask_mod = mask_mod
        self._native = _qkv.BlockMask(shape[0], shape[1], shape[2], shape[3], block_size[0],
                                      block_size[1], np.ascontiguousarray(kinds),
                                      np.ascontiguousarray(partial))
        if torch is not None:  # what torch.ops.qkv.attention reads, and its C++ mask made once
            from . import _operators
            self._kinds_tensor = torch.from_numpy(np.ascontiguousarray(kinds))
            self._partial_tensor = torch.from_numpy(np.ascontiguousarray(partial))
            _operators.register_block_mask(self._kinds_tensor, self._partial_tensor,
                                           [list(shape), list(block_size)], self._native)
        self.kv_num_blocks, self.kv_indices = self._indices(_PARTIAL)
        self.full_kv_num_blocks, self.full_kv_indices = self._indices(_FULL)

    def _indices(self, kind):
        chosen = self._kinds == kind
        counts = chosen.sum(axis=-1).astype(np.int32)
        # Stable sort puts the chosen blocks first, in ascending order.
        order = np.argsort(~chosen, axis=-1, kind="stable").astype(np.int32)
        order = np.where(np.arange(order.shape[-1]) < counts[..., None], order, 0).astype(np.int32)
        if torch is not None:
            return torch.from_numpy(counts), torch.from_numpy(order)
        return counts, order

    def sparsity(self):
        """The percentage of blocks that are empty (skipped), as PyTorch's BlockMask.sparsity."""
        return 100.0 * (1.0 - self._native.density())

    def to_dense(self):
        """The pairs themselves: bool [B, H, Q_LEN, KV_LEN] (mask_mod evaluated once more)."""
        return _evaluate(self.mask_mod, *self.shape, 0, self.shape[2], torch is not None)

    def __fx_create_arg__(self, tracer):
        """In a torch.fx graph: this mask as a constant of the traced module (get_attr), as fx
        keeps a constant tensor."""
        index = 0
        while hasattr(tracer.root, f"_block_mask_constant{index}"):
            if getattr(tracer.root, f"_block_mask_constant{index}") is self:
                break
            index += 1
        name = f"_block_mask_constant{index}"
        setattr(tracer.root, name, self)
        return tracer.create_node("get_attr", name, (), {})

    def __repr__(self):
        return (f"BlockMask(shape={self.shape}, sparsity={self.sparsity():.2f}%, "
                f"BLOCK_SIZE={self.BLOCK_SIZE})")


def _evaluate(mask_mod, batch, heads, q_len, kv_len, q_begin, q_end, use_torch):
    """mask_mod on index tensors of every pair of query rows [q_begin, q_end), broadcast to
    bool [batch, heads, rows, kv_len]."""
    b = _arange(batch, use_torch).reshape(batch, 1, 1, 1)
    h = _arange(heads, use_torch).reshape(1, heads, 1, 1)
    q_idx = _arange(q_len, use_torch)[q_begin:q_end].reshape(1, 1, -1, 1)
    kv_idx = _arange(kv_len, use_torch).reshape(1, 1, 1, kv_len)
    visible = mask_mod(b, h, q_idx, kv_idx)
    shape = (batch, heads, q_end - q_begin, kv_len)
    if _is_torch(visible):
        return visible.to(torch.bool).expand(shape)
    return np.broadcast_to(np.asarray(visible, dtype=bool), shape)


def create_block_mask(mask_mod, B, H, Q_LEN, KV_LEN, device="cpu", BLOCK_SIZE=128,
                      _compile=False):
    """A BlockMask from mask_mod(b, h, q_idx, kv_idx) -> bool, PyTorch's signature.

    mask_mod is called vectorized, as PyTorch evaluates it: on index tensors that broadcast to
    [B, H, rows, KV_LEN] (torch tensors when torch is installed), one band of query blocks at a
    time. B or H None: the mask does not depend on it (one copy serves every batch or head).
    BLOCK_SIZE: an int, or (Q_BLOCK_SIZE, KV_BLOCK_SIZE). device must be the CPU; _compile is
    accepted and ignored."""
    del _compile
    if str(device) != "cpu":
        raise Error(f"device: expected 'cpu' (qkv computes on the CPU), got '{device}'")
    q_block, kv_block = (BLOCK_SIZE, BLOCK_SIZE) if np.isscalar(BLOCK_SIZE) else BLOCK_SIZE
    batch, heads = (1 if B is None else int(B)), (1 if H is None else int(H))
    q_len, kv_len, q_block, kv_block = int(Q_LEN), int(KV_LEN), int(q_block), int(kv_block)
    for name, value, least in (("B", batch, 1), ("H", heads, 1), ("Q_LEN", q_len, 0),
                               ("KV_LEN", kv_len, 0), ("BLOCK_SIZE", q_block, 1),
                               ("BLOCK_SIZE", kv_block, 1)):
        if value < least:
            raise Error(f"{name}: expected >= {least}, got {value}")
    q_blocks, kv_blocks = -(-q_len // q_block), -(-kv_len // kv_block)
    kinds = np.zeros((batch, heads, q_blocks, kv_blocks), dtype=np.uint8)
    partial = []  # (flat block index, its q_block × kv_block pairs)
    band = max(1, _PAIRS_PER_STEP // max(1, batch * heads * q_block * kv_len))
    use_torch = torch is not None
    for qb0 in range(0, q_blocks, band):
        qb1 = min(q_blocks, qb0 + band)
        rows = _as_bool_numpy(_evaluate(mask_mod, batch, heads, q_len, kv_len, qb0 * q_block,
                                        min(q_len, qb1 * q_block), use_torch))
        padded = np.zeros((batch, heads, (qb1 - qb0) * q_block, kv_blocks * kv_block), bool)
        padded[:, :, :rows.shape[2], :kv_len] = rows
        blocks = padded.reshape(batch, heads, qb1 - qb0, q_block, kv_blocks, kv_block)
        blocks = blocks.transpose(0, 1, 2, 4, 3, 5)  # [B, H, qb, kb, q_block, kv_block]
        visible = blocks.sum(axis=(-1, -2))
        q_sizes = np.minimum(q_block, q_len - np.arange(qb0, qb1) * q_block)
        kv_sizes = np.minimum(kv_block, kv_len - np.arange(kv_blocks) * kv_block)
        pairs = q_sizes[:, None] * kv_sizes[None, :]
        band_kinds = np.where(visible == 0, _EMPTY, np.where(visible == pairs, _FULL, _PARTIAL))
        kinds[:, :, qb0:qb1, :] = band_kinds
        for b, h, qb, kb in zip(*np.nonzero(band_kinds == _PARTIAL)):
            flat = ((b * heads + h) * q_blocks + qb0 + qb) * kv_blocks + kb
            partial.append((flat, blocks[b, h, qb, kb].astype(np.uint8)))
    partial.sort(key=lambda item: item[0])
    pairs = (np.stack([p for _, p in partial]) if partial else
             np.zeros((0, q_block, kv_block), np.uint8))
    return BlockMask(kinds, pairs, (batch, heads, q_len, kv_len), (q_block, kv_block), mask_mod)


def _check_flex_arguments(query, key, value, block_mask, enable_gqa):
    """FlexAttention's argument checks, as one qkv.Error naming the argument."""
    for name, x in (("query", query), ("key", key), ("value", value)):
        if len(x.shape) != 4:
            raise Error(f"{name}: expected [B, H, N, D] (rank 4), got shape {tuple(x.shape)}")
    if not (str(query.dtype) == str(key.dtype) == str(value.dtype)):
        raise Error(f"query, key, value: expected one dtype, got {query.dtype}, {key.dtype} and "
                    f"{value.dtype}")
    b, hq, q_len, e = query.shape
    _, hk, kv_len, _ = key.shape
    if key.shape[0] != b or key.shape[3] != e:
        raise Error(f"key: expected [B, Hkv, S, E] = [{b}, Hkv, S, {e}], got "
                    f"{list(key.shape)}")
    if tuple(value.shape[:3]) != tuple(key.shape[:3]):
        raise Error(f"value: expected [B, Hkv, S, Ev] = [{b}, {hk}, {kv_len}, Ev], got "
                    f"{list(value.shape)}")
    if hq != hk and not (enable_gqa and hk > 0 and hq % hk == 0):
        expected = "a divisor of the query's" if enable_gqa else "the query's (or enable_gqa=True)"
        raise Error(f"key, value: expected {expected} {hq} heads, got {hk}")
    if block_mask is not None:
        mb, mh, mq, mk = block_mask.shape
        if mb not in (1, b) or mh not in (1, hq) or (mq, mk) != (q_len, kv_len):
            raise Error(f"block_mask: expected shape (1 or {b}, 1 or {hq}, {q_len}, {kv_len}), "
                        f"got {block_mask.shape}")


def _modified_scores(query, key, score_mod, scale):
    """score_mod(q·kᵀ·scale, b, h, q_idx, kv_idx), [B, Hq, L, S], in the query's dtype."""
    b, hq, q_len, _ = query.shape
    group = hq // key.shape[1]
    if _is_torch(query):
        keys = key.repeat_interleave(group, dim=1) if group > 1 else key
        scores = torch.matmul(query, keys.transpose(-1, -2)) * scale
        use_torch = True
    else:
        keys = np.repeat(key, group, axis=1) if group > 1 else key
        scores = np.matmul(query, np.swapaxes(keys, -1, -2)) * np.asarray(scale, query.dtype)
        use_torch = False
    kv_len = key.shape[2]
    index = (_arange(b, use_torch).reshape(b, 1, 1, 1), _arange(hq, use_torch).reshape(1, hq, 1, 1),
             _arange(q_len, use_torch).reshape(1, 1, q_len, 1),
             _arange(kv_len, use_torch).reshape(1, 1, 1, kv_len))
    modified = score_mod(scores, *index)
    if _is_torch(modified):
        return modified.to(query.dtype).expand(scores.shape)
    return np.broadcast_to(np.asarray(modified, dtype=query.dtype), scores.shape)


@one_fx_node
def flex_attention(query, key, value, score_mod=None, block_mask=None, scale=None,
                   enable_gqa=False, return_lse=False, kernel_options=None, sinks=None):
    """torch.nn.attention.flex_attention.flex_attention on the CPU, with a backward.

    query [B, Hq, L, E], key [B, Hkv, S, E], value [B, Hkv, S, Ev] (torch tensors or NumPy
    arrays; float32, float64 or bfloat16). The score of a pair is q·k·scale (scale default
    1/sqrt(E)), then score_mod(score, b, h, q_idx, kv_idx) when given; pairs the block_mask hides
    are left out of the softmax. Returns out [B, Hq, L, Ev] in the query's dtype, and with
    return_lse also LSE [B, Hq, L] (natural log, float32; float64 for float64 inputs). A query
    that sees no key gets out 0 and LSE -inf, as PyTorch's. qkv adds sinks [Hq]: learned
    attention sinks (see qkv.attention; such a query then gets LSE = its sink). Differentiable for
    torch tensors: query, key, value, sinks and whatever a score_mod reads. kernel_options is
    accepted and ignored.
    """
    del kernel_options
    _check_flex_arguments(query, key, value, block_mask, enable_gqa)
    scale = 1.0 / math.sqrt(query.shape[-1]) if scale is None else float(scale)
    options = dict(score="dot", scale=scale,
                   block_mask=block_mask)
    parameters, pieces, score_parameters = {}, None, []
    if sinks is not None:
        parameters["sinks"] = sinks
    if isinstance(score_mod, score_mods.ScoreMod):  # native: the kernels run its pieces
        pieces, score_parameters = score_mod._native(query.shape[1])
    elif score_mod is not None:
        # The general path: the kernel's own product is switched off (scale 0) and the modified
        # scores come in as a bias, whose gradient autograd carries back through score_mod.
        options["scale"] = 0.0
        parameters["bias"] = _modified_scores(query, key, score_mod, scale)
    config = _Config(options, return_lse, False, out_layout="bhnd", score_pieces=pieces)
    out, lse, _ = _run(config, _swap(query, 1, 2), _swap(key, 1, 2), _swap(value, 1, 2),
                       parameters, score_parameters)
    out = _swap(out, 1, 2)
    return (out, lse) if return_lse else out
