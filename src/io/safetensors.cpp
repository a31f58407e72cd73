// .safetensors reading and writing. Like the .npy reader, every length is bounded before it is
// used: the header's length against the format's limit and the file size, the JSON's nesting
// depth while it is parsed (a safetensors header is at most 3 levels deep), each tensor's byte
// count against its dtype and shape, and the offsets against the data section, which they must
// tile exactly. The JSON itself is parsed by nlohmann::json.

#include "qkv/safetensors.hpp"

#include <fmt/format.h>

#include <algorithm>
#include <cstring>
#include <fstream>
#include <limits>
#include <nlohmann/json.hpp>
#include <vector>

#include "io/untrusted_file.hpp"
#include "qkv/error.hpp"

namespace qkv {

namespace {

constexpr std::uint64_t kMaxHeaderBytes = 100'000'000;  // the format's own bound
constexpr int kMaxDepth = 3;                            // {name: {"shape": [ … ]}}

struct DtypeName {
  const char* name;
  DType dtype;
};
constexpr DtypeName kDtypes[] = {{"F32", DType::float32},   {"F64", DType::float64},
                                 {"BF16", DType::bfloat16}, {"F16", DType::float16},
                                 {"I8", DType::int8},       {"I32", DType::int32},
                                 {"I64", DType::int64},     {"BOOL", DType::boolean}};

DType dtype_of(const std::string& name, const std::string& what, const std::string& tensor) {
  for (const DtypeName& known : kDtypes) {
    if (name == known.name) return known.dtype;
  }
  throw Error(fmt::format(
      "{}: tensor '{}': expected dtype F32, F64, BF16, F16, I8, I32, I64 or BOOL, got '{}'", what,
      io::escaped(tensor), io::escaped(name)));
}

const char* name_of(DType dtype) {
  for (const DtypeName& known : kDtypes) {
    if (dtype == known.dtype) return known.name;
  }
  return "";
}

// A header value as JSON in ASCII (other characters as \u escapes), escaped for a message.
std::string ascii_json(const nlohmann::json& value) {
  return io::escaped(value.dump(-1, ' ', /*ensure_ascii=*/true));
}

// A non-negative integer from the header, or an error naming where it was expected.
std::int64_t header_integer(const nlohmann::json& value, const std::string& what,
                            const std::string& tensor, const char* field) {
  if (!value.is_number_unsigned() ||
      value.get<std::uint64_t>() >
          static_cast<std::uint64_t>(std::numeric_limits<std::int64_t>::max())) {
    throw Error(fmt::format("{}: tensor '{}': expected non-negative integers in \"{}\", got {}",
                            what, io::escaped(tensor), field, ascii_json(value)));
  }
  return value.get<std::int64_t>();
}

struct Entry {
  std::string name;
  DType dtype;
  std::vector<std::int64_t> shape;
  std::uint64_t begin, end;
};

}  // namespace

NamedTensors read_safetensors(std::istream& in, std::uint64_t stream_bytes,
                              const std::string& what) {
  // 1. The header's length, bounded.
  if (stream_bytes < 8) {
    throw Error(fmt::format("{}: expected a .safetensors file (at least 8 bytes), got {} bytes",
                            what, stream_bytes));
  }
  unsigned char length_bytes[8];
  in.read(reinterpret_cast<char*>(length_bytes), 8);
  std::uint64_t header_bytes = 0;
  for (int b = 7; b >= 0; --b) header_bytes = (header_bytes << 8) | length_bytes[b];
  if (header_bytes > kMaxHeaderBytes) {
    throw Error(fmt::format("{}: expected a header of at most {} bytes, got {}", what,
                            kMaxHeaderBytes, header_bytes));
  }
  if (header_bytes > stream_bytes - 8) {
    throw Error(
        fmt::format("{}: expected a {}-byte header, the file ended early", what, header_bytes));
  }
  std::string text(header_bytes, '\0');
  in.read(text.data(), static_cast<std::streamsize>(header_bytes));
  if (static_cast<std::uint64_t>(in.gcount()) != header_bytes) {
    throw Error(
        fmt::format("{}: expected a {}-byte header, the file ended early", what, header_bytes));
  }

  // 2. The JSON, with its depth bounded while it is parsed.
  nlohmann::json header;
  try {
    header =
        nlohmann::json::parse(text, [&](int depth, nlohmann::json::parse_event_t, nlohmann::json&) {
          if (depth > kMaxDepth) {
            throw Error(
                fmt::format("{}: malformed header: nested deeper than {} levels", what, kMaxDepth));
          }
          return true;
        });
  } catch (const nlohmann::json::exception& error) {
    throw Error(fmt::format("{}: malformed header: {}", what, io::escaped(error.what())));
  }
  if (!header.is_object()) {
    throw Error(fmt::format("{}: malformed header: expected a JSON object, got {}", what,
                            header.type_name()));
  }

  // 3. Every entry, checked on its own.
  const std::uint64_t data_bytes = stream_bytes - 8 - header_bytes;
  std::vector<Entry> entries;
  for (const auto& [name, value] : header.items()) {
    const std::string shown = io::escaped(name);  // the name as messages show it
    if (name == "__metadata__") {
      if (!value.is_object())
        throw Error(fmt::format("{}: expected \"__metadata__\" to be an object", what));
      continue;
    }
    if (!value.is_object() || value.size() != 3 || !value.contains("dtype") ||
        !value.contains("shape") || !value.contains("data_offsets")) {
      throw Error(
          fmt::format("{}: tensor '{}': expected exactly \"dtype\", \"shape\" and "
                      "\"data_offsets\", got {}",
                      what, shown, ascii_json(value)));
    }
    const nlohmann::json& dtype = value["dtype"];
    const nlohmann::json& shape = value["shape"];
    const nlohmann::json& offsets = value["data_offsets"];
    if (!dtype.is_string()) {
      throw Error(fmt::format("{}: tensor '{}': expected a string \"dtype\", got {}", what, shown,
                              ascii_json(dtype)));
    }
    if (!shape.is_array() || !offsets.is_array() || offsets.size() != 2) {
      throw Error(
          fmt::format("{}: tensor '{}': expected \"shape\" [d, …] and \"data_offsets\" [begin, "
                      "end], got {} and {}",
                      what, shown, ascii_json(shape), ascii_json(offsets)));
    }
    Entry entry{name, dtype_of(dtype.get<std::string>(), what, name), {}, 0, 0};
    for (const nlohmann::json& extent : shape)
      entry.shape.push_back(header_integer(extent, what, name, "shape"));
    entry.begin =
        static_cast<std::uint64_t>(header_integer(offsets[0], what, name, "data_offsets"));
    entry.end = static_cast<std::uint64_t>(header_integer(offsets[1], what, name, "data_offsets"));
    const auto count = static_cast<std::uint64_t>(checked_numel(
        entry.shape, dtype_size(entry.dtype), fmt::format("{}: tensor '{}'", what, shown)));
    if (entry.begin > entry.end || entry.end > data_bytes) {
      throw Error(
          fmt::format("{}: tensor '{}': expected data_offsets within the {} bytes of data, got "
                      "[{}, {}]",
                      what, shown, data_bytes, entry.begin, entry.end));
    }
    if (entry.end - entry.begin != count * dtype_size(entry.dtype)) {
      throw Error(fmt::format("{}: tensor '{}': expected {} bytes for {} {}, got {}", what, shown,
                              count * dtype_size(entry.dtype), name_of(entry.dtype),
                              fmt::format("[{}]", fmt::join(entry.shape, ", ")),
                              entry.end - entry.begin));
    }
    entries.push_back(std::move(entry));
  }

  // 4. Together, the entries must tile the data exactly.
  std::sort(entries.begin(), entries.end(), [](const Entry& a, const Entry& b) {
    return a.begin < b.begin || (a.begin == b.begin && a.end < b.end);
  });
  std::uint64_t covered = 0;
  for (const Entry& entry : entries) {
    if (entry.begin != covered) {
      throw Error(fmt::format(
          "{}: tensor '{}': expected its data to start at byte {} ({}), got {}", what,
          io::escaped(entry.name), covered,
          entry.begin < covered ? "it overlaps the tensor before it" : "no holes allowed",
          entry.begin));
    }
    covered = entry.end;
  }
  if (covered != data_bytes) {
    throw Error(fmt::format("{}: expected the tensors to cover all {} bytes of data, they cover {}",
                            what, data_bytes, covered));
  }

  // 5. The data, now that every size is known to be the file's own.
  NamedTensors tensors;
  for (const Entry& entry : entries) {
    Tensor tensor(entry.dtype, entry.shape);
    in.read(static_cast<char*>(tensor.raw()), static_cast<std::streamsize>(tensor.nbytes()));
    if (static_cast<std::uint64_t>(in.gcount()) != tensor.nbytes()) {
      throw Error(
          fmt::format("{}: tensor '{}': the file ended early", what, io::escaped(entry.name)));
    }
    tensors.emplace(entry.name, std::move(tensor));
  }
  return tensors;
}

NamedTensors load_safetensors(const std::string& path) {
  io::UntrustedFile file = io::open_untrusted_file(path, ".safetensors");
  return read_safetensors(file.stream, file.size, path);
}

void write_safetensors(std::ostream& out, const NamedTensors& tensors) {
  nlohmann::json header = nlohmann::json::object();
  header["__metadata__"] = {{"format", "pt"}};
  std::uint64_t offset = 0;
  for (const auto& [name, tensor] : tensors) {
    if (name == "__metadata__") {
      throw Error("tensors: expected names other than \"__metadata__\", got \"__metadata__\"");
    }
    header[name] = {{"dtype", name_of(tensor.dtype())},
                    {"shape", tensor.shape()},
                    {"data_offsets", {offset, offset + tensor.nbytes()}}};
    offset += tensor.nbytes();
  }
  std::string text = header.dump();
  text.append((8 - text.size() % 8) % 8, ' ');  // the data starts 8-byte aligned
  unsigned char length_bytes[8];
  for (int b = 0; b < 8; ++b) length_bytes[b] = static_cast<unsigned char>(text.size() >> (8 * b));
  out.write(reinterpret_cast<const char*>(length_bytes), 8);
  out << text;
  for (const auto& [name, tensor] : tensors) {
    out.write(static_cast<const char*>(tensor.raw()),
              static_cast<std::streamsize>(tensor.nbytes()));
  }
}

void add_safetensors(StagedFiles& files, const std::string& path, const NamedTensors& tensors) {
  files.add(path, [&tensors](std::ostream& out) { write_safetensors(out, tensors); });
}

void save_safetensors(const std::string& path, const NamedTensors& tensors) {
  StagedFiles files;
  add_safetensors(files, path, tensors);
  files.commit();
}

}  // namespace qkv
