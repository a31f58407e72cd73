#include "qkv/staged_files.hpp"

#include <fmt/format.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <fstream>

#include "qkv/error.hpp"

namespace qkv {

StagedFiles::~StagedFiles() {
  for (const auto& [temporary, final_path] : staged_) std::remove(temporary.c_str());
}

void StagedFiles::add(const std::string& path, const std::function<void(std::ostream&)>& write) {
  std::string pattern = path + ".tmp-XXXXXX";
  const int descriptor = ::mkstemp(pattern.data());
  if (descriptor < 0) {
    throw Error(fmt::format("{}: cannot create a file here ({})", path, std::strerror(errno)));
  }
  ::fchmod(descriptor, 0644);  // mkstemp's 0600 would surprise whoever reads the result
  ::close(descriptor);
  staged_.emplace_back(pattern, path);
  std::ofstream out(pattern, std::ios::binary | std::ios::trunc);
  write(out);
  out.close();
  if (!out) throw Error(fmt::format("{}: cannot write ({})", path, std::strerror(errno)));
}

void StagedFiles::commit() {
  for (auto& [temporary, final_path] : staged_) {
    if (std::rename(temporary.c_str(), final_path.c_str()) != 0) {
      throw Error(
          fmt::format("{}: cannot rename into place ({})", final_path, std::strerror(errno)));
    }
    temporary.clear();  // committed: nothing left to remove
  }
  staged_.clear();
}

}  // namespace qkv
