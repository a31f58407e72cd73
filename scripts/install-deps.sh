#!/usr/bin/env bash
# Installs the Debian packages qkv builds, runs and tests with. Idempotent: when everything is
# there it asks apt nothing and prints nothing.
set -euo pipefail

packages=(
  cmake make g++                      # the toolchain (CMake >= 3.25)
  clang libomp-dev libclang-rt-dev    # CI's clang build; libFuzzer for the readers (scripts/fuzz.sh)
  libfmt-dev libcli11-dev             # formatting, the command line
  libhwy-dev                          # SIMD with run-time dispatch (Highway)
  libopenblas-dev pkg-config          # GEMM: the bench's yardstick and naive baseline
  nlohmann-json3-dev                  # the JSON header of .safetensors files
  libgtest-dev libgmock-dev           # C++ tests
  python3-numpy python3-pytest        # CLI tests against a NumPy evaluation of the contract
  python3-torch                       # layer parity tests against PyTorch's nn.MultiheadAttention
  pybind11-dev python3-dev            # the Python module
  python3-pip python3-venv python3-setuptools python3-wheel  # pip install . without a download
  python3-hypothesis                  # property-based tests of the Python module
  libopenmpi-dev openmpi-bin          # distributed attention (ring, heads) over MPI
  libcairo2-dev fonts-dejavu-core     # PNG heatmaps with readable labels (qkv plot, qkv demo)
)

missing=()
for package in "${packages[@]}"; do
  if ! dpkg-query -W -f='${Status}' "$package" 2>/dev/null | grep -q 'install ok installed'; then
    missing+=("$package")
  fi
done
[ ${#missing[@]} -eq 0 ] && exit 0

echo "qkv: installing ${missing[*]}"
sudo=""
[ "$(id -u)" -eq 0 ] || sudo="sudo"
export DEBIAN_FRONTEND=noninteractive
$sudo apt-get update -qq >/dev/null
$sudo apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
