// The subcommands of the qkv tool. Each adds itself to the app with its flags and the callback
// that runs it once the command line has been parsed; the callback throws qkv::Error on bad input.
#pragma once

#include <CLI/CLI.hpp>

namespace qkv::cli {

// qkv attention --q F --k F --v F --out F …: attention forward on .npy files.
void add_attention_command(CLI::App& app);

// qkv bench: attention throughput beside OpenBLAS sgemm.
void add_bench_command(CLI::App& app);

// qkv demo: trains the toy translator with qkv and shows where its attention looks.
void add_demo_command(CLI::App& app);

// qkv plot WEIGHTS.npy -o FILE.png|FILE.svg: a heatmap of attention weights.
void add_plot_command(CLI::App& app);

// qkv explain: the four steps of attention computed on a sentence and shown with their labels.
void add_explain_command(CLI::App& app);

// qkv mha: a MultiheadAttention layer from a .safetensors state_dict, forward and backward.
void add_mha_command(CLI::App& app);

}  // namespace qkv::cli
