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
#ifdef QKV_HAS_MPI
#include "distributed_bench.hpp"
#endif

namespace qkv::cli {

namespace {

// `text` as the inside of a JSON string: quotes, backslashes and control characters escaped (the
// CPU's name and OPENBLAS_CORETYPE come from outside the program).
std::string json_escaped(const std::string& text) {
  std::string escaped;
  for (const char c : text) {
    if (c == '"' || c == '\\') {
      escaped += '\\';
      escaped += c;
    } else if (static_cast<unsigned char>(c) < 0x20) {
      escaped += fmt::format("\\u{:04x}", static_cast<int>(c));
    } else {
      escaped += c;
    }
  }
  return escaped;
}

struct BenchFlags {
  bool json = false;
  std::string shapes;
  int threads = 0;
  int repetitions = 5;
  std::string dtype = "f32";
  std::string pass = "forward";
  bool distributed = false;
  double link_gbs = 0.0, latency_us = 2.0;
};

void run_bench(const BenchFlags& flags) {
  if (flags.distributed) {
#ifdef QKV_HAS_MPI
    run_distributed_bench(flags.shapes, flags.repetitions, flags.link_gbs, flags.latency_us);
    return;
#else
    throw Error("--distributed: expected a qkv built with MPI (OpenMPI), got one built without");
#endif
  }
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
  if (flags.dtype != "f32" && flags.dtype != "bf16" && flags.dtype != "f16" &&
      flags.dtype != "i8") {
    throw Error(fmt::format("--dtype: expected f32, bf16, f16 or i8, got '{}'", flags.dtype));
  }
  const DType dtype = flags.dtype == "bf16"  ? DType::bfloat16
                      : flags.dtype == "f16" ? DType::float16
                      : flags.dtype == "i8"  ? DType::int8
                                             : DType::float32;
  if (flags.pass != "forward" && flags.pass != "backward") {
    throw Error(fmt::format("--pass: expected forward or backward, got '{}'", flags.pass));
  }
  const bool backward = flags.pass == "backward";
  if (backward && dtype == DType::int8)
    throw Error("--dtype: expected f32, bf16 or f16 with --pass backward, got i8 (a KV cache)");
  const int threads = flags.threads > 0 ? flags.threads : omp_get_max_threads();
  // Each shape's ratio is to an sgemm measured right after it: on a shared machine the speed of
  // both drifts by ±20% within minutes, and one sgemm for a run of many shapes left the ratios of
  // the first ones to a machine seconds or minutes later. OpenBLAS's threads wait for work
  // spinning for a while after each call: the next shape starts after they have gone to sleep,
  // so that they never run beside qkv's. The baselines (OpenBLAS too) come after every shape.
  // The backward has no memory floor to report.
  const double bandwidth = backward ? 0.0 : bench::measure_read_bandwidth(threads);
  std::vector<bench::ShapeResult> results;
  bench::GemmResult gemm;
  std::vector<double> sgemm_gflops;
  for (const bench::Shape& shape : shapes) {
    results.push_back(
        backward ? bench::measure_qkv_backward(shape, dtype, threads, flags.repetitions)
                 : bench::measure_qkv(shape, dtype, threads, bandwidth, flags.repetitions));
    bench::ShapeResult& result = results.back();
    if (!backward && shape.block_masked()) {
      bench::Shape dense = shape;
      dense.documents = dense.sliding_window = 0;
      result.dense_ms =
          bench::measure_qkv(dense, dtype, threads, bandwidth, flags.repetitions).median_ms;
      result.visible_share = shape.visible_share();
    }
    gemm = bench::measure_sgemm(threads);
    result.sgemm_gflops = gemm.gflops;
    result.ratio_to_sgemm = result.gflops / gemm.gflops;
    sgemm_gflops.push_back(gemm.gflops);
    bench::wait_for_openblas_threads_to_sleep();
  }
  gemm.gflops = bench::median(sgemm_gflops);  // the run's, for the heading
  for (bench::ShapeResult& result : results) {
    if (!backward) bench::measure_baseline(result, threads, flags.repetitions);
  }
  if (!flags.json) {
    fmt::print("qkv bench ({} pass) on {}: {} threads, SIMD target {}, {}{}\n", flags.pass,
               bench::cpu_name(), threads, simd_target(),
               dtype == DType::int8 ? std::string("an int8 KV cache (float32 queries and output)")
                                    : fmt::format("{} inputs and output", dtype_name(dtype)),
               backward ? "; dQ, dK, dV from the saved O and LSE, FLOPs = 2.5 × forward" : "");
    fmt::print(
        "OpenBLAS sgemm 2048³: {:.1f} GFLOP/s, the median of the run (kernel {}{}); "
        "each shape's ÷sgemm is to the sgemm measured right after it\n",
        gemm.gflops, gemm.kernel,
        gemm.coretype.empty() ? ""
                              : fmt::format(", forced by OPENBLAS_CORETYPE={}; unset it "
                                            "to measure the best kernel",
                                            gemm.coretype));
    fmt::print(
        "memory read bandwidth: {:.1f} GB/s, read in the target's vectors "
        "(floor = bytes of K and V{} at this rate)\n\n",
        bandwidth, dtype == DType::int8 ? " and their scales" : "");
    fmt::print("{:<20} {:>9} {:>14} {:>7} {:>9} {:>8} {:>12} {:>8}\n", "shape", "ms", "throughput",
               "÷sgemm", "floor ms", "peak MiB", "baseline ms", "speed-up");
  }
  for (const bench::ShapeResult& r : results) {
    if (flags.json) continue;
    const bench::Shape& shape = r.shape;
    const std::string throughput = shape.additive_dim > 0
                                       ? fmt::format("{:.2f} Gtanh/s", r.tanh_per_second / 1e9)
                                       : fmt::format("{:.1f} GFLOP/s", r.gflops);
    const std::string ratio =
        shape.additive_dim > 0 ? std::string("—") : fmt::format("{:.2f}", r.ratio_to_sgemm);
    const std::string baseline =
        backward || !shape.baseline_applies() || dtype == DType::int8
            ? fmt::format("{:>12} {:>8}", "—", "")
        : r.naive_ms > 0 ? fmt::format("{:>12.2f} {:>7.1f}×", r.naive_ms, r.speedup_over_naive)
                         : fmt::format("{:>12} {:>8}", "(N×N > 2 GiB)", "");
    const std::string floor = backward ? std::string("—") : fmt::format("{:.2f}", r.floor_ms);
    fmt::print("{:<20} {:>9.2f} {:>14} {:>7} {:>9} {:>8.0f} {}\n", shape.name, r.median_ms,
               throughput, ratio, floor, r.peak_mib, baseline);
  }
  for (const bench::ShapeResult& r : results) {
    if (flags.json || r.dense_ms <= 0) continue;
    fmt::print(
        "{}: {:.3f} of the time of the same shape without its block mask ({:.2f} against "
        "{:.2f} ms), which shows {:.3f} of the (query, key) pairs\n",
        r.shape.name, r.median_ms / r.dense_ms, r.median_ms, r.dense_ms, r.visible_share);
  }
  if (!flags.json) {
    fmt::print(
        "\nbaseline: GEMM → softmax → GEMM in float32 with OpenBLAS (the N×N matrix in "
        "memory); for additive shapes (A…), every score with std::tanh into that matrix; none for "
        "masks but causal (whose FLOPs count the visible pairs only), sinks or sigmoid\n");
    return;
  }
  std::string rows;
  for (const bench::ShapeResult& r : results) {
    const bench::Shape& s = r.shape;
    rows += fmt::format(
        "{}\n    {{\"shape\": \"{}\", \"batch\": {}, \"q_heads\": {}, \"kv_heads\": {}, "
        "\"q_len\": {}, \"k_len\": {}, \"head_dim\": {}, \"value_dim\": {}, "
        "\"additive_dim\": {}, \"causal\": {}, "
        "\"median_ms\": {:.6g}, \"gflops\": {:.2f}, \"sgemm_gflops\": {:.2f}, "
        "\"ratio_to_sgemm\": {:.4f}, "
        "\"tanh_per_second\": {:.4g}, \"floor_ms\": {:.6g}, \"peak_mib\": {:.1f}, "
        "\"baseline_ms\": {:.6g}, \"speedup_over_baseline\": {:.3f}, \"dense_ms\": {:.6g}, "
        "\"visible_share\": {:.6g}}}",
        rows.empty() ? "" : ",", s.name, s.batch, s.q_heads, s.kv_heads, s.q_len, s.k_len,
        s.head_dim, s.value_dim, s.additive_dim, s.causal ? "true" : "false", r.median_ms, r.gflops,
        r.sgemm_gflops, r.ratio_to_sgemm, r.tanh_per_second, r.floor_ms, r.peak_mib, r.naive_ms,
        r.speedup_over_naive, r.dense_ms, r.visible_share);
  }
  fmt::print(
      "{{\n  \"pass\": \"{}\", \"cpu\": \"{}\", \"threads\": {}, \"simd_target\": \"{}\", "
      "\"dtype\": \"{}\",\n"
      "  \"sgemm\": {{\"size\": 2048, \"gflops\": {:.2f}, \"kernel\": \"{}\", "
      "\"openblas_coretype\": \"{}\"}},\n  \"read_bandwidth_gbs\": {:.2f},\n  \"shapes\": [{}\n  "
      "]\n}}\n",
      flags.pass, json_escaped(bench::cpu_name()), threads, simd_target(), dtype_name(dtype),
      gemm.gflops, json_escaped(gemm.kernel), json_escaped(gemm.coretype), bandwidth, rows);
}

}  // namespace

void add_bench_command(CLI::App& app) {
  auto flags = std::make_shared<BenchFlags>();
  CLI::App* command = app.add_subcommand(
      "bench", "Attention throughput beside OpenBLAS sgemm, measured in the same run");
  command->add_flag("--json", flags->json, "print JSON instead of a table");
  command->add_option("--shapes", flags->shapes,
                      "comma-separated S1…S5, A1, M1, M2, K1, G1, G2, L1…L3 or "
                      "B<b>H<h>[Hk<hk>](N<n>|Nq<nq>Nk<nk>)D<d>[Dv<dv>][A<a>][docs<n>|slide<w>]"
                      "[window<w>[sinktokens<n>]][page<p>[ragged]][causal], "
                      "each optionally followed by sinks or sigmoid (page: a paged KV cache, "
                      "ragged: lengths from Nk/16 to Nk; K1 = B16H32Hk8Nq1Nk8192D128page16ragged; "
                      "G1, G2: D = 256; L1: D = 192, Dv = 128; L2, L3: Hk = 1, D = 576, Dv = 512)");
  command->add_option("--threads", flags->threads, "threads (0 = all cores)");
  command
      ->add_option("--dtype", flags->dtype,
                   "f32 | bf16 | f16 (inputs and output) | i8 (an int8 KV cache holding K and "
                   "V, float32 queries and output; forward only)")
      ->default_str("f32");
  command
      ->add_option("--pass", flags->pass,
                   "forward | backward (attention_backward: dQ, dK, dV; FLOPs 2.5 × forward)")
      ->default_str("forward");
  command->add_flag("--distributed", flags->distributed,
                    "under mpirun: ring attention per rank (compute, exposed communication, "
                    "hidden fraction) and a scaling model to 1024 ranks");
  command->add_option("--link-gbs", flags->link_gbs,
                      "with --distributed: link bandwidth for the model (0 = measured)");
  command->add_option("--latency-us", flags->latency_us, "with --distributed: link latency")
      ->default_str("2");
  command->add_option("--repetitions", flags->repetitions, "timed runs per shape (median)")
      ->default_str("5");
  command->callback([flags] { run_bench(*flags); });
}

}  // namespace qkv::cli
