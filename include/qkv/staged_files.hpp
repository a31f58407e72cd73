// Output files written all or nothing.
#pragma once

#include <functional>
#include <iosfwd>
#include <string>
#include <utility>
#include <vector>

namespace qkv {

// Several files written all or nothing. add() writes each file completely into a temporary file
// beside its target; commit() renames them all into place. Files not committed (an error in
// between, or no commit at all) are removed when the object is destroyed, so a failed command
// leaves no partial output behind. Throws qkv::Error naming the path when a file cannot be made.
class StagedFiles {
 public:
  StagedFiles() = default;
  StagedFiles(const StagedFiles&) = delete;
  StagedFiles& operator=(const StagedFiles&) = delete;
  ~StagedFiles();

  // Writes `path`'s future content through `write`, into a temporary file for now.
  void add(const std::string& path, const std::function<void(std::ostream&)>& write);
  void commit();

 private:
  std::vector<std::pair<std::string, std::string>> staged_;  // (temporary, final) paths
};

}  // namespace qkv
