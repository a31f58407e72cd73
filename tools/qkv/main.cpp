// qkv: the command-line tool. Bad input prints one line to stderr and exits with status 2.

#include <fmt/format.h>

#include <CLI/CLI.hpp>
#include <cstdio>
#include <exception>
#include <string>
#include <string_view>

#include "commands.hpp"
#include "qkv/error.hpp"

namespace {

// The message as one line of plain text: control characters (a newline, a terminal escape
// sequence that reached a message through a file name or a flag) are written as \xNN.
std::string one_line(std::string_view message) {
  std::string line;
  for (const char c : message) {
    const auto byte = static_cast<unsigned char>(c);
    if (byte < 0x20 || byte == 0x7f) {
      line += fmt::format("\\x{:02x}", byte);
    } else {
      line += c;
    }
  }
  return line;
}

}  // namespace

int main(int argc, char** argv) {
  CLI::App app{"qkv: attention — queries ask, keys answer, values carry the content."};
  app.require_subcommand(1);
  qkv::cli::add_attention_command(app);
  qkv::cli::add_bench_command(app);
  qkv::cli::add_demo_command(app);
  qkv::cli::add_explain_command(app);
  qkv::cli::add_mha_command(app);
  qkv::cli::add_plot_command(app);
  try {
    app.parse(argc, argv);  // runs the chosen command's callback
  } catch (const CLI::CallForHelp&) {
    std::fputs(app.help().c_str(), stdout);
  } catch (const CLI::CallForAllHelp&) {
    std::fputs(app.help("", CLI::AppFormatMode::All).c_str(), stdout);
  } catch (const CLI::ParseError& error) {
    fmt::print(stderr, "qkv: {}\n", one_line(error.what()));
    return 2;
  } catch (const qkv::Error& error) {
    fmt::print(stderr, "qkv: {}\n", one_line(error.what()));
    return 2;
  } catch (const std::exception& error) {
    fmt::print(stderr, "qkv: internal error: {}\n", one_line(error.what()));
    return 1;
  }
  return 0;
}
