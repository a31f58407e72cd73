// qkv._qkv: the C++ library seen from Python, one level below the public functions of
// qkv/__init__.py. Arrays arrive as NumPy arrays (torch tensors are viewed as NumPy arrays by the
// Python layer, without a copy); uint16 arrays hold bfloat16 bits. Each array becomes a TensorView
// over the same memory (strides in elements), so nothing is copied on the way in or out, and the
// GIL is released while the library computes.

#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cstring>
#include <optional>
#include <string>

#include "qkv/attention.hpp"
#include "qkv/backward.hpp"
#include "qkv/error.hpp"
#include "qkv/explain.hpp"
#include "qkv/kv_cache.hpp"
#include "qkv/multihead_attention.hpp"
#include "qkv/reference.hpp"
#include "qkv/simd.hpp"
#include "score_pieces.hpp"

namespace py = pybind11;

namespace {

// The qkv dtype of a NumPy array (uint16 is bfloat16, float16 is float16); TypeError for anything
// else.
qkv::DType dtype_of(const py::array& array, const std::string& name) {
  const py::dtype dtype = array.dtype();
  const char kind = dtype.kind();
  const auto size = dtype.itemsize();
  if (kind == 'f' && size == 4) return qkv::DType::float32;
  if (kind == 'f' && size == 8) return qkv::DType::float64;
  if (kind == 'f' && size == 2) return qkv::DType::float16;
  if (kind == 'b' && size == 1) return qkv::DType::boolean;
  if (kind == 'i' && size == 1) return qkv::DType::int8;
  if (kind == 'i' && size == 4) return qkv::DType::int32;
  if (kind == 'i' && size == 8) return qkv::DType::int64;
  if (kind == 'u' && size == 2) return qkv::DType::bfloat16;
  throw py::type_error(
      name + ": expected float32, float64, bfloat16, float16, bool, int8, int32 or int64, got " +
      py::repr(dtype).cast<std::string>());
}

template <class View>
View view_of(const py::array& array, const std::string& name, void* data) {
  if (array.ndim() > qkv::kMaxRank) {
    throw py::value_error(name + ": expected rank <= 4, got rank " + std::to_string(array.ndim()));
  }
  View view;
  view.data = data;
  view.dtype = dtype_of(array, name);
  view.rank = static_cast<int>(array.ndim());
  const auto itemsize = array.itemsize();
  for (int d = 0; d < view.rank; ++d) {
    view.shape[static_cast<std::size_t>(d)] = array.shape(d);
    if (array.strides(d) % itemsize != 0) {
      throw py::value_error(name + ": expected strides that are whole elements");
    }
    view.strides[static_cast<std::size_t>(d)] = array.strides(d) / itemsize;
  }
  return view;
}

qkv::TensorView input(const py::array& array, const std::string& name) {
  return view_of<qkv::TensorView>(array, name, const_cast<void*>(array.data()));
}

qkv::MutableTensorView output(py::array& array, const std::string& name) {
  if (!array.writeable()) throw py::value_error(name + ": expected a writeable array");
  return view_of<qkv::MutableTensorView>(array, name, array.mutable_data());
}

std::optional<qkv::TensorView> optional_input(const py::dict& options, const char* key) {
  if (!options.contains(key) || options[key].is_none()) return std::nullopt;
  return input(options[key].cast<py::array>(), key);
}

template <class T>
T get(const py::dict& options, const char* key, T fallback) {
  if (!options.contains(key) || options[key].is_none()) return fallback;
  return options[key].cast<T>();
}

// AttentionOptions and what they point at for the call: the built-in score_mod's pieces.
struct CallOptions {
  qkv::AttentionOptions options;
  std::unique_ptr<qkv::python::ScorePieces> score_pieces;
};

// The built-in score_mod of options["score_pieces"] (tuples of kind, parameter index, constant)
// over the arrays of options["score_parameters"].
std::unique_ptr<qkv::python::ScorePieces> score_pieces_of(const py::dict& o) {
  if (!o.contains("score_pieces") || o["score_pieces"].is_none()) return nullptr;
  std::vector<qkv::python::ScorePiece> pieces;
  for (const py::handle item : o["score_pieces"]) {
    const auto entry = item.cast<py::tuple>();
    qkv::python::ScorePiece piece;
    piece.kind = qkv::python::parse_piece_kind(entry[0].cast<std::string>());
    piece.parameter = entry[1].cast<int>();
    piece.constant = entry[2].cast<double>();
    pieces.push_back(piece);
  }
  std::vector<qkv::TensorView> parameters;
  if (o.contains("score_parameters")) {
    for (const py::handle item : o["score_parameters"])
      parameters.push_back(input(item.cast<py::array>(), "score_mod parameter"));
  }
  return std::make_unique<qkv::python::ScorePieces>(std::move(pieces), parameters);
}

// AttentionOptions from the keyword dictionary the Python layer builds (arrays stay alive in it).
CallOptions options_of(const py::dict& o) {
  CallOptions call;
  qkv::AttentionOptions& options = call.options;
  options.score = qkv::parse_score(get<std::string>(o, "score", "scaled_dot"));
  if (o.contains("scale") && !o["scale"].is_none()) options.scale = o["scale"].cast<double>();
  options.softcap = get<double>(o, "softcap", 0.0);
  options.w = optional_input(o, "w");
  options.wq = optional_input(o, "wq");
  options.wk = optional_input(o, "wk");
  options.va = optional_input(o, "va");
  options.temperature = optional_input(o, "temperature");
  options.alibi_slopes = optional_input(o, "alibi_slopes");
  options.sinks = optional_input(o, "sinks");
  options.normalization = qkv::parse_normalization(get<std::string>(o, "normalization", "softmax"));
  if (o.contains("sigmoid_bias") && !o["sigmoid_bias"].is_none())
    options.sigmoid_bias = o["sigmoid_bias"].cast<double>();
  options.bias = optional_input(o, "bias");
  options.causal = get<bool>(o, "causal", false);
  options.causal_align =
      qkv::parse_causal_align(get<std::string>(o, "causal_align", "bottom-right"));
  options.prefix_length = get<std::int64_t>(o, "prefix_length", 0);
  if (o.contains("block_mask") && !o["block_mask"].is_none())
    options.block_mask = o["block_mask"].cast<const qkv::BlockMask*>();
  options.window_left = get<std::int64_t>(o, "window_left", -1);
  options.window_right = get<std::int64_t>(o, "window_right", -1);
  options.sink_tokens = get<std::int64_t>(o, "sink_tokens", 0);
  options.key_lengths = optional_input(o, "key_lengths");
  options.key_starts = optional_input(o, "key_starts");
  options.mask = optional_input(o, "mask");
  options.dropout = get<double>(o, "dropout", 0.0);
  options.dropout_seed = get<std::uint64_t>(o, "dropout_seed", 0);
  options.threads = get<int>(o, "threads", 0);
  call.score_pieces = score_pieces_of(o);
  if (call.score_pieces) options.score_mod = &call.score_pieces->score_mod();
  return call;
}

// A copy of a float32 or float64 tensor as a NumPy array of the same dtype and shape.
py::array numpy_copy(const qkv::Tensor& tensor) {
  const std::vector<py::ssize_t> shape(tensor.shape().begin(), tensor.shape().end());
  py::array array = tensor.dtype() == qkv::DType::float64 ? py::array(py::array_t<double>(shape))
                                                          : py::array(py::array_t<float>(shape));
  if (tensor.nbytes() > 0) std::memcpy(array.mutable_data(), tensor.raw(), tensor.nbytes());
  return array;
}

// qkv::explain_attention with a fresh layer, its steps as a dict of NumPy arrays and numbers.
py::dict explain(const std::vector<std::string>& words, const std::string& score, std::int64_t dim,
                 std::int64_t heads, bool causal, std::uint64_t seed) {
  const qkv::ExplainedAttention s =
      qkv::explain_attention(words, qkv::parse_score(score), dim, heads, causal, seed);
  py::dict steps;
  steps["words"] = s.words;
  steps["score"] = std::string(qkv::score_name(s.score));
  steps["scale"] = s.scale;
  steps["causal"] = s.causal;
  for (const auto& [name, tensor] :
       {std::pair{"x", &s.x}, std::pair{"in_proj_weight", &s.in_proj_weight}, std::pair{"q", &s.q},
        std::pair{"k", &s.k}, std::pair{"v", &s.v}, std::pair{"scores", &s.scores},
        std::pair{"masked_scores", &s.masked_scores}, std::pair{"weights", &s.weights},
        std::pair{"output", &s.output}})
    steps[name] = numpy_copy(*tensor);
  py::dict parameters;
  for (const auto& [name, tensor] : s.score_parameters)
    parameters[name.c_str()] = numpy_copy(tensor);
  steps["score_parameters"] = parameters;
  steps["fast_path_difference"] = s.fast_path_difference;
  steps["fast_path_target"] = s.fast_path_target;
  return steps;
}

void forward(const py::array& q, const py::array& k, const py::array& v, const py::dict& options,
             py::array out, std::optional<py::array> lse, std::optional<py::array> weights) {
  const CallOptions call = options_of(options);
  const qkv::AttentionOptions& attention_options = call.options;
  qkv::AttentionOutputs outputs;
  outputs.out = output(out, "out");
  if (lse) outputs.lse = output(*lse, "lse");
  if (weights) outputs.weights = output(*weights, "weights");
  const qkv::TensorView qv = input(q, "q"), kv = input(k, "k"), vv = input(v, "v");
  py::gil_scoped_release release;
  qkv::attention_forward(qv, kv, vv, attention_options, outputs);
}

void backward(const py::array& q, const py::array& k, const py::array& v, const py::dict& options,
              const py::array& dout, std::optional<py::array> dlse, const py::array& out,
              const py::array& lse, py::dict gradients) {
  const CallOptions call = options_of(options);
  const qkv::AttentionOptions& attention_options = call.options;
  qkv::AttentionGradients grads;
  const std::pair<const char*, std::optional<qkv::MutableTensorView>*> slots[] = {
      {"dq", &grads.dq},        {"dk", &grads.dk},       {"dv", &grads.dv},
      {"dw", &grads.dw},        {"dwq", &grads.dwq},     {"dwk", &grads.dwk},
      {"dva", &grads.dva},      {"dbias", &grads.dbias}, {"dtemperature", &grads.dtemperature},
      {"dsinks", &grads.dsinks}};
  for (const auto& [name, slot] : slots) {
    if (gradients.contains(name) && !gradients[name].is_none()) {
      py::array array = gradients[name].cast<py::array>();
      *slot = output(array, name);
    }
  }
  if (gradients.contains("dscore_mod")) {
    for (const py::handle item : gradients["dscore_mod"]) {
      if (item.is_none()) {
        grads.dscore_mod.emplace_back();
      } else {
        py::array array = item.cast<py::array>();
        grads.dscore_mod.emplace_back(output(array, "dscore_mod"));
      }
    }
  }
  const qkv::TensorView qv = input(q, "q"), kv = input(k, "k"), vv = input(v, "v");
  const qkv::TensorView dout_view = input(dout, "dout");
  const std::optional<qkv::TensorView> dlse_view =
      dlse ? std::optional<qkv::TensorView>(input(*dlse, "dlse")) : std::nullopt;
  const qkv::SavedForward saved{input(out, "out"), input(lse, "lse")};
  py::gil_scoped_release release;
  qkv::attention_backward(qv, kv, vv, attention_options, dout_view, dlse_view, grads, saved);
}

// The float64 reference's scores and weights of a call: (scores, weights), both float64
// [B, Hq, Nq, Nk]; scores after every step of contract §2 with −inf where a mask hides the key,
// weights after dropout (0 where dropped). For the Python layer's second derivative, which needs
// to know which pairs a call's masks and dropout let through.
py::tuple reference_scores(const py::array& q, const py::array& k, const py::array& v,
                           const py::dict& options) {
  const CallOptions call = options_of(options);
  if (q.ndim() != 4 || k.ndim() != 4 || v.ndim() != 4)
    throw qkv::Error("q, k, v: expected [B, N, H, D] (rank 4)");
  const py::ssize_t batch = q.shape(0), q_len = q.shape(1), q_heads = q.shape(2);
  const py::ssize_t k_len = k.shape(1), v_dim = v.shape(3);
  py::array_t<double> scores({batch, q_heads, q_len, k_len});
  py::array_t<double> weights({batch, q_heads, q_len, k_len});
  py::array_t<double> out({batch, q_len, q_heads, v_dim});
  qkv::AttentionOutputs outputs;
  outputs.out = output(out, "out");
  outputs.weights = output(weights, "weights");
  const qkv::MutableTensorView scores_view = output(scores, "scores");
  const qkv::TensorView qv = input(q, "q"), kv = input(k, "k"), vv = input(v, "v");
  {
    py::gil_scoped_release release;
    qkv::attention_reference(qv, kv, vv, call.options, outputs, scores_view);
  }
  return py::make_tuple(scores, weights);
}

// qkv::attention_with_kv_cache: the caches (written in place), the new keys and values, the
// attention options, the cache's indices and rotary tables (`cache`: seqlens, batch_index,
// leftpad, block_table, rotary_cos, rotary_sin, rotary_interleaved; an int8 cache's k_scale and
// v_scale, written in place too), into out and lse.
void attention_with_kv_cache(const py::array& q, py::array k_cache, py::array v_cache,
                             std::optional<py::array> k, std::optional<py::array> v,
                             const py::dict& options, const py::dict& cache, py::array out,
                             std::optional<py::array> lse) {
  const CallOptions call = options_of(options);
  qkv::KVCache kv_cache;
  kv_cache.k = output(k_cache, "k_cache");
  kv_cache.v = output(v_cache, "v_cache");
  kv_cache.seqlens = optional_input(cache, "seqlens");
  kv_cache.batch_index = optional_input(cache, "batch_index");
  kv_cache.leftpad = optional_input(cache, "leftpad");
  kv_cache.block_table = optional_input(cache, "block_table");
  for (const auto& [key, scales] :
       {std::pair{"k_scale", &kv_cache.k_scale}, std::pair{"v_scale", &kv_cache.v_scale}}) {
    if (!cache.contains(key) || cache[key].is_none()) continue;
    auto array = cache[key].cast<py::array>();
    *scales = output(array, key);
  }
  qkv::RotaryEmbedding rotary;
  rotary.cos = optional_input(cache, "rotary_cos");
  rotary.sin = optional_input(cache, "rotary_sin");
  rotary.interleaved = get<bool>(cache, "rotary_interleaved", true);
  std::optional<qkv::TensorView> k_new, v_new;
  if (k) k_new = input(*k, "k");
  if (v) v_new = input(*v, "v");
  qkv::AttentionOutputs outputs;
  outputs.out = output(out, "out");
  if (lse) outputs.lse = output(*lse, "lse");
  const qkv::TensorView qv = input(q, "q");
  py::gil_scoped_release release;
  qkv::attention_with_kv_cache(qv, kv_cache, k_new, v_new, rotary, call.options, outputs);
}

}  // namespace

PYBIND11_MODULE(_qkv, m) {
  m.doc() = "qkv's C++ core (private: use the functions of the qkv package)";
  // qkv.Error is both a ValueError (a bad argument, Python's convention) and a RuntimeError
  // (what PyTorch raises for the same mistakes, e.g. attn_mask with is_causal), so that code
  // written for either catches it.
  static PyObject* error_type = [] {
    PyObject* bases = PyTuple_Pack(2, PyExc_ValueError, PyExc_RuntimeError);
    PyObject* type = PyErr_NewExceptionWithDoc(
        "qkv.Error",
        "qkv's own error, a ValueError and a RuntimeError: bad shapes, dtypes or values, the "
        "message naming the argument, what was expected and what came.",
        bases, nullptr);
    Py_DECREF(bases);
    return type;
  }();
  if (error_type == nullptr) throw py::error_already_set();
  m.add_object("Error", py::handle(error_type));
  py::register_exception_translator([](std::exception_ptr raised) {
    try {
      if (raised) std::rethrow_exception(raised);
    } catch (const qkv::Error& error) {
      PyErr_SetString(error_type, error.what());
    }
  });
  // The C++ block mask, built by qkv.create_block_mask from the blocks it classified (kinds: uint8
  // [B, H, q_blocks, kv_blocks]; partial: uint8 [P, q_block, kv_block], the partial blocks' pairs).
  py::class_<qkv::BlockMask>(m, "BlockMask")
      .def(py::init([](std::int64_t batch, std::int64_t heads, std::int64_t q_len,
                       std::int64_t kv_len, std::int64_t q_block, std::int64_t kv_block,
                       const py::array_t<std::uint8_t, py::array::c_style>& kinds,
                       const py::array_t<std::uint8_t, py::array::c_style>& partial) {
             std::vector<qkv::BlockKind> kind_list(static_cast<std::size_t>(kinds.size()));
             for (std::size_t n = 0; n < kind_list.size(); ++n)
               kind_list[n] = static_cast<qkv::BlockKind>(kinds.data()[n]);
             std::vector<std::uint8_t> pairs(partial.data(), partial.data() + partial.size());
             return qkv::BlockMask({batch, heads, q_len, kv_len, q_block, kv_block}, kind_list,
                                   pairs);
           }),
           py::arg("batch"), py::arg("heads"), py::arg("q_len"), py::arg("kv_len"),
           py::arg("q_block"), py::arg("kv_block"), py::arg("kinds"), py::arg("partial"))
      .def("density", &qkv::BlockMask::density);
  m.def("forward", &forward, py::arg("q"), py::arg("k"), py::arg("v"), py::arg("options"),
        py::arg("out"), py::arg("lse") = py::none(), py::arg("weights") = py::none(),
        "attention_forward into the given arrays (uint16 = bfloat16 bits).");
  m.def("backward", &backward, py::arg("q"), py::arg("k"), py::arg("v"), py::arg("options"),
        py::arg("dout"), py::arg("dlse"), py::arg("out"), py::arg("lse"), py::arg("gradients"),
        "attention_backward into the arrays of `gradients` (keys dq, dk, dv, dw, dwq, dwk, dva, "
        "dbias, dtemperature, dsinks).");
  m.def("attention_with_kv_cache", &attention_with_kv_cache, py::arg("q"), py::arg("k_cache"),
        py::arg("v_cache"), py::arg("k"), py::arg("v"), py::arg("options"), py::arg("cache"),
        py::arg("out"), py::arg("lse") = py::none(),
        "qkv::attention_with_kv_cache: appends k, v to the caches in place, then attends.");
  m.def("reference_scores", &reference_scores, py::arg("q"), py::arg("k"), py::arg("v"),
        py::arg("options"),
        "attention_reference's (scores, weights), float64 [B, Hq, Nq, Nk]: the scores after "
        "contract §2 with -inf where a mask hides the key, the weights after dropout.");
  m.def(
      "score_names",
      [] {
        std::vector<std::string> names;
        for (const std::string_view name : qkv::score_names()) names.emplace_back(name);
        return names;
      },
      "Every score's name, in qkv::Score's order.");
  m.def(
      "score_layer",
      [](const std::string& score, std::int64_t heads, std::int64_t head_dim,
         std::int64_t additive_dim) {
        const qkv::ScoreLayer layer =
            qkv::score_layer(qkv::parse_score(score), heads, head_dim, additive_dim);
        static constexpr const char* kStarts[] = {"identity", "xavier", "uniform", "constant"};
        py::list parameters;
        for (const qkv::ScoreLayerParameter& parameter : layer.parameters) {
          parameters.append(
              py::make_tuple(parameter.name, parameter.option, py::tuple(py::cast(parameter.shape)),
                             kStarts[static_cast<int>(parameter.start)], parameter.value));
        }
        return py::make_tuple(parameters, layer.scale ? py::cast(*layer.scale) : py::none());
      },
      py::arg("score"), py::arg("heads"), py::arg("head_dim"), py::arg("additive_dim") = 0,
      "qkv::score_layer: ([(name, option, shape, start, value)], scale or None), the parameters "
      "an attention layer learns for a score (start: identity, xavier, uniform or constant).");
  m.def("explain", &explain, py::arg("words"), py::arg("score"), py::arg("dim"), py::arg("heads"),
        py::arg("causal"), py::arg("seed"),
        "qkv::explain_attention with a fresh layer: its steps as a dict (arrays in float64 but "
        "in_proj_weight and the score's parameters, float32).");
  m.def(
      "simd_target", [] { return std::string(qkv::simd_target()); },
      "The SIMD target the kernels run on.");
}
