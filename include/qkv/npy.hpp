// .npy files: numpy's array format, read as untrusted input.
#pragma once

#include <cstdint>
#include <iosfwd>
#include <span>
#include <string>
#include <utility>
#include <vector>

#include "qkv/staged_files.hpp"
#include "qkv/tensor.hpp"

namespace qkv {

// Reads a .npy file (format versions 1.0, 2.0, 3.0) holding a C-order, little-endian array of
// float32 ('<f4'), float64 ('<f8'), bool ('|b1'), int32 ('<i4') or int64 ('<i8'), of any rank.
// The file is untrusted: a bad magic string, an oversized or malformed header, an unsupported
// dtype, Fortran order, a shape whose byte count overflows, or a data section shorter or longer
// than the header promises all throw qkv::Error naming the file. Nothing is allocated for the
// data until its size has been checked against the file's.
Tensor load_npy(const std::string& path);

// The shape of a .npy file, from its header (checked as load_npy checks it).
std::vector<std::int64_t> npy_shape(const std::string& path);

// Only the rows [offset, offset + length) of each piece, along dimension `dim`, of a .npy file,
// in piece order: the header is checked as load_npy checks it, then the file is memory-mapped and
// just those bytes are read (each MPI rank reads its shard of one file this way).
Tensor load_npy_rows(const std::string& path, int dim,
                     std::span<const std::pair<std::int64_t, std::int64_t>> pieces);

// Parses .npy content from a stream of known total size `stream_bytes` (used by load_npy).
// `what` names the source in error messages.
Tensor read_npy(std::istream& in, std::uint64_t stream_bytes, const std::string& what);

// Writes `array` (any strides; written densely in C order) as a .npy version 1.0 stream.
// numpy has no bfloat16: such an array throws qkv::Error (convert it to float32 first).
void write_npy(std::ostream& out, const TensorView& array);

// Writes `array` to `path` atomically: into a temporary file in the same folder, renamed over
// `path` only when complete. Throws qkv::Error if the file cannot be written.
void save_npy(const std::string& path, const TensorView& array);

// Stages `array` as a .npy file in `files` (see qkv/staged_files.hpp).
void add_npy(StagedFiles& files, const std::string& path, const TensorView& array);

}  // namespace qkv
