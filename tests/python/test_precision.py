"""Gradients as precise as PyTorch's float32 (and bfloat16) math, by FlashAttention's own rule.

For each case of a grid, three computations on the same rounded inputs:
  reference: the formula evaluated literally in float64;
  plain:     the same literal formula run by PyTorch in the inputs' precision (float32 or
             bfloat16: FlashAttention's `attention_ref(upcast=False)`);
  qkv:       qkv's forward and fused backward through torch.autograd.
The rule (FlashAttention's tests): qkv's max error against the reference is at most 2× the plain
implementation's for the output and 3× for every gradient. A small absolute floor (one unit in
the last place of the largest reference value) keeps a case whose plain error is 0 meaningful
without letting a real difference through.

`python3 tests/python/test_precision.py` prints each case's ratios (the closing notes quote it).
"""
import math

import pytest

torch = pytest.importorskip("torch")
import qkv  # noqa: E402


def literal_attention(q, k, v, scale, softcap=0.0, causal=False, window=(-1, -1), alibi=None,
                      keep=None, dropout_p=0.0):
    """The contract's formula, tensor by tensor, in the inputs' own dtype.
    q [B, Nq, Hq, D], k/v [B, Nk, Hk, D]; keep [B, Hq, Nq, Nk] (bool) is the dropout mask."""
    b, nq, hq, _ = q.shape
    nk, hk = k.shape[1], k.shape[2]
    group = hq // hk
    qh = q.permute(0, 2, 1, 3)
    kh = k.permute(0, 2, 1, 3).repeat_interleave(group, dim=1)
    vh = v.permute(0, 2, 1, 3).repeat_interleave(group, dim=1)
    s = torch.matmul(qh, kh.transpose(-1, -2)) * scale
    if softcap > 0:
        s = softcap * torch.tanh(s / softcap)
    i = torch.arange(nq).view(nq, 1)
    j = torch.arange(nk).view(1, nk)
    diagonal = i + nk - nq  # bottom-right alignment (FlashAttention)
    if alibi is not None:
        s = s - alibi.view(1, hq, 1, 1).to(s.dtype) * (diagonal - j).abs().to(s.dtype)
    visible = torch.ones(nq, nk, dtype=torch.bool)
    if causal:
        visible &= j <= diagonal
    if window[0] >= 0:
        visible &= j >= diagonal - window[0]
    if window[1] >= 0:
        visible &= j <= diagonal + window[1]
    s = s.masked_fill(~visible, float("-inf"))
    p = torch.softmax(s, dim=-1)
    p = torch.nan_to_num(p, nan=0.0)  # rows that see no key
    if keep is not None:
        p = p * keep.to(p.dtype) / (1 - dropout_p)
    return torch.matmul(p, vh).permute(0, 2, 1, 3)


def make_inputs(case, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    b, nq, nk, hq, hk, d = case["shape"]
    magnitude = case.get("magnitude", 1.0)
    q = torch.randn(b, nq, hq, d, generator=g, dtype=torch.float64) * magnitude
    k = torch.randn(b, nk, hk, d, generator=g, dtype=torch.float64) * magnitude
    v = torch.randn(b, nk, hk, d, generator=g, dtype=torch.float64)
    dout = torch.randn(b, nq, hq, d, generator=g, dtype=torch.float64)
    return [x.to(dtype) for x in (q, k, v, dout)]


def dropout_keep(case, q, k, v, seed):
    """The dropout mask qkv draws for this seed: where its float64 weights are not zero."""
    _, weights = qkv.attention(q.double(), k.double(), v.double(), score="dot",
                               scale=case["scale"], return_weights=True,
                               dropout_p=case["dropout"], dropout_seed=seed,
                               causal=case.get("causal", False), window=case.get("window", (-1, -1)))
    return weights != 0


def errors(case, dtype, seed=0):
    """(max error of qkv, max error of the plain implementation, error floor) for the output and
    for dq, dk, dv, each against the float64 evaluation on the same rounded inputs."""
    q, k, v, dout = make_inputs(case, dtype, seed)
    dropout_p = case.get("dropout", 0.0)
    keep = dropout_keep(case, q, k, v, seed + 1) if dropout_p else None
    options = dict(scale=case["scale"], softcap=case.get("softcap", 0.0),
                   causal=case.get("causal", False), window=case.get("window", (-1, -1)),
                   alibi=case.get("alibi"))

    def run(kind, inputs):
        leaves = [x.detach().clone().requires_grad_() for x in inputs]
        if kind == "qkv":
            out = run_qkv(case, leaves, options, dropout_p, seed + 1)
        elif case.get("varlen"):  # each sequence alone, padded with zeros
            out = torch.stack([
                torch.cat([literal_attention(*(x[i:i + 1, :n] for x in leaves), **options)[0],
                           leaves[0].new_zeros((leaves[0].shape[1] - n,) +
                                               tuple(leaves[0].shape[2:]))])
                for i, n in enumerate(case["varlen"])])
        else:
            out = literal_attention(*leaves, keep=keep, dropout_p=dropout_p, **options)
        out.backward(dout.to(out.dtype))
        return [out.detach().double()] + [x.grad.double() for x in leaves]

    reference = run("literal", [x.double() for x in (q, k, v)])
    plain = run("literal", [q, k, v])
    fast = run("qkv", [q, k, v])
    result = {}
    for name, ref, pt, ours in zip(("out", "dq", "dk", "dv"), reference, plain, fast):
        floor = torch.finfo(dtype).eps * ref.abs().max().item()
        result[name] = ((ours - ref).abs().max().item(), (pt - ref).abs().max().item(), floor)
    return result


def run_qkv(case, leaves, options, dropout_p, seed):
    q, k, v = leaves
    if case.get("varlen"):
        # The batch packed as sequences of the lengths given, each its own attention.
        lengths = case["varlen"]
        b, nq, hq, d = q.shape
        starts = torch.tensor([0] + list(torch.tensor(lengths).cumsum(0)), dtype=torch.int32)
        rows = lambda x: torch.cat([x[i, :n] for i, n in enumerate(lengths)])  # noqa: E731
        out = qkv.flash_attn_varlen_func(rows(q), rows(k), rows(v), starts, starts, max(lengths),
                                         max(lengths), softmax_scale=options["scale"],
                                         causal=options["causal"], window_size=options["window"],
                                         softcap=options["softcap"],
                                         alibi_slopes=options["alibi"])
        padded = []
        for i, n in enumerate(lengths):
            piece = out[int(starts[i]):int(starts[i + 1])]
            padded.append(torch.cat([piece, piece.new_zeros((nq - n,) + tuple(piece.shape[1:]))]))
        return torch.stack(padded)
    return qkv.attention(q, k, v, score="dot", scale=options["scale"], softcap=options["softcap"],
                         causal=options["causal"], window=options["window"],
                         alibi_slopes=options["alibi"], dropout_p=dropout_p, dropout_seed=seed)


def _slopes(heads):
    return torch.tensor([2.0 ** (-8.0 * (h + 1) / heads) for h in range(heads)],
                        dtype=torch.float32)


D = 64
CASES = {
    "plain": dict(shape=(2, 96, 96, 4, 4, D)),
    "logits ±100": dict(shape=(2, 96, 96, 4, 4, D), magnitude=7.0),
    "soft cap 50, logits ±100": dict(shape=(2, 96, 96, 4, 4, D), magnitude=7.0, softcap=50.0),
    "soft cap 30": dict(shape=(1, 80, 112, 4, 4, D), magnitude=4.0, softcap=30.0),
    "GQA 8/2, causal": dict(shape=(2, 96, 96, 8, 2, D), magnitude=3.0, causal=True),
    "MQA 4/1, soft cap 50": dict(shape=(1, 64, 128, 4, 1, D), magnitude=7.0, softcap=50.0),
    "window (24, 8)": dict(shape=(2, 96, 96, 4, 4, D), magnitude=3.0, window=(24, 8)),
    "causal window 16, logits ±100": dict(shape=(1, 128, 128, 4, 4, D), magnitude=7.0,
                                           causal=True, window=(16, 0)),
    "ALiBi": dict(shape=(2, 96, 96, 4, 4, D), magnitude=2.0, alibi=_slopes(4)),
    "ALiBi, causal, logits ±100": dict(shape=(1, 96, 96, 4, 4, D), magnitude=7.0,
                                       alibi=_slopes(4), causal=True),
    "varlen": dict(shape=(3, 80, 80, 4, 2, D), magnitude=3.0, varlen=[80, 37, 1], causal=True),
    "varlen, soft cap 50": dict(shape=(3, 80, 80, 4, 4, D), magnitude=7.0, varlen=[17, 80, 64],
                                softcap=50.0),
    "dropout 0.17": dict(shape=(2, 96, 96, 4, 4, D), magnitude=2.0, dropout=0.17),
    "dropout, logits ±100": dict(shape=(1, 96, 96, 4, 4, D), magnitude=7.0, dropout=0.1),
    # One query row a head (decoding): many heads, so that a maximum over rows means something.
    "Nq 1, Nk 300": dict(shape=(4, 1, 300, 8, 8, D), magnitude=3.0),
    "Nq 1, Nk 500, logits ±100": dict(shape=(4, 1, 500, 8, 2, D), magnitude=7.0),
    "Nq 1, Nk 400, soft cap 50": dict(shape=(4, 1, 400, 8, 8, D), magnitude=7.0, softcap=50.0),
    "Nq 3, Nk 256, GQA 8/2, window": dict(shape=(4, 3, 256, 8, 2, D), magnitude=3.0,
                                           window=(128, 0), causal=True),
}
for _case in CASES.values():
    _case["scale"] = 1.0 / math.sqrt(_case["shape"][-1])

LIMITS = {"out": 2.0, "dq": 3.0, "dk": 3.0, "dv": 3.0}
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", CASES)
def test_within_flash_attention_rule(case, dtype):
    result = errors(CASES[case], DTYPES[dtype])
    for name, (ours, plain, floor) in result.items():
        assert ours <= LIMITS[name] * plain + floor, (
            f"{case} {dtype} {name}: qkv's error {ours:.3g} exceeds {LIMITS[name]}× the plain "
            f"{dtype} implementation's {plain:.3g} (+ floor {floor:.2g})")


def test_weights_precise_with_logits_of_1e4():
    """The returned weights, with logits near 1e4 (integer inputs of magnitude 100, D = 8, the dot
    score: every logit exact in float32), are within 2× a naive float32 softmax's error. A float32
    LSE alone would be off by up to half its unit in the last place, 2^-11 here (the old kernels:
    27× the naive error)."""
    g = torch.Generator().manual_seed(3)
    base = torch.randint(-100, 101, (1, 1, 2, 8), generator=g).double()
    q = torch.randint(-100, 101, (1, 48, 2, 8), generator=g).double()
    q[..., 7] = 1.0  # the last feature separates the keys by a few units: rows of many weights
    k = base.repeat(1, 64, 1, 1)
    k[..., 7] = torch.randint(-4, 5, (1, 64, 2), generator=g).double()
    v = torch.randn(1, 64, 2, 8, generator=g)
    _, weights = qkv.attention(q.float(), k.float(), v.float(), score="dot", return_weights=True)
    logits = torch.einsum("bihd,bjhd->bhij", q, k)
    assert 5e3 < logits.abs().max() < 1e5
    reference = torch.softmax(logits, -1)
    naive = torch.softmax(logits.float(), -1)
    ours = (weights.double() - reference).abs().max().item()
    plain = (naive.double() - reference).abs().max().item()
    rounded_lse = torch.logsumexp(logits, -1, keepdim=True).float().double()
    float32_lse = (torch.exp(logits - rounded_lse) - reference).abs().max().item()
    assert float32_lse > 10 * plain  # the case the rule is about
    assert ours <= 2 * plain + 1e-7, (ours, plain)


if __name__ == "__main__":
    print(f"{'case':34} {'dtype':9} " + " ".join(f"{n:>6}" for n in LIMITS) + "   (qkv error ÷ plain)")
    worst = {}
    for case_name, case in CASES.items():
        for dtype_name, dtype in DTYPES.items():
            result = errors(case, dtype)
            ratios = {n: ours / max(plain, 1e-30) for n, (ours, plain, _) in result.items()}
            for n, r in ratios.items():
                worst[(dtype_name, n)] = max(worst.get((dtype_name, n), 0.0), r)
            print(f"{case_name:34} {dtype_name:9} " +
                  " ".join(f"{ratios[n]:6.2f}" for n in LIMITS))
    for dtype_name in DTYPES:
        print(f"worst {dtype_name}: " +
              ", ".join(f"{n} {worst[(dtype_name, n)]:.2f}" for n in LIMITS))
