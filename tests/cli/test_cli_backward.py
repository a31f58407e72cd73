"""`qkv attention --dout …` and `qkv mha`: gradients against central finite differences of the
NumPy float64 contract (tests/cli/contract.py), and bad input (exit 2, one line, no file)."""
import os
import subprocess

import numpy as np
import pytest

from contract import attention

QKV = os.environ.get("QKV_BIN", "qkv")


def run(*args, cwd):
    return subprocess.run([QKV, *map(str, args)], cwd=cwd, capture_output=True, text=True, timeout=120)


def numeric_gradient(loss, array, step=1e-6):
    gradient = np.zeros_like(array)
    for index in np.ndindex(array.shape):
        saved = array[index]
        array[index] = saved + step
        up = loss()
        array[index] = saved - step
        down = loss()
        array[index] = saved
        gradient[index] = (up - down) / (2 * step)
    return gradient


CASES = [
    dict(name="scaled_dot_causal_float64", score="scaled_dot", causal=True, dtype=np.float64),
    dict(name="scaled_dot_float32", score="scaled_dot", dtype=np.float32),
    dict(name="bilinear_float64", score="bilinear", dtype=np.float64),
    dict(name="additive_float32", score="additive", dtype=np.float32),
    dict(name="cosine_temperature_float64", score="cosine", causal=True, dtype=np.float64),
    dict(name="sinks_causal_float32", score="scaled_dot", causal=True, dtype=np.float32,
         sinks=True),
    dict(name="sigmoid_bilinear_float64", score="bilinear", causal=True, dtype=np.float64,
         normalization="sigmoid"),
]


@pytest.mark.parametrize("case", CASES, ids=[c["name"] for c in CASES])
def test_gradients_match_finite_differences(case, tmp_path):
    rng = np.random.default_rng(len(case["name"]))
    dtype = case["dtype"]
    b, nq, nk, h, d = 2, 4, 6, 2, 3
    q = rng.standard_normal((b, nq, h, d))
    same_dims = case["score"] in ("scaled_dot", "cosine")
    k = rng.standard_normal((b, nk, h, d + (0 if same_dims else 1)))
    v = rng.standard_normal((b, nk, h, 2))
    params = {}
    if case["score"] == "bilinear":
        params["w"] = rng.standard_normal((d, k.shape[-1]))
    if case["score"] == "additive":
        params["wq"] = rng.standard_normal((h, 4, d))
        params["wk"] = rng.standard_normal((h, 4, k.shape[-1]))
        params["va"] = rng.standard_normal((h, 4))
    if case["score"] == "cosine":
        params["temperature"] = 2.0 + rng.random(h) * 3.0
    if case.get("sinks"):
        params["sinks"] = rng.standard_normal(h)
    # What qkv reads (the values rounded to the file dtype; the parameters in float32).
    q, k, v = (x.astype(dtype).astype(np.float64) for x in (q, k, v))
    params = {n: p.astype(np.float32).astype(np.float64) for n, p in params.items()}
    dout = rng.standard_normal((b, nq, h, 2))
    args = ["attention", "--score", case["score"], "--out", tmp_path / "o.npy", "--dout", tmp_path / "do.npy"]
    for name, array in (("q", q), ("k", k), ("v", v), ("do", dout)):
        np.save(tmp_path / f"{name}.npy", array.astype(dtype))
    args += ["--q", tmp_path / "q.npy", "--k", tmp_path / "k.npy", "--v", tmp_path / "v.npy"]
    for name, array in params.items():
        np.save(tmp_path / f"{name}.npy", array.astype(np.float32))
        args += [f"--{name}", tmp_path / f"{name}.npy", f"--d{name}", tmp_path / f"d{name}.npy"]
    if case.get("causal"):
        args.append("--causal")
    extra = {}
    if "normalization" in case:
        args += ["--normalization", case["normalization"]]
        extra["normalization"] = case["normalization"]
    args += ["--dq", tmp_path / "dq.npy", "--dk", tmp_path / "dk.npy", "--dv", tmp_path / "dv.npy"]
    result = run(*args, cwd=tmp_path)
    assert result.returncode == 0, result.stderr

    def loss():
        out, _, _ = attention(q, k, v, score=case["score"], causal=case.get("causal", False),
                              **params, **extra)
        return float(np.sum(out * dout))

    tolerance = 1e-8 if dtype == np.float64 else 1e-5
    for name, array in [("q", q), ("k", k), ("v", v)] + list(params.items()):
        ours = np.load(tmp_path / f"d{name}.npy")
        assert ours.shape == array.shape and ours.dtype == (np.float64 if dtype == np.float64 else np.float32)
        exact = numeric_gradient(loss, array)
        error = np.abs(ours - exact).max()
        assert error <= tolerance * (1 + np.abs(exact).max()), f"d{name}: {error:.2e}"


def test_bad_gradient_flags(tmp_path):
    rng = np.random.default_rng(0)
    for name in ("q", "k", "v"):
        np.save(tmp_path / f"{name}.npy", rng.standard_normal((4, 3)).astype(np.float32))
    np.save(tmp_path / "bad_dout.npy", rng.standard_normal((5, 3)).astype(np.float32))
    base = ["attention", "--q", "q.npy", "--k", "k.npy", "--v", "v.npy", "--out", "o.npy"]
    cases = [
        (["--dq", "dq.npy"], "--dout: expected"),
        (["--dout", "bad_dout.npy"], "--dout: expected at least one of"),
        (["--dout", "bad_dout.npy", "--dq", "dq.npy"], "dout: expected [B, Nq, Hq, Dv]"),
        (["--dout", "bad_dout.npy", "--dw", "dw.npy"], "--dw: expected --w to differentiate"),
        (["--dropout", "1.5"], "dropout: expected a probability in [0, 1), got 1.5"),
    ]
    for extra, message in cases:
        result = run(*base, *extra, cwd=tmp_path)
        assert result.returncode == 2, (extra, result.stderr)
        assert message in result.stderr and result.stderr.count("\n") == 1, (extra, result.stderr)
        assert not (tmp_path / "o.npy").exists() and not (tmp_path / "dq.npy").exists()
        assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".tmp")] == []


def test_mha_bad_input(tmp_path):
    rng = np.random.default_rng(1)
    e = 4
    weights = tmp_path / "model.safetensors"
    np.save(tmp_path / "q.npy", rng.standard_normal((3, 2, e)).astype(np.float32))
    np.save(tmp_path / "wrong.npy", rng.standard_normal((3, 2, e + 1)).astype(np.float32))
    from test_mha_torch import write_safetensors
    state = {"in_proj_weight": np.zeros((3 * e, e), np.float32), "in_proj_bias": np.zeros(3 * e, np.float32),
             "out_proj.weight": np.zeros((e, e), np.float32), "out_proj.bias": np.zeros(e, np.float32)}
    write_safetensors(weights, state)
    write_safetensors(tmp_path / "extra.safetensors", {**state, "surprise": np.zeros(2, np.float32)})
    write_safetensors(tmp_path / "short.safetensors", {k: v for k, v in state.items() if k != "in_proj_bias"
                                                       } | {"in_proj_bias": np.zeros(e, np.float32)})
    (tmp_path / "garbage.safetensors").write_bytes(b"\xff" * 40)
    base = ["mha", "--num-heads", 2, "--out", "o.npy"]
    cases = [
        (["--weights", weights, "--query", "wrong.npy"], "query: expected [L, N, E] with 4 features"),
        (["--weights", tmp_path / "extra.safetensors", "--query", "q.npy"], "unexpected tensor 'surprise'"),
        (["--weights", tmp_path / "short.safetensors", "--query", "q.npy"], "expected 'in_proj_bias' of shape [12]"),
        (["--weights", tmp_path / "garbage.safetensors", "--query", "q.npy"], "garbage.safetensors"),
        (["--weights", weights, "--query", "q.npy", "--key", "q.npy"], "--key, --value: expected both"),
        (["--weights", weights, "--query", "q.npy", "--dout", "q.npy"], "--dout, --grads: expected both"),
        (["--weights", weights, "--query", "q.npy", "--attn-mask", "q.npy"], "attn_mask: expected [L, S]"),
    ]
    for extra, message in cases:
        result = run(*base, *extra, cwd=tmp_path)
        assert result.returncode == 2, (extra, result.stderr)
        assert message in result.stderr and result.stderr.count("\n") == 1, (extra, result.stderr)
        assert not (tmp_path / "o.npy").exists()
