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

# `install-deps.sh aarch64`: also the cross compiler, qemu-user and the arm64 libraries the aarch64
# preset builds and tests with (.ci/run: `make test-aarch64`).
cross=0
if [ "${1:-}" = aarch64 ]; then
  cross=1
  packages+=(
    g++-aarch64-linux-gnu qemu-user     # cross compiler; runs the aarch64 tests on this machine
    libhwy-dev:arm64 libopenblas-dev:arm64 libfmt-dev:arm64 libgtest-dev:arm64 libgmock-dev:arm64
  )
fi

sudo=""
[ "$(id -u)" -eq 0 ] || sudo="sudo"
export DEBIAN_FRONTEND=noninteractive
updated=0
if [ $cross -eq 1 ] && ! dpkg --print-foreign-architectures | grep -qx arm64; then
  echo "qkv: adding the arm64 architecture to dpkg (multiarch)"
  $sudo dpkg --add-architecture arm64
  $sudo apt-get update -qq >/dev/null
  updated=1
fi

missing=()
for package in "${packages[@]}"; do
  if ! dpkg-query -W -f='${Status}' "$package" 2>/dev/null | grep -q 'install ok installed'; then
    missing+=("$package")
  fi
done
[ ${#missing[@]} -eq 0 ] && exit 0

echo "qkv: installing ${missing[*]}"
[ $updated -eq 1 ] || $sudo apt-get update -qq >/dev/null
$sudo apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
