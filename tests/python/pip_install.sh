#!/usr/bin/env bash
# pip install of the source tree, without a download, both ways a Debian user can:
#   into a venv that sees Debian's packages, and with --target into a folder.
# Then each install imports qkv (from outside the source tree) and computes.
set -euo pipefail
source_dir=$1
work=$2
rm -rf "$work"
mkdir -p "$work"
check='import numpy as np, qkv
q = np.random.default_rng(0).standard_normal((1, 8, 2, 4)).astype(np.float32)
o = qkv.attention(q, q, q, causal=True)
assert o.shape == (1, 8, 2, 4) and np.isfinite(o).all()
assert qkv.__file__.startswith(__import__("sys").argv[1]), qkv.__file__
print("qkv", qkv.simd_target(), "from", qkv.__file__)'
/usr/bin/python3 -m venv --system-site-packages "$work/venv"
"$work/venv/bin/pip" install --no-build-isolation --no-index --no-deps -q "$source_dir"
(cd "$work" && "$work/venv/bin/python" -c "$check" "$work/venv")
/usr/bin/python3 -m pip install --no-build-isolation --no-index --no-deps -q --target "$work/target" "$source_dir"
(cd "$work" && PYTHONPATH="$work/target" /usr/bin/python3 -c "$check" "$work/target")
