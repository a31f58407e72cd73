// .npy reading and writing. The reader treats its input as hostile: every length is bounded
// before it is used, the header is parsed by a small grammar (no eval), and the data section must
// be exactly as long as the header's shape says before anything is allocated for it.

#include "qkv/npy.hpp"

#include <fcntl.h>
#include <sys/mman.h>
#include <unistd.h>

#include <fmt/format.h>

#include <cstring>
#include <fstream>
#include <limits>
#include <optional>
#include <string_view>

#include "io/untrusted_file.hpp"
#include "qkv/error.hpp"

namespace qkv {

namespace {

constexpr char kMagic[] = "\x93NUMPY";
constexpr std::size_t kMagicLength = 6;
constexpr std::uint32_t kMaxHeaderLength = 65536;  // numpy itself writes under 200 bytes
constexpr std::size_t kMaxRankInFile = 32;         // numpy's own limit on dimensions

struct Header {
  std::string descr;
  std::optional<bool> fortran_order;
  std::optional<std::vector<std::int64_t>> shape;
};

// Parses the header dictionary, e.g. {'descr': '<f4', 'fortran_order': False, 'shape': (3, 4), }
class HeaderParser {
 public:
  HeaderParser(std::string_view text, const std::string& what) : text_(text), what_(what) {}

  Header parse() {
    Header header;
    bool have_descr = false;
    expect('{');
    while (!peek('}')) {
      const std::string key = parse_string();
      expect(':');
      if (key == "descr") {
        if (have_descr) fail("'descr' given twice");
        header.descr = parse_string();
        have_descr = true;
      } else if (key == "fortran_order") {
        if (header.fortran_order) fail("'fortran_order' given twice");
        header.fortran_order = parse_bool();
      } else if (key == "shape") {
        if (header.shape) fail("'shape' given twice");
        header.shape = parse_shape();
      } else {
        fail(fmt::format("unexpected key '{}'", io::escaped(key)));
      }
      if (!peek('}')) expect(',');
    }
    expect('}');
    skip_space();
    if (position_ != text_.size()) fail("unexpected text after the header dictionary");
    if (!have_descr || !header.fortran_order || !header.shape) {
      fail("expected keys 'descr', 'fortran_order' and 'shape'");
    }
    return header;
  }

 private:
  [[noreturn]] void fail(const std::string& why) const {
    throw Error(fmt::format("{}: malformed .npy header: {}", what_, why));
  }
  void skip_space() {
    while (position_ < text_.size() && (text_[position_] == ' ' || text_[position_] == '\n' ||
                                        text_[position_] == '\t' || text_[position_] == '\r')) {
      ++position_;
    }
  }
  bool peek(char c) {
    skip_space();
    return position_ < text_.size() && text_[position_] == c;
  }
  void expect(char c) {
    if (!peek(c)) fail(fmt::format("expected '{}' at byte {}", c, position_));
    ++position_;
  }
  std::string parse_string() {
    skip_space();
    if (position_ >= text_.size() || (text_[position_] != '\'' && text_[position_] != '"')) {
      fail(fmt::format("expected a quoted string at byte {}", position_));
    }
    const char quote = text_[position_++];
    const std::size_t end = text_.find(quote, position_);
    if (end == std::string_view::npos) fail("unterminated string");
    std::string value(text_.substr(position_, end - position_));
    if (value.find('\\') != std::string::npos) fail("escapes in strings are not supported");
    position_ = end + 1;
    return value;
  }
  bool parse_bool() {
    skip_space();
    for (const auto& [word, value] : {std::pair{"True", true}, std::pair{"False", false}}) {
      const std::string_view w(word);
      if (text_.substr(position_, w.size()) == w) {
        position_ += w.size();
        return value;
      }
    }
    fail(fmt::format("expected True or False at byte {}", position_));
  }
  std::vector<std::int64_t> parse_shape() {
    std::vector<std::int64_t> shape;
    expect('(');
    while (!peek(')')) {
      skip_space();
      std::int64_t value = 0;
      std::size_t digits = 0;
      while (position_ < text_.size() && text_[position_] >= '0' && text_[position_] <= '9') {
        if (value > (std::numeric_limits<std::int64_t>::max() - 9) / 10) fail("shape too large");
        value = value * 10 + (text_[position_] - '0');
        ++position_;
        ++digits;
      }
      if (digits == 0) fail(fmt::format("expected a non-negative integer at byte {}", position_));
      shape.push_back(value);
      if (shape.size() > kMaxRankInFile)
        fail(fmt::format("more than {} dimensions", kMaxRankInFile));
      if (!peek(')')) expect(',');
    }
    expect(')');
    return shape;
  }

  std::string_view text_;
  const std::string& what_;
  std::size_t position_ = 0;
};

DType dtype_from_descr(const std::string& descr, const std::string& what) {
  if (descr == "<f4") return DType::float32;
  if (descr == "<f8") return DType::float64;
  if (descr == "|b1") return DType::boolean;
  if (descr == "<i4") return DType::int32;
  if (descr == "<i8") return DType::int64;
  if (descr == "<f2") return DType::float16;
  if (descr == "|i1") return DType::int8;
  throw Error(fmt::format(
      "{}: expected dtype '<f4', '<f8', '<f2', '|b1', '|i1', '<i4' or '<i8' (little-endian "
      "float32, float64, float16, bool, int8, int32, int64), got '{}'",
      what, io::escaped(descr)));
}

const char* descr_of(DType dtype) {
  switch (dtype) {
    case DType::float32:
      return "<f4";
    case DType::float64:
      return "<f8";
    case DType::boolean:
      return "|b1";
    case DType::int32:
      return "<i4";
    case DType::int64:
      return "<i8";
    case DType::float16:
      return "<f2";
    case DType::int8:
      return "|i1";
    case DType::bfloat16:
      break;  // numpy has no bfloat16: write_npy refuses it
  }
  return "";
}

void read_exactly(std::istream& in, void* destination, std::size_t bytes, const std::string& what) {
  in.read(static_cast<char*>(destination), static_cast<std::streamsize>(bytes));
  if (static_cast<std::size_t>(in.gcount()) != bytes) {
    throw Error(fmt::format("{}: expected {} more bytes, the file ended early", what, bytes));
  }
}

// The header of a .npy stream, checked against the stream's size: dtype, shape and where the data
// starts.
struct NpyLayout {
  DType dtype = DType::float32;
  std::vector<std::int64_t> shape;
  std::uint64_t data_offset = 0, data_bytes = 0;
};

NpyLayout read_npy_layout(std::istream& in, std::uint64_t stream_bytes, const std::string& what) {
  unsigned char prefix[8];
  if (stream_bytes < 10) {
    throw Error(fmt::format("{}: expected a .npy file (at least 10 bytes), got {} bytes", what,
                            stream_bytes));
  }
  read_exactly(in, prefix, sizeof prefix, what);
  if (std::memcmp(prefix, kMagic, kMagicLength) != 0) {
    throw Error(fmt::format("{}: expected a .npy file (magic \\x93NUMPY), got other bytes", what));
  }
  const unsigned major = prefix[6];
  std::uint64_t header_length = 0;
  std::uint64_t prefix_length = 0;
  if (major == 1) {
    unsigned char length[2];
    read_exactly(in, length, 2, what);
    header_length = length[0] | (static_cast<std::uint32_t>(length[1]) << 8);
    prefix_length = 10;
  } else if (major == 2 || major == 3) {
    unsigned char length[4];
    read_exactly(in, length, 4, what);
    header_length = length[0] | (static_cast<std::uint32_t>(length[1]) << 8) |
                    (static_cast<std::uint32_t>(length[2]) << 16) |
                    (static_cast<std::uint32_t>(length[3]) << 24);
    prefix_length = 12;
  } else {
    throw Error(fmt::format("{}: expected .npy format version 1, 2 or 3, got {}.{}", what, major,
                            static_cast<unsigned>(prefix[7])));
  }
  if (header_length > kMaxHeaderLength) {
    throw Error(fmt::format("{}: expected a .npy header of at most {} bytes, got {}", what,
                            kMaxHeaderLength, header_length));
  }
  if (header_length > stream_bytes - prefix_length) {
    throw Error(fmt::format("{}: expected a {}-byte .npy header, the file ended early", what,
                            header_length));
  }
  std::string text(header_length, '\0');
  read_exactly(in, text.data(), header_length, what);
  const Header header = HeaderParser(text, what).parse();
  const DType dtype = dtype_from_descr(header.descr, what);
  if (*header.fortran_order) {
    throw Error(fmt::format("{}: expected C order (fortran_order False), got Fortran order", what));
  }
  const std::vector<std::int64_t>& shape = *header.shape;
  const std::int64_t count = checked_numel(shape, dtype_size(dtype), what);
  const auto data_bytes = static_cast<std::uint64_t>(count) * dtype_size(dtype);
  const std::uint64_t available = stream_bytes - prefix_length - header_length;
  if (available != data_bytes) {
    throw Error(fmt::format("{}: expected {} bytes of data for shape ({}) of {}, got {} ({})", what,
                            data_bytes, fmt::join(shape, ", "), dtype_name(dtype), available,
                            available < data_bytes ? "truncated" : "trailing bytes"));
  }
  return {dtype, shape, prefix_length + header_length, data_bytes};
}

}  // namespace

Tensor read_npy(std::istream& in, std::uint64_t stream_bytes, const std::string& what) {
  const NpyLayout layout = read_npy_layout(in, stream_bytes, what);
  Tensor tensor(layout.dtype, layout.shape);
  read_exactly(in, tensor.raw(), layout.data_bytes, what);
  return tensor;
}

Tensor load_npy(const std::string& path) {
  io::UntrustedFile file = io::open_untrusted_file(path, ".npy");
  return read_npy(file.stream, file.size, path);
}

std::vector<std::int64_t> npy_shape(const std::string& path) {
  io::UntrustedFile file = io::open_untrusted_file(path, ".npy");
  return read_npy_layout(file.stream, file.size, path).shape;
}

Tensor load_npy_rows(const std::string& path, int dim,
                     std::span<const std::pair<std::int64_t, std::int64_t>> pieces) {
  io::UntrustedFile file = io::open_untrusted_file(path, ".npy");
  const NpyLayout layout = read_npy_layout(file.stream, file.size, path);
  const auto rank = static_cast<int>(layout.shape.size());
  if (dim < 0 || dim >= rank) {
    throw Error(fmt::format("{}: expected an array with a dimension {} to slice, got rank {}", path,
                            dim, rank));
  }
  const std::int64_t extent = layout.shape[static_cast<std::size_t>(dim)];
  std::int64_t rows = 0;
  for (const auto& [offset, length] : pieces) {
    if (offset < 0 || length < 0 || offset > extent - length) {
      throw Error(fmt::format("{}: expected rows [{}, {}) within its {} rows along dimension {}",
                              path, offset, offset + length, extent, dim));
    }
    rows += length;
  }
  std::vector<std::int64_t> shape = layout.shape;
  shape[static_cast<std::size_t>(dim)] = rows;
  Tensor tensor(layout.dtype, shape);
  if (tensor.numel() == 0) return tensor;
  // Map the file and copy only the selected rows.
  const int fd = ::open(path.c_str(), O_RDONLY);
  if (fd < 0) throw Error(fmt::format("{}: cannot open for reading", path));
  void* mapped = ::mmap(nullptr, file.size, PROT_READ, MAP_PRIVATE, fd, 0);
  ::close(fd);
  if (mapped == MAP_FAILED) throw Error(fmt::format("{}: cannot map the file", path));
  const auto* data = static_cast<const std::byte*>(mapped) + layout.data_offset;
  std::int64_t outer = 1, inner = static_cast<std::int64_t>(dtype_size(layout.dtype));
  for (int d = 0; d < dim; ++d) outer *= layout.shape[static_cast<std::size_t>(d)];
  for (int d = dim + 1; d < rank; ++d) inner *= layout.shape[static_cast<std::size_t>(d)];
  auto* out = static_cast<std::byte*>(tensor.raw());
  for (std::int64_t o = 0; o < outer; ++o) {
    for (const auto& [offset, length] : pieces) {
      std::memcpy(out, data + (o * extent + offset) * inner,
                  static_cast<std::size_t>(length * inner));
      out += length * inner;
    }
  }
  ::munmap(mapped, file.size);
  return tensor;
}

void write_npy(std::ostream& out, const TensorView& array) {
  if (array.dtype == DType::bfloat16) {
    throw Error(
        "array: expected a dtype numpy has (float32, float64, float16, bool, int8, int32, int64), "
        "got "
        "bfloat16; convert it to float32 first");
  }
  std::string dict =
      fmt::format("{{'descr': '{}', 'fortran_order': False, 'shape': (", descr_of(array.dtype));
  for (int d = 0; d < array.rank; ++d) {
    dict += fmt::format("{}{}", array.shape[d],
                        array.rank == 1      ? ","
                        : d + 1 < array.rank ? ", "
                                             : "");
  }
  dict += "), }";
  // Pad with spaces so that the data starts on a 64-byte boundary, and end with a newline.
  const std::size_t unpadded = 10 + dict.size() + 1;
  dict.append((64 - unpadded % 64) % 64, ' ');
  dict += '\n';
  const auto header_length = static_cast<std::uint16_t>(dict.size());
  out.write(kMagic, kMagicLength);
  const char version_and_length[4] = {1, 0, static_cast<char>(header_length & 0xff),
                                      static_cast<char>(header_length >> 8)};
  out.write(version_and_length, 4);
  out << dict;
  if (array.is_contiguous()) {
    out.write(static_cast<const char*>(array.data),
              static_cast<std::streamsize>(array.numel() *
                                           static_cast<std::int64_t>(dtype_size(array.dtype))));
  } else {
    const Tensor dense = to_tensor(array);
    out.write(static_cast<const char*>(dense.raw()), static_cast<std::streamsize>(dense.nbytes()));
  }
}

void save_npy(const std::string& path, const TensorView& array) {
  StagedFiles files;
  add_npy(files, path, array);
  files.commit();
}

void add_npy(StagedFiles& files, const std::string& path, const TensorView& array) {
  files.add(path, [&array](std::ostream& out) { write_npy(out, array); });
}

}  // namespace qkv
