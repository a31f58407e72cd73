// .safetensors files: named weights, as PyTorch's state_dict is saved and loaded.
#pragma once

#include <cstdint>
#include <iosfwd>
#include <map>
#include <string>

#include "qkv/staged_files.hpp"
#include "qkv/tensor.hpp"

namespace qkv {

// Tensors by name (state_dict keys such as "in_proj_weight", "out_proj.bias"), in name order.
using NamedTensors = std::map<std::string, Tensor>;

// Reads a .safetensors file: an 8-byte little-endian header length N, N bytes of JSON
//   {"name": {"dtype": "F32", "shape": [3, 4], "data_offsets": [begin, end]}, …,
//    "__metadata__": {"format": "pt"}}
// then the data, which the tensors' offsets (relative to its start) must cover exactly, without
// holes or overlaps. dtypes F32, F64, BF16, I32, I64 and BOOL are read (F16 and the 8-bit types
// are refused). The file is untrusted: a header over 100 MB (the format's own bound) or past the
// end of the file, malformed or over-nested JSON, a missing or extra field, a size that does not
// match dtype × shape, or offsets out of place give qkv::Error naming the file and the tensor;
// nothing is allocated beyond the file's own size.
NamedTensors load_safetensors(const std::string& path);

// The same from a stream of known size; `what` names the source in error messages.
NamedTensors read_safetensors(std::istream& in, std::uint64_t stream_bytes,
                              const std::string& what);

// Writes `tensors` (rank and dtype as they are; not bfloat16-converted) as .safetensors, in name
// order, with "__metadata__": {"format": "pt"} so PyTorch tooling reads it back.
void write_safetensors(std::ostream& out, const NamedTensors& tensors);

// Writes `tensors` to `path` all or nothing (StagedFiles).
void save_safetensors(const std::string& path, const NamedTensors& tensors);
void add_safetensors(StagedFiles& files, const std::string& path, const NamedTensors& tensors);

}  // namespace qkv
