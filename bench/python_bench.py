"""The Python module's speed beside the C++ tool and Debian's PyTorch, measured in one run.

    env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE PYTHONPATH=build/release/python \\
        /usr/bin/python3 bench/python_bench.py [--qkv build/release/tools/qkv] [--n 4096]

Shape B1 H8 N D64 float32, 2 threads for everyone. Reports, each as a median of runs:
  - `qkv bench` (C++) forward and backward, and its OpenBLAS sgemm throughput;
  - qkv from Python: qkv.attention on NumPy arrays, qkv.scaled_dot_product_attention on torch
    tensors, forward, and forward+backward through torch.autograd;
  - PyTorch 1.13: torch.nn.functional._scaled_dot_product_attention forward, and matmul →
    softmax → matmul with autograd for forward+backward (its threads set to 2).
"""
import argparse
import json
import math
import os
import subprocess
import sys
import time

import numpy as np
import torch

import qkv


def median_seconds(function, repetitions):
    function()  # warm-up: pages, thread pools
    times = []
    for _ in range(repetitions):
        start = time.perf_counter()
        function()
        times.append(time.perf_counter() - start)
    return float(np.median(times))


def cpp_bench(binary, n, backward):
    spec = f"B1H8N{n}D64"
    args = [binary, "bench", "--json", "--shapes", spec, "--threads", "2", "--repetitions", "5"]
    if backward:
        args += ["--pass", "backward"]
    result = json.loads(subprocess.run(args, check=True, capture_output=True, text=True).stdout)
    return result["shapes"][0]["median_ms"] / 1e3, result["sgemm"]["gflops"]


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--qkv", default="build/release/tools/qkv")
    parser.add_argument("--n", type=int, default=4096)
    parser.add_argument("--repetitions", type=int, default=5)
    args = parser.parse_args()
    torch.set_num_threads(2)
    n, h, d = args.n, 8, 64
    forward_flops = 4.0 * h * n * n * d
    rng = np.random.default_rng(0)
    q, k, v, dout = (rng.standard_normal((1, n, h, d)).astype(np.float32) for _ in range(4))

    cpp_forward, sgemm_forward = cpp_bench(args.qkv, n, False)
    cpp_backward, sgemm_backward = cpp_bench(args.qkv, n, True)

    results = {}  # name → (seconds, FLOPs in units of one forward)
    results["qkv C++ forward (qkv bench)"] = (cpp_forward, 1.0)
    results["qkv C++ backward (qkv bench --pass backward)"] = (cpp_backward, 2.5)
    results["qkv.attention, NumPy [B, N, H, D], forward"] = (median_seconds(
        lambda: qkv.attention(q, k, v, threads=2), args.repetitions), 1.0)
    bnhd = [torch.from_numpy(x) for x in (q, k, v, dout)]
    results["qkv.attention, torch [B, N, H, D], forward"] = (median_seconds(
        lambda: qkv.attention(*bnhd[:3]), args.repetitions), 1.0)
    leaves = [x.clone().requires_grad_() for x in bnhd[:3]]

    def qkv_train_bnhd():
        for leaf in leaves:
            leaf.grad = None
        qkv.attention(*leaves).backward(bnhd[3])

    results["qkv.attention, torch [B, N, H, D], forward+backward"] = (median_seconds(
        qkv_train_bnhd, args.repetitions), 3.5)

    # PyTorch's layout [B, H, N, D] for both libraries.
    tq, tk, tv, tdout = (x.transpose(1, 2).contiguous() for x in bnhd)
    results["qkv.scaled_dot_product_attention, torch [B, H, N, D], forward"] = (median_seconds(
        lambda: qkv.scaled_dot_product_attention(tq, tk, tv), args.repetitions), 1.0)
    leaves_bhnd = [x.clone().requires_grad_() for x in (tq, tk, tv)]

    def qkv_train():
        for leaf in leaves_bhnd:
            leaf.grad = None
        qkv.scaled_dot_product_attention(*leaves_bhnd).backward(tdout)

    results["qkv.scaled_dot_product_attention, torch, forward+backward"] = (median_seconds(
        qkv_train, args.repetitions), 3.5)

    def torch_forward():
        with torch.no_grad():
            torch.nn.functional._scaled_dot_product_attention(tq, tk, tv, None, 0.0, False, False)

    results["torch _scaled_dot_product_attention, forward"] = (median_seconds(
        torch_forward, args.repetitions), 1.0)

    def torch_train():
        for leaf in leaves_bhnd:
            leaf.grad = None
        scores = leaves_bhnd[0] @ leaves_bhnd[1].transpose(-2, -1) / math.sqrt(d)
        out = torch.softmax(scores, -1) @ leaves_bhnd[2]
        out.backward(tdout)

    results["torch matmul-softmax-matmul, forward+backward"] = (median_seconds(
        torch_train, max(1, args.repetitions // 2)), 3.5)

    sgemm = (sgemm_forward + sgemm_backward) / 2
    print(f"B1 H8 N{n} D64 float32, 2 threads; OpenBLAS sgemm 2048³ in this run: "
          f"{sgemm_forward:.0f} and {sgemm_backward:.0f} GFLOP/s")
    for name, (seconds, units) in results.items():
        rate = units * forward_flops / seconds / 1e9
        print(f"  {name:<62} {seconds * 1e3:8.1f} ms {rate:6.0f} GFLOP/s {rate / sgemm:5.2f}×sgemm")
    time_of = {name: seconds for name, (seconds, _) in results.items()}
    cpp_train = cpp_forward + cpp_backward
    print("Python over C++ (same layout, [B, N, H, D]): forward NumPy "
          f"{time_of['qkv.attention, NumPy [B, N, H, D], forward'] / cpp_forward - 1:+.1%}, torch "
          f"{time_of['qkv.attention, torch [B, N, H, D], forward'] / cpp_forward - 1:+.1%}; "
          "forward+backward torch "
          f"{time_of['qkv.attention, torch [B, N, H, D], forward+backward'] / cpp_train - 1:+.1%}")
    ours_forward = time_of["qkv.scaled_dot_product_attention, torch [B, H, N, D], forward"]
    ours_train = time_of["qkv.scaled_dot_product_attention, torch, forward+backward"]
    print("qkv over PyTorch 1.13 (both [B, H, N, D]): forward "
          f"{time_of['torch _scaled_dot_product_attention, forward'] / ours_forward:.1f}× faster, "
          "forward+backward "
          f"{time_of['torch matmul-softmax-matmul, forward+backward'] / ours_train:.1f}× faster")
    if os.environ.get("OPENBLAS_CORETYPE"):
        print("note: OPENBLAS_CORETYPE is set, which slows OpenBLAS (and PyTorch's GEMM) down",
              file=sys.stderr)


if __name__ == "__main__":
    main()
