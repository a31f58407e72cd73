"""What the Python layer promises about memory and threads: contiguous float32 and bfloat16
inputs reach the C++ core without a copy, results are written in place, and the GIL is released
while qkv computes."""
import threading
import time

import numpy as np
import torch

import qkv
from qkv import _functions


def test_inputs_are_viewed_not_copied():
    x = np.random.default_rng(0).standard_normal((2, 16, 4, 8)).astype(np.float32)
    assert _functions._numpy_view(x, "q") is x
    t = torch.from_numpy(x)
    assert _functions._numpy_view(t, "q").ctypes.data == t.data_ptr()
    b = t.to(torch.bfloat16)
    view = _functions._numpy_view(b, "q")
    assert view.dtype == np.uint16 and view.ctypes.data == b.data_ptr()
    # PyTorch's [B, H, N, D] storage seen as [B, N, H, D]: strides permuted, same memory.
    bhnd = torch.randn(2, 4, 16, 8)
    seen = _functions._numpy_view(bhnd.transpose(1, 2), "q")
    assert seen.ctypes.data == bhnd.data_ptr() and not seen.flags["C_CONTIGUOUS"]


def test_results_are_written_in_place_in_the_callers_layout():
    q = torch.randn(1, 3, 8, 4)  # [B, H, N, D]
    out = qkv.scaled_dot_product_attention(q, q, q)
    assert out.is_contiguous() and out.shape == (1, 3, 8, 4)


def test_gil_is_released_while_computing():
    """A Python thread keeps counting while another thread is inside one long qkv call; were the
    GIL held, the counter could not move until the call returned."""
    rng = np.random.default_rng(1)
    q = rng.standard_normal((1, 2048, 4, 64)).astype(np.float32)
    inside = threading.Event()
    done = threading.Event()
    counts = []

    def count():
        inside.wait()
        n = 0
        while not done.is_set():
            n += 1
        counts.append(n)

    counter = threading.Thread(target=count)
    counter.start()
    start = time.perf_counter()
    inside.set()
    qkv.attention(q, q, q, threads=1, score="additive", wq=np.eye(8, 64, dtype=np.float32),
                  wk=np.eye(8, 64, dtype=np.float32), va=np.ones(8, np.float32))
    elapsed = time.perf_counter() - start
    done.set()
    counter.join()
    # The call takes a good part of a second; a thread that can run counts millions meanwhile
    # (with the GIL held it would get a switch interval of 5 ms at most).
    assert elapsed > 0.05
    assert counts[0] > 100_000, (counts, elapsed)


def test_every_public_function_has_a_docstring_and_a_stub():
    import ast
    import os
    package = os.path.dirname(qkv.__file__)
    submodules = {"nn", "score_mods"}
    # Each public name has a docstring and a typed signature in the package's .pyi file.
    for module, pyi_name, names in ((qkv, "__init__", qkv.__all__), (qkv.nn, "nn", qkv.nn.__all__),
                                    (qkv.score_mods, "score_mods", qkv.score_mods.__all__)):
        for name in names:
            assert getattr(module, name).__doc__, name
        pyi_path = os.path.join(package, pyi_name + ".pyi")
        declarations = ast.parse(open(pyi_path).read()).body
        declared = {node.name for node in declarations
                    if isinstance(node, (ast.FunctionDef, ast.ClassDef))}
        declared |= {alias.asname for node in declarations if isinstance(node, ast.ImportFrom)
                     for alias in node.names if alias.asname in submodules}
        assert set(names) <= declared, (pyi_path, set(names) - declared)
    assert os.path.exists(os.path.join(package, "py.typed"))
