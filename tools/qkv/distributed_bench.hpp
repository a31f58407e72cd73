// qkv bench --distributed (built when MPI is found).
#pragma once

#include <string>

namespace qkv::cli {

// Under mpirun: ring attention on `spec` (a bench shape; default B1H8N4096D64causal) split per
// rank into compute and exposed communication, the hidden fraction, and the scaling model for
// 8 … 1024 ranks at link_gbs (0: the bandwidth measured here) and latency_us.
void run_distributed_bench(const std::string& spec, int repetitions, double link_gbs,
                           double latency_us);

}  // namespace qkv::cli
