"""`qkv attention` against a NumPy float64 evaluation of the contract, and every way its input
can be bad: one line on stderr, exit status 2, no output file left behind."""
import os
import subprocess

import numpy as np
import pytest

from contract import attention

QKV = os.environ.get("QKV_BIN", "qkv")


def run(*args, cwd):
    return subprocess.run([QKV, *map(str, args)], cwd=cwd, capture_output=True, text=True, timeout=120)


def save(folder, name, array):
    path = folder / name
    np.save(path, array)
    return path


def as_files(array4, rank):
    """[B, N, H, D] (B = H = 1 for rank 2, B = 1 for rank 3) in a file's layout."""
    return {4: array4, 3: array4[0], 2: array4[0, :, 0, :]}[rank]


def drop_leading(array, rank, kind):
    """LSE [B, H, Nq] / P [B, H, Nq, Nk] as the file of a rank-`rank` Q holds them."""
    return {4: array, 3: array[0], 2: array[0, 0]}[rank]


CASES = [
    dict(name="rank2_scaled_dot", rank=2, b=1, nq=7, nk=9, hq=1, hk=1, dq=5, dv=3),
    dict(name="rank3_gqa_causal", rank=3, b=1, nq=12, nk=20, hq=4, hk=2, dq=8, dv=6, causal=True),
    dict(name="rank4_dot_window_lengths", rank=4, b=3, nq=10, nk=17, hq=2, hk=1, dq=4, dv=4,
         score="dot", window=(3, 1), key_lengths=True),
    dict(name="rank4_bilinear_perhead_alibi_bias", rank=4, b=2, nq=6, nk=11, hq=2, hk=2, dq=5, dk=7,
         dv=3, score="bilinear", per_head=True, alibi=True, bias=True),
    dict(name="rank3_additive_mask_softcap", rank=3, b=1, nq=9, nk=13, hq=2, hk=1, dq=4, dk=6, dv=5,
         score="additive", mask=True, softcap=2.0, scale=0.7),
    dict(name="rank2_causal_topleft_float64", rank=2, b=1, nq=8, nk=12, hq=1, hk=1, dq=3, dv=2,
         causal=True, causal_align="top-left", dtype=np.float64),
    dict(name="rank4_empty_rows", rank=4, b=2, nq=9, nk=4, hq=1, hk=1, dq=3, dv=3, causal=True,
         key_lengths=True),
    dict(name="rank3_prefix_lm", rank=3, b=1, nq=14, nk=14, hq=2, hk=2, dq=4, dv=4, causal=True,
         prefix_length=5),
    dict(name="rank4_cosine_temperature", rank=4, b=2, nq=7, nk=9, hq=2, hk=1, dq=5, dv=3,
         score="cosine", window=(3, 1)),
    dict(name="rank4_sinks_empty_rows", rank=4, b=2, nq=9, nk=4, hq=2, hk=1, dq=3, dv=3,
         causal=True, key_lengths=True, sinks=True),
    dict(name="rank3_sink_tokens_window", rank=3, b=1, nq=16, nk=16, hq=2, hk=1, dq=4, dv=4,
         causal=True, window=(3, 0), sink_tokens=2),
    dict(name="rank3_sigmoid_empty_rows", rank=3, b=1, nq=9, nk=13, hq=2, hk=1, dq=4, dv=5,
         mask=True, normalization="sigmoid"),
    dict(name="rank4_sigmoid_bias_float64", rank=4, b=2, nq=6, nk=8, hq=2, hk=2, dq=3, dv=3,
         causal=True, normalization="sigmoid", sigmoid_bias=0.7, dtype=np.float64),
]


@pytest.mark.parametrize("case", CASES, ids=[c["name"] for c in CASES])
def test_matches_numpy_contract(case, tmp_path):
    rng = np.random.default_rng(abs(hash(case["name"])) % 2**32)
    dtype = case.get("dtype", np.float32)
    b, nq, nk, hq, hk = case["b"], case["nq"], case["nk"], case["hq"], case["hk"]
    dq, dv = case["dq"], case["dv"]
    dk = case.get("dk", dq)
    rank = case["rank"]
    q = rng.standard_normal((b, nq, hq, dq)).astype(dtype)
    k = rng.standard_normal((b, nk, hk, dk)).astype(dtype)
    v = rng.standard_normal((b, nk, hk, dv)).astype(dtype)
    args = ["attention", "--q", save(tmp_path, "q.npy", as_files(q, rank)),
            "--k", save(tmp_path, "k.npy", as_files(k, rank)),
            "--v", save(tmp_path, "v.npy", as_files(v, rank)),
            "--out", tmp_path / "o.npy", "--lse", tmp_path / "lse.npy", "--weights", tmp_path / "p.npy"]
    kwargs = {}
    score = case.get("score", "scaled_dot")
    args += ["--score", score]
    kwargs["score"] = score
    lead = (hq,) if case.get("per_head") else ()
    if score == "bilinear":
        kwargs["w"] = rng.standard_normal(lead + (dq, dk)).astype(np.float32)
        args += ["--w", save(tmp_path, "w.npy", kwargs["w"])]
    if score == "additive":
        a = 5
        kwargs["wq"] = rng.standard_normal(lead + (a, dq)).astype(np.float32)
        kwargs["wk"] = rng.standard_normal(lead + (a, dk)).astype(np.float32)
        kwargs["va"] = rng.standard_normal(lead + (a,)).astype(np.float32)
        for name in ("wq", "wk", "va"):
            args += [f"--{name}", save(tmp_path, f"{name}.npy", kwargs[name])]
    if score == "cosine":
        kwargs["temperature"] = (2.0 + rng.random(hq) * 3.0).astype(np.float32)
        args += ["--temperature", save(tmp_path, "temperature.npy", kwargs["temperature"])]
    if "scale" in case:
        kwargs["scale"] = case["scale"]
        args += ["--scale", case["scale"]]
    if "softcap" in case:
        kwargs["softcap"] = case["softcap"]
        args += ["--softcap", case["softcap"]]
    if case.get("alibi"):
        kwargs["alibi"] = (2.0 ** -np.arange(1, hq + 1)).astype(np.float32)
        args += ["--alibi", save(tmp_path, "alibi.npy", kwargs["alibi"])]
    if "normalization" in case:
        kwargs["normalization"] = case["normalization"]
        args += ["--normalization", case["normalization"]]
    if "sigmoid_bias" in case:
        kwargs["sigmoid_bias"] = case["sigmoid_bias"]
        args += ["--sigmoid-bias", case["sigmoid_bias"]]
    if case.get("sinks"):
        kwargs["sinks"] = rng.standard_normal(hq).astype(np.float32)
        args += ["--sinks", save(tmp_path, "sinks.npy", kwargs["sinks"])]
    if case.get("bias"):
        kwargs["bias"] = rng.standard_normal((nq, nk)).astype(np.float32)
        args += ["--bias", save(tmp_path, "bias.npy", kwargs["bias"])]
    if case.get("mask"):
        kwargs["mask"] = rng.random((hq, nq, nk)) < 0.6
        kwargs["mask"][0, 2, :] = False
        args += ["--mask", save(tmp_path, "mask.npy", kwargs["mask"])]
    if case.get("causal"):
        kwargs["causal"] = True
        args += ["--causal"]
    if "causal_align" in case:
        kwargs["causal_align"] = case["causal_align"]
        args += ["--causal-align", case["causal_align"]]
    if "window" in case:
        kwargs["window"] = case["window"]
        args += ["--window", "{},{}".format(*case["window"])]
    if "sink_tokens" in case:
        kwargs["sink_tokens"] = case["sink_tokens"]
        args += ["--sink-tokens", case["sink_tokens"]]
    if "prefix_length" in case:
        kwargs["prefix_length"] = case["prefix_length"]
        args += ["--prefix-length", str(case["prefix_length"])]
    if case.get("key_lengths"):
        kwargs["key_lengths"] = np.array([nk // 2, 0, nk][:b], dtype=np.int64)
        args += ["--key-lengths", save(tmp_path, "kl.npy", kwargs["key_lengths"])]

    result = run(*args, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    want_o, want_lse, want_p = attention(q, k, v, **kwargs)
    o, lse, p = (np.load(tmp_path / f) for f in ("o.npy", "lse.npy", "p.npy"))
    assert o.dtype == v.dtype and o.shape == as_files(want_o, rank).shape
    assert lse.dtype == np.float32 and lse.shape == drop_leading(want_lse, rank, "lse").shape
    assert p.dtype == (np.float64 if dtype == np.float64 else np.float32)
    assert p.shape == drop_leading(want_p, rank, "p").shape
    tolerance = 1e-12 if dtype == np.float64 else 1e-5
    assert np.abs(o - as_files(want_o, rank)).max() <= tolerance * (1 + np.abs(want_o).max())
    assert np.abs(p - drop_leading(want_p, rank, "p")).max() <= tolerance
    want_lse = drop_leading(want_lse, rank, "lse")
    assert np.array_equal(np.isinf(lse), np.isinf(want_lse))
    finite = np.isfinite(want_lse)
    assert np.abs(lse[finite] - want_lse[finite]).max() <= 1e-5 * (1 + np.abs(want_lse[finite]).max())
    assert not np.isnan(o).any()


@pytest.fixture
def inputs(tmp_path):
    rng = np.random.default_rng(0)
    save(tmp_path, "q.npy", rng.standard_normal((5, 2, 4)).astype(np.float32))
    save(tmp_path, "k.npy", rng.standard_normal((6, 1, 4)).astype(np.float32))
    save(tmp_path, "v.npy", rng.standard_normal((6, 1, 3)).astype(np.float32))
    save(tmp_path, "q2.npy", rng.standard_normal((5, 4)).astype(np.float32))
    save(tmp_path, "k3heads.npy", rng.standard_normal((6, 3, 4)).astype(np.float32))
    save(tmp_path, "v3heads.npy", rng.standard_normal((6, 3, 3)).astype(np.float32))
    save(tmp_path, "k_dim5.npy", rng.standard_normal((6, 1, 5)).astype(np.float32))
    save(tmp_path, "w_bad.npy", rng.standard_normal((4, 3)).astype(np.float32))
    save(tmp_path, "mask_float.npy", np.ones((5, 6), dtype=np.float32))
    save(tmp_path, "lengths.npy", np.array([7], dtype=np.int64))
    save(tmp_path, "rank5.npy", np.zeros((1, 1, 1, 1, 1), dtype=np.float32))
    good = (tmp_path / "q.npy").read_bytes()
    (tmp_path / "truncated.npy").write_bytes(good[:-7])
    (tmp_path / "lying.npy").write_bytes(good.replace(b"(5, 2, 4)", b"(9, 2, 4)"))
    (tmp_path / "text.npy").write_text("not an array\n")
    # A header whose key is a terminal escape sequence (clear the screen, set the title) and a
    # newline: the message must show it escaped, on its one line.
    header = b"{'descr': '<f4', '\x1b[2J\x1b]0;owned\x07\n': False, 'shape': (1,), }"
    (tmp_path / "escape.npy").write_bytes(b"\x93NUMPY\x01\x00" + bytes([len(header), 0]) + header +
                                          bytes(4))
    return tmp_path


BASE = ["attention", "--q", "q.npy", "--k", "k.npy", "--v", "v.npy", "--out", "o.npy",
        "--lse", "lse.npy", "--weights", "p.npy"]


def with_flag(flag, value=None):
    args = list(BASE)
    if flag in args:
        index = args.index(flag)
        args[index + 1] = value
    else:
        args += [flag] + ([value] if value is not None else [])
    return args


BAD = [
    ("wrong rank", with_flag("--q", "q2.npy"), "--k, --v: expected the rank of --q (2), got 3 and 3"),
    ("rank 5", with_flag("--q", "rank5.npy"), "--q: expected rank 2 [N, D], 3 [N, H, D] or 4"),
    ("Hq % Hk", with_flag("--k", "k3heads.npy")[:5] + ["--v", "v3heads.npy"] + BASE[7:],
     "k: expected Hk dividing Hq = 2 (grouped-query attention), got Hk = 3"),
    ("k and v disagree", with_flag("--k", "k3heads.npy"), "v: expected [B, Nk, Hk, Dv] = [1, 6, 3, Dv]"),
    ("mismatched Dk", with_flag("--k", "k_dim5.npy"), "k: expected Dk == Dq = 4 for score 'scaled_dot'"),
    ("missing w", with_flag("--score", "bilinear"), "w: expected [Dq, Dk] or [Hq, Dq, Dk] for score 'bilinear', got none"),
    ("w with dot", with_flag("--w", "w_bad.npy"), "w: expected none for score 'scaled_dot'"),
    ("unknown score", with_flag("--score", "sine"), "score: expected one of dot, scaled_dot, bilinear, additive, cosine, got 'sine'"),
    ("bad align", with_flag("--causal-align", "middle"), "causal_align: expected bottom-right or top-left"),
    ("bad window", with_flag("--window", "3"), "--window: expected L,R"),
    ("window below -1", with_flag("--window", "-2,1"), "window: expected (left, right)"),
    ("float mask", with_flag("--mask", "mask_float.npy"), "mask: expected dtype bool, got float32"),
    ("key length > Nk", with_flag("--key-lengths", "lengths.npy"), "key_lengths: expected values in [0, Nk = 6], got 7"),
    ("truncated npy", with_flag("--v", "truncated.npy"), "truncated"),
    ("lying header", with_flag("--q", "lying.npy"), "expected 288 bytes of data"),
    ("not npy", with_flag("--k", "text.npy"), "magic"),
    ("control bytes in a header", with_flag("--k", "escape.npy"),
     "unexpected key '\\x1b[2J\\x1b]0;owned\\x07\\x0a'"),
    ("control bytes in a file name", with_flag("--k", "no\x1b[31mfile.npy"),
     "no\\x1b[31mfile.npy: expected a readable .npy file"),
    ("missing file", with_flag("--k", "nothere.npy"), "nothere.npy: expected a readable .npy file, got no such file"),
    ("negative softcap", with_flag("--softcap", "-1"), "softcap: expected a finite number >= 0"),
    ("negative threads", with_flag("--threads", "-3"), "threads: expected >= 0"),
    ("unknown flag", with_flag("--bogus", "1"), "bogus"),
    ("missing --out", [a for a in BASE if a not in ("--out", "o.npy")], "--out is required"),
    ("non-number scale", with_flag("--scale", "abc"), "--scale"),
    ("output folder missing", with_flag("--out", "no/such/o.npy"), "cannot create a file here"),
]


@pytest.mark.parametrize("name,args,message", BAD, ids=[b[0] for b in BAD])
def test_bad_input_is_one_line_exit_2_no_output(name, args, message, inputs):
    before = sorted(os.listdir(inputs))
    result = run(*args, cwd=inputs)
    assert result.returncode == 2, (result.returncode, result.stderr)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert message in lines[0]
    assert lines[0].startswith("qkv: ")
    assert not any(ord(c) < 0x20 or ord(c) == 0x7f for c in lines[0]), lines[0]
    assert result.stdout == ""
    assert sorted(os.listdir(inputs)) == before, "an output file was left behind"


def test_outputs_replace_old_files_whole(inputs):
    (inputs / "o.npy").write_bytes(b"old")
    result = run(*BASE, cwd=inputs)
    assert result.returncode == 0, result.stderr
    assert np.load(inputs / "o.npy").shape == (5, 2, 3)
    result = run(*with_flag("--k", "k3heads.npy"), cwd=inputs)
    assert result.returncode == 2
    assert np.load(inputs / "o.npy").shape == (5, 2, 3), "a failed run must not touch old outputs"


def test_help_exits_0(tmp_path):
    result = run("attention", "--help", cwd=tmp_path)
    assert result.returncode == 0
    assert "--key-lengths" in result.stdout


@pytest.mark.parametrize("dtype,row_bytes", [("f32", 16 * 4), ("i8", 16 + 4)])
def test_bench_reads_a_ragged_paged_kv_cache(dtype, row_bytes, tmp_path):
    """A KV-cache shape: sequences of 4 … 64 keys (ragged) in pages of 4, its floor the bytes of
    the keys and values the sequences hold (not B·Nk's); an int8 cache's rows are D bytes and a
    float32 scale."""
    import json
    result = run("bench", "--shapes", "B3H4Hk2Nq1Nk64D16page4ragged", "--repetitions", "1",
                 "--dtype", dtype, "--json", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["dtype"] == {"f32": "float32", "i8": "int8"}[dtype]
    shape = report["shapes"][0]
    assert shape["median_ms"] > 0 and shape["floor_ms"] > 0
    keys = 4 + (4 + 30) + 64  # Nk/16 + (Nk - Nk/16)·b/(B - 1) for b = 0, 1, 2
    floor_bytes = 2 * keys * 2 * row_bytes
    # The JSON prints the bandwidth to 0.01 GB/s and the floor to 6 digits.
    bandwidth = report["read_bandwidth_gbs"]
    tolerance = (0.005 / bandwidth + 1e-5) * floor_bytes
    assert abs(shape["floor_ms"] * bandwidth * 1e6 - floor_bytes) <= tolerance


def test_bench_json_quotes_what_comes_from_outside(tmp_path):
    """OPENBLAS_CORETYPE (and the CPU's name) are the environment's text: escaped, the JSON still
    parses and carries them as they were."""
    import json
    coretype = 'Haswell"\\\t'
    result = subprocess.run([QKV, "bench", "--shapes", "B1H1N40D8", "--repetitions", "1",
                             "--json"], cwd=tmp_path, capture_output=True, text=True, timeout=120,
                            env={**os.environ, "OPENBLAS_CORETYPE": coretype})
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["sgemm"]["openblas_coretype"] == coretype


def test_bench_json_reports_every_figure(tmp_path):
    """The bench's JSON carries what its closing notes quote (timing itself is not tested)."""
    import json
    result = run("bench", "--shapes", "B1H2Hk1N96D16,B1H2Nq1Nk300D16causal,B1H1N40D8A4",
                 "--repetitions", "1", "--json", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["sgemm"]["gflops"] > 0 and report["sgemm"]["kernel"]
    assert report["read_bandwidth_gbs"] > 0
    # The CPU as /proc/cpuinfo names it (x86's "model name"; ARM cores report numbers instead).
    models = [line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo")
              if line.startswith("model name")]
    assert report["cpu"]
    if models:
        assert report["cpu"] == models[0]
    shapes = report["shapes"]
    assert [s["shape"] for s in shapes] == ["B1H2Hk1N96D16", "B1H2Nq1Nk300D16causal", "B1H1N40D8A4"]
    assert shapes[0]["kv_heads"] == 1 and shapes[1]["causal"] and shapes[2]["additive_dim"] == 4
    for shape in shapes:
        assert shape["median_ms"] > 0 and shape["floor_ms"] > 0 and shape["peak_mib"] > 0
        assert shape["baseline_ms"] > 0 and shape["speedup_over_baseline"] > 0
    assert shapes[0]["ratio_to_sgemm"] > 0 and shapes[2]["tanh_per_second"] > 0
    # Each shape's ratio is to the sgemm measured right after it; the heading's is their median.
    for shape in shapes[:2]:
        ratio = shape["gflops"] / shape["sgemm_gflops"]
        # printed to 4 decimals, from GFLOP/s printed to 2
        assert abs(shape["ratio_to_sgemm"] - ratio) <= 5e-5 + 0.005 * (1 + ratio) / shape["sgemm_gflops"]
    assert report["sgemm"]["gflops"] == sorted(s["sgemm_gflops"] for s in shapes)[1]


def test_bench_times_a_block_mask_beside_the_same_shape_without_it(tmp_path):
    """Issue 13's yardstick in one run: a block-masked shape's time beside the dense shape's, and
    the share of pairs the mask shows (4 documents: exactly 1/4; a window of 16 behind each of 128
    queries: (17·128 − 16·17/2) / 128²)."""
    import json
    result = run("bench", "--shapes", "B1H2N128D16docs32,B1H2N128D16slide16,B1H2N128D16",
                 "--repetitions", "1", "--json", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    docs, slide, dense = json.loads(result.stdout)["shapes"]
    assert docs["dense_ms"] > 0 and slide["dense_ms"] > 0 and dense["dense_ms"] == 0
    assert docs["visible_share"] == 0.25
    assert abs(slide["visible_share"] - (17 * 128 - 16 * 17 / 2) / 128**2) <= 1e-6
    assert dense["visible_share"] == 1
    table = run("bench", "--shapes", "B1H2N128D16docs32", "--repetitions", "1", cwd=tmp_path)
    assert "of the time of the same shape without its block mask" in table.stdout
    assert "which shows 0.250 of the (query, key) pairs" in table.stdout


def test_bench_takes_values_of_another_width(tmp_path):
    """Dv<dv>: DeepSeek's MLA shapes (queries and keys of D, values of Dv), forward and backward;
    the FLOPs count D for Q·Kᵀ and Dv for P·V, the decode floor K's and V's own widths."""
    import json
    for pass_ in ("forward", "backward"):
        result = run("bench", "--shapes", "B1H4Hk1N64D24Dv16causal,B1H4Hk1Nq1Nk96D24Dv16",
                     "--pass", pass_, "--repetitions", "1", "--json", cwd=tmp_path)
        assert result.returncode == 0, result.stderr
        shapes = json.loads(result.stdout)["shapes"]
        assert [(s["head_dim"], s["value_dim"]) for s in shapes] == [(24, 16), (24, 16)]
        assert all(s["median_ms"] > 0 for s in shapes)
    report = json.loads(run("bench", "--shapes", "B1H4Hk1Nq1Nk96D24Dv16", "--repetitions", "1",
                            "--json", cwd=tmp_path).stdout)
    shape = report["shapes"][0]
    flops = 2 * 96 * (24 + 16) * 4
    # GFLOP/s printed to 0.01, the time to 6 digits.
    assert abs(shape["gflops"] * shape["median_ms"] * 1e6 - flops) <= (
        0.005 * shape["median_ms"] * 1e6 + 1e-5 * flops)
    floor_bytes = 96 * (24 + 16) * 4
    bandwidth = report["read_bandwidth_gbs"]
    assert abs(shape["floor_ms"] * bandwidth * 1e6 - floor_bytes) <= (
        0.005 / bandwidth + 1e-5) * floor_bytes


@pytest.mark.parametrize("args,message", [
    (["--shapes", "B1H8"], "--shapes: expected S1 … S5, A1, M1, M2, K1, G1, G2, L1 … L3 or"),
    (["--shapes", "B1H8N64D8ragged"], "--shapes: expected S1 … S5, A1, M1, M2, K1, G1, G2, L1 … L3 or"),
    (["--shapes", "B2H2Nq1Nk64D8page4", "--pass", "backward"],
     "--pass backward: expected shapes without a KV cache"),
    (["--shapes", "B1H3Hk2N8D8"], "--shapes: expected Hk dividing H"),
    (["--dtype", "fp8"], "--dtype: expected f32, bf16, f16 or i8, got 'fp8'"),
    (["--dtype", "i8", "--pass", "backward"], "--dtype: expected f32, bf16 or f16 with --pass "
                                              "backward, got i8"),
    (["--repetitions", "0"], "--repetitions: expected >= 1"),
])
def test_bench_bad_input(args, message, tmp_path):
    result = run("bench", *args, cwd=tmp_path)
    assert result.returncode == 2
    assert message in result.stderr and len(result.stderr.strip().splitlines()) == 1
