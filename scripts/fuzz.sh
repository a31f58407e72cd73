#!/usr/bin/env bash
# Fuzzes the readers of untrusted files (.npy, .safetensors, the safetensors JSON header) under
# libFuzzer with AddressSanitizer and UndefinedBehaviorSanitizer, each for a bounded time:
#   scripts/fuzz.sh [SECONDS]     (default 60 per target; CI runs it)
# The committed seeds (fuzz/corpus/) are read, never written: what the fuzzer learns goes to
# build/fuzz/corpus/. A crash leaves its input in build/fuzz/artifacts/ and fails the run; copy it
# into fuzz/regressions/ (the unit tests read every file there) and fix the reader.
set -euo pipefail
cd "$(dirname "$0")/.."
seconds=${1:-60}
cmake --preset fuzz >/dev/null
cmake --build --preset fuzz -j "$(nproc)"
mkdir -p build/fuzz/artifacts
for target in npy safetensors safetensors_header; do
  learned=build/fuzz/corpus/$target
  mkdir -p "$learned"
  echo "fuzz_$target: ${seconds} s"
  # -rss_limit_mb/-malloc_limit_mb: a reader that allocates without bound is a failure too.
  build/fuzz/fuzz/fuzz_$target -max_total_time="$seconds" -timeout=10 -rss_limit_mb=2048 \
    -malloc_limit_mb=512 -print_final_stats=1 -artifact_prefix=build/fuzz/artifacts/"$target"- \
    "$learned" fuzz/corpus/$target 2>build/fuzz/$target.log || {
    tail -n 40 build/fuzz/$target.log
    echo "fuzz_$target: failed; the input is in build/fuzz/artifacts/"
    exit 1
  }
  grep -E 'stat::number_of_executed_units|stat::new_units_added|stat::peak_rss_mb' build/fuzz/$target.log | tr -s ' ' | tr '\n' ' '
  echo "corpus: $(ls "$learned" | wc -l) learned inputs"
done
