"""`qkv mha` against PyTorch's nn.MultiheadAttention on the same weights: outputs, returned weights,
and the gradients of every parameter and input (float32, relative error <= 1e-5 of the largest
entry). The weights go through a .safetensors file, as a model saved from PyTorch would."""
import json
import os
import struct
import subprocess

import numpy as np
import pytest

import torch  # installed by `make test` (scripts/install-deps.sh); never skipped

QKV = os.environ.get("QKV_BIN", "qkv")
TOLERANCE = 1e-5

DTYPES = {"F32": np.float32, "F64": np.float64, "I64": np.int64, "BOOL": np.bool_}


def write_safetensors(path, tensors):
    """The format by hand (the safetensors package is not in Debian): header JSON, then data."""
    header, blobs, offset = {}, [], 0
    for name in sorted(tensors):
        array = np.ascontiguousarray(tensors[name])
        code = {np.dtype(np.float32): "F32", np.dtype(np.float64): "F64"}[array.dtype]
        data = array.tobytes()
        header[name] = {"dtype": code, "shape": list(array.shape), "data_offsets": [offset, offset + len(data)]}
        blobs.append(data)
        offset += len(data)
    header["__metadata__"] = {"format": "pt"}
    text = json.dumps(header).encode()
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(text)))
        f.write(text)
        for blob in blobs:
            f.write(blob)


def read_safetensors(path):
    with open(path, "rb") as f:
        (size,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(size))
        data = f.read()
    result = {}
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        begin, end = entry["data_offsets"]
        result[name] = np.frombuffer(data[begin:end], dtype=DTYPES[entry["dtype"]]).reshape(entry["shape"])
    return result


def relative_error(ours, theirs):
    theirs = np.asarray(theirs, dtype=np.float64)
    return np.max(np.abs(np.asarray(ours, dtype=np.float64) - theirs)) / max(np.max(np.abs(theirs)), 1e-30)


CASES = [
    dict(name="self", self_attention=True),
    dict(name="self_batch_first", self_attention=True, batch_first=True),
    dict(name="cross_kdim_vdim", kdim=5, vdim=7, s=9),
    dict(name="cross_batch_first_kdim", kdim=6, vdim=6, s=4, batch_first=True),
    dict(name="key_padding_mask", self_attention=True, key_padding=True),
    dict(name="bool_attn_mask_2d", s=8, bool_mask=True),
    dict(name="float_attn_mask_3d", s=8, float_mask=True, batch_first=True),
    dict(name="add_bias_kv", s=7, add_bias_kv=True, key_padding=True),
    dict(name="add_zero_attn", s=7, add_zero_attn=True, bool_mask=True),
    dict(name="bias_kv_zero_attn_per_head_weights", self_attention=True, add_bias_kv=True,
         add_zero_attn=True, average=False),
    dict(name="no_bias", s=6, bias=False),
]


def make_case(case, tmp_path, seed):
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    e, heads, n, l = 8, 2, 3, 5
    s = l if case.get("self_attention") else case.get("s", 6)
    kdim, vdim = case.get("kdim", e), case.get("vdim", e)
    batch_first = case.get("batch_first", False)
    module = torch.nn.MultiheadAttention(e, heads, bias=case.get("bias", True),
                                         add_bias_kv=case.get("add_bias_kv", False),
                                         add_zero_attn=case.get("add_zero_attn", False),
                                         kdim=kdim, vdim=vdim, batch_first=batch_first)
    with torch.no_grad():  # biases start at zero in PyTorch: make them count
        for name, parameter in module.named_parameters():
            if "bias" in name:
                parameter.normal_()

    def sequence(length, features):
        shape = (n, length, features) if batch_first else (length, n, features)
        return rng.standard_normal(shape).astype(np.float32)

    query = sequence(l, e)
    key = query if case.get("self_attention") else sequence(s, kdim)
    value = query if case.get("self_attention") else sequence(s, vdim)
    files = dict(weights=tmp_path / "model.safetensors")
    write_safetensors(files["weights"], {k: v.detach().numpy() for k, v in module.state_dict().items()})
    args = ["mha", "--weights", files["weights"], "--num-heads", heads, "--query", tmp_path / "q.npy"]
    np.save(tmp_path / "q.npy", query)
    if not case.get("self_attention"):
        np.save(tmp_path / "k.npy", key)
        np.save(tmp_path / "v.npy", value)
        args += ["--key", tmp_path / "k.npy", "--value", tmp_path / "v.npy"]
    if batch_first:
        args.append("--batch-first")
    if case.get("add_zero_attn"):
        args.append("--add-zero-attn")
    kwargs = dict(need_weights=True, average_attn_weights=case.get("average", True))
    if not case.get("average", True):
        args.append("--per-head-weights")
    if case.get("key_padding"):
        padding = rng.random((n, s)) < 0.3
        padding[:, 0] = False  # every row keeps a key (fully masked rows: see the test below)
        np.save(tmp_path / "padding.npy", padding)
        args += ["--key-padding-mask", tmp_path / "padding.npy"]
        kwargs["key_padding_mask"] = torch.from_numpy(padding)
    if case.get("bool_mask"):
        mask = rng.random((l, s)) < 0.3
        mask[:, 1] = False
        np.save(tmp_path / "mask.npy", mask)
        args += ["--attn-mask", tmp_path / "mask.npy"]
        kwargs["attn_mask"] = torch.from_numpy(mask)
    if case.get("float_mask"):
        mask = rng.standard_normal((n * heads, l, s)).astype(np.float32)
        np.save(tmp_path / "mask.npy", mask)
        args += ["--attn-mask", tmp_path / "mask.npy"]
        kwargs["attn_mask"] = torch.from_numpy(mask)
    dout = rng.standard_normal(query.shape).astype(np.float32)
    np.save(tmp_path / "dout.npy", dout)
    args += ["--out", tmp_path / "out.npy", "--attention-weights", tmp_path / "weights.npy",
             "--dout", tmp_path / "dout.npy", "--grads", tmp_path / "grads.safetensors"]
    return module, query, key, value, dout, args, kwargs


@pytest.mark.parametrize("case", CASES, ids=[c["name"] for c in CASES])
def test_matches_pytorch(case, tmp_path):
    module, query, key, value, dout, args, kwargs = make_case(case, tmp_path, seed=len(case["name"]) * 7919)
    result = subprocess.run([QKV, *map(str, args)], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr

    q = torch.from_numpy(query).requires_grad_()
    if case.get("self_attention"):
        k = v = q
    else:
        k = torch.from_numpy(key).requires_grad_()
        v = torch.from_numpy(value).requires_grad_()
    out, weights = module(q, k, v, **kwargs)
    out.backward(torch.from_numpy(dout))

    assert relative_error(np.load(tmp_path / "out.npy"), out.detach().numpy()) <= TOLERANCE
    assert relative_error(np.load(tmp_path / "weights.npy"), weights.detach().numpy()) <= TOLERANCE
    grads = read_safetensors(tmp_path / "grads.safetensors")
    expected = {name: p.grad.numpy() for name, p in module.named_parameters()}
    expected["query"] = q.grad.numpy()
    if not case.get("self_attention"):
        expected["key"] = k.grad.numpy()
        expected["value"] = v.grad.numpy()
    assert sorted(grads) == sorted(expected)
    for name, theirs in expected.items():
        assert grads[name].shape == theirs.shape, name
        error = relative_error(grads[name], theirs)
        assert error <= TOLERANCE, f"{name}: relative error {error:.2e}"


def test_fully_masked_query_gives_bias_not_nan(tmp_path):
    """A batch whose every key is padding: PyTorch 1.13 returns NaN outputs, weights and
    gradients for it. qkv returns what attention to nothing means: zero weights, an attention
    output of 0 (so the layer's output is out_proj.bias), zero gradients through it; the other
    batches are unaffected and still match PyTorch."""
    case = dict(name="fully_masked", self_attention=True, key_padding=True)
    module, query, key, value, dout, args, kwargs = make_case(case, tmp_path, seed=5)
    padding = kwargs["key_padding_mask"].numpy().copy()
    padding[1, :] = True
    np.save(tmp_path / "padding.npy", padding)
    kwargs["key_padding_mask"] = torch.from_numpy(padding)
    result = subprocess.run([QKV, *map(str, args)], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr

    q = torch.from_numpy(query).requires_grad_()
    out, weights = module(q, q, q, **kwargs)
    assert torch.isnan(out[:, 1]).all()  # PyTorch's answer for batch 1

    ours = np.load(tmp_path / "out.npy")
    bias = module.out_proj.bias.detach().numpy()
    assert np.array_equal(ours[:, 1], np.broadcast_to(bias, ours[:, 1].shape))
    assert not np.isnan(ours).any()
    assert np.all(np.load(tmp_path / "weights.npy")[1] == 0)
    others = [0, 2]
    assert relative_error(ours[:, others], out.detach().numpy()[:, others]) <= TOLERANCE
    grads = read_safetensors(tmp_path / "grads.safetensors")
    for name, gradient in grads.items():
        assert np.isfinite(gradient).all(), name
