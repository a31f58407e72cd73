// qkv bench: for each shape, qkv's median time, GFLOP/s and peak memory, the OpenBLAS sgemm
// throughput measured in the same run and the ratio of the two, and the naive GEMM → softmax →
// GEMM baseline with qkv's speed-up over it.

#include <fmt/format.h>
#include <omp.h>

#include <memory>
#include <sstream>
#include <string>
#include <vector>

#include "attention_bench.hpp"
#include "commands.hpp"
#include "qkv/error.hpp"
#include "qkv/simd.hpp"

namespace qkv::cli {

namespace {

struct BenchFlags {
  bool json = false;
  std::string shapes;
  int threads = 0;
  int repetitions = 5;
  std::string dtype = "f32";
};

void run_bench(const BenchFlags& flags) {
  if (flags.threads < 0)
    throw Error(fmt::format("--threads: expected >= 0, got {}", flags.threads));
  if (flags.repetitions < 1) {
    throw Error(fmt::format("--repetitions: expected >= 1, got {}", flags.repetitions));
  }
  std::vector<bench::Shape> shapes;
  if (flags.shapes.empty()) {
    shapes = bench::default_shapes();
  } else {
    std::stringstream list(flags.shapes);
    for (std::string spec; std::getline(list, spec, ',');)
      shapes.push_back(bench::parse_shape(spec));
  }
  if (flags.dtype != "f32" && flags.dtype != "bf16") {
    throw Error(fmt::format("--dtype: expected f32 or bf16, got '{}'", flags.dtype));
  }
  const DType dtype = flags.dtype == "bf16" ? DType::bfloat16 : DType::float32;
  const int threads = flags.threads > 0 ? flags.threads : omp_get_max_threads();
  const bench::GemmResult gemm = bench::measure_sgemm(threads);
  std::vector<bench::ShapeResult> results;
  if (!flags.json) {
    fmt::print("qkv bench: {} threads, SIMD target {}, {} inputs and output\n", threads,
               simd_target(), dtype_name(dtype));
    fmt::print("OpenBLAS sgemm 2048³: {:.1f} GFLOP/s (kernel {}{})\n\n", gemm.gflops, gemm.kernel,
               gemm.coretype.empty() ? ""
                                     : fmt::format(", forced by OPENBLAS_CORETYPE={}; unset it "
                                                   "to measure the best kernel",
                                                   gemm.coretype));
    fmt::print("{:<22} {:>9} {:>9} {:>8} {:>9} {:>10} {:>8}\n", "shape", "ms", "GFLOP/s", "÷sgemm",
               "peak MiB", "naive ms", "speed-up");
  }
  for (const bench::Shape& shape : shapes) {
    const bench::ShapeResult r =
        bench::measure_shape(shape, dtype, threads, gemm.gflops, flags.repetitions);
    results.push_back(r);
    if (!flags.json) {
      const std::string naive =
          r.naive_ms > 0 ? fmt::format("{:>10.2f} {:>7.1f}×", r.naive_ms, r.speedup_over_naive)
                         : fmt::format("{:>10} {:>8}", "(N×N too big)", "");
      fmt::print("{:<22} {:>9.2f} {:>9.1f} {:>8.2f} {:>9.0f} {}\n", shape.name, r.median_ms,
                 r.gflops, r.ratio_to_sgemm, r.peak_mib, naive);
    }
  }
  if (flags.json) {
    std::string rows;
    for (const bench::ShapeResult& r : results) {
      const bench::Shape& s = r.shape;
      rows += fmt::format(
          "{}\n    {{\"shape\": \"{}\", \"batch\": {}, \"q_heads\": {}, \"kv_heads\": {}, "
          "\"q_len\": {}, \"k_len\": {}, \"head_dim\": {}, \"causal\": {}, \"median_ms\": {:.4f}, "
          "\"gflops\": {:.2f}, \"ratio_to_sgemm\": {:.4f}, \"peak_mib\": {:.1f}, "
          "\"naive_ms\": {:.4f}, \"speedup_over_naive\": {:.3f}}}",
          rows.empty() ? "" : ",", s.name, s.batch, s.q_heads, s.kv_heads, s.q_len, s.k_len,
          s.head_dim, s.causal ? "true" : "false", r.median_ms, r.gflops, r.ratio_to_sgemm,
          r.peak_mib, r.naive_ms, r.speedup_over_naive);
    }
    fmt::print(
        "{{\n  \"threads\": {}, \"simd_target\": \"{}\", \"dtype\": \"{}\",\n  \"sgemm\": "
        "{{\"size\": 2048, "
        "\"gflops\": {:.2f}, \"kernel\": \"{}\", \"openblas_coretype\": \"{}\"}},\n  \"shapes\": "
        "[{}\n  ]\n}}\n",
        threads, simd_target(), dtype_name(dtype), gemm.gflops, gemm.kernel, gemm.coretype, rows);
  }
}

}  // namespace

void add_bench_command(CLI::App& app) {
  auto flags = std::make_shared<BenchFlags>();
  CLI::App* command = app.add_subcommand(
      "bench", "Attention throughput beside OpenBLAS sgemm, measured in the same run");
  command->add_flag("--json", flags->json, "print JSON instead of a table");
  command->add_option("--shapes", flags->shapes,
                      "comma-separated S1…S5 or B<b>H<h>[Hk<hk>](N<n>|Nq<nq>Nk<nk>)D<d>[causal]");
  command->add_option("--threads", flags->threads, "threads (0 = all cores)");
  command->add_option("--dtype", flags->dtype, "f32 | bf16 (inputs and output)")
      ->default_str("f32");
  command->add_option("--repetitions", flags->repetitions, "timed runs per shape (median)")
      ->default_str("5");
  command->callback([flags] { run_bench(*flags); });
}

}  // namespace qkv::cli
