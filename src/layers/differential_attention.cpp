// Differential attention on qkv's attention: each head's two maps are two attention calls on
// strided views of the projections (queries and keys 2h and 2h + 1 of each position, one value of
// 2·head_dim), their outputs subtracted with λ, then a per-head RMS normalization. The backward
// runs the same steps in reverse: the output projection, the normalization, the subtraction
// (which gives λ its gradient), the two attention backwards (their dV summed), the projections.

#include "qkv/differential_attention.hpp"

#include <fmt/format.h>

#include <array>
#include <cmath>
#include <random>
#include <vector>

#include "layers/dense.hpp"
#include "qkv/attention.hpp"
#include "qkv/backward.hpp"
#include "qkv/error.hpp"

namespace qkv {

namespace {

constexpr double kEpsilon = 1e-5;  // of the per-head RMS normalization

double dot(const Tensor& a, const Tensor& b) {
  double sum = 0.0;
  for (std::int64_t n = 0; n < a.numel(); ++n)
    sum += double{a.data<float>()[n]} * double{b.data<float>()[n]};
  return sum;
}

}  // namespace

struct DifferentialAttention::Saved {
  std::int64_t batch = 0, length = 0;
  Tensor x, q, k, v;           // input rows and projections [N·L, E | E_kv]
  Tensor out1, out2;           // each map's O [N, L, H, 2d]
  Tensor lse1, lse2;           // float64 [N, H, L]
  Tensor normalized, inverse;  // n = H·r [N·L·H, 2d] and r = 1/RMS [N·L·H]
  Tensor attended;             // the heads after normalization [N·L, E]
  double lambda = 0.0;
};

DifferentialAttention::DifferentialAttention(const DifferentialAttentionOptions& options,
                                             std::uint64_t seed)
    : options_(options) {
  DifferentialAttentionOptions& o = options_;
  if (o.num_kv_heads == 0) o.num_kv_heads = o.num_heads;
  if (o.num_heads <= 0 || o.embed_dim <= 0 || o.embed_dim % (2 * o.num_heads) != 0) {
    throw Error(fmt::format("embed_dim: expected a positive multiple of 2·num_heads ({}), got {}",
                            2 * o.num_heads, o.embed_dim));
  }
  if (o.num_kv_heads < 0 || o.num_heads % o.num_kv_heads != 0) {
    throw Error(fmt::format("num_kv_heads: expected a divisor of num_heads ({}), got {}",
                            o.num_heads, o.num_kv_heads));
  }
  if (o.depth < 0) throw Error(fmt::format("depth: expected >= 0, got {}", o.depth));
  const std::int64_t e = o.embed_dim, d = e / o.num_heads / 2;
  const std::int64_t kv_width = e / (o.num_heads / o.num_kv_heads);
  std::mt19937_64 rng(seed);
  const auto uniform = [&](std::vector<std::int64_t> shape, double bound) {
    std::uniform_real_distribution<double> draw(-bound, bound);
    Tensor t(DType::float32, std::move(shape));
    for (std::int64_t n = 0; n < t.numel(); ++n) t.data<float>()[n] = static_cast<float>(draw(rng));
    return t;
  };
  const double bound = 1.0 / std::sqrt(static_cast<double>(e));
  parameters_["q_proj.weight"] = uniform({e, e}, bound);
  parameters_["k_proj.weight"] = uniform({kv_width, e}, bound);
  parameters_["v_proj.weight"] = uniform({kv_width, e}, bound);
  parameters_["out_proj.weight"] = uniform({e, e}, bound);
  std::normal_distribution<double> normal(0.0, 0.1);
  for (const char* name : {"lambda_q1", "lambda_k1", "lambda_q2", "lambda_k2"}) {
    Tensor t(DType::float32, {d});
    for (std::int64_t n = 0; n < d; ++n) t.data<float>()[n] = static_cast<float>(normal(rng));
    parameters_[name] = std::move(t);
  }
  Tensor ones(DType::float32, {2 * d});
  for (std::int64_t n = 0; n < 2 * d; ++n) ones.data<float>()[n] = 1.0f;
  parameters_["subln_weight"] = std::move(ones);
  zero_grad();
}

void DifferentialAttention::zero_grad() {
  for (const auto& [name, tensor] : parameters_)
    gradients_[name] = Tensor(DType::float32, tensor.shape());
}

double DifferentialAttention::lambda_init() const {
  return 0.8 - 0.6 * std::exp(-0.3 * static_cast<double>(options_.depth));
}

double DifferentialAttention::lambda() const {
  const NamedTensors& p = parameters_;
  return std::exp(dot(p.at("lambda_q1"), p.at("lambda_k1"))) -
         std::exp(dot(p.at("lambda_q2"), p.at("lambda_k2"))) + lambda_init();
}

Tensor DifferentialAttention::forward(const TensorView& x) {
  const DifferentialAttentionOptions& o = options_;
  const std::int64_t e = o.embed_dim, h = o.num_heads, hk = o.num_kv_heads, d = e / h / 2;
  const std::int64_t kv_width = 2 * hk * d;
  if (x.rank != 3 || x.shape[2] != e) {
    throw Error(fmt::format("x: expected [N, L, E] with E = {}, got {}", e, x.shape_string()));
  }
  for (const auto& [name, tensor] : parameters_) {  // values may change in place, shapes not
    const Tensor& original = gradients_.at(name);
    if (tensor.shape() != original.shape() || tensor.dtype() != DType::float32) {
      throw Error(fmt::format("{}: expected float32 {}, got {} {}", name,
                              original.view().shape_string(), dtype_name(tensor.dtype()),
                              tensor.view().shape_string()));
    }
  }
  auto s = std::make_shared<Saved>();
  s->batch = x.shape[0];
  s->length = x.shape[1];
  const std::int64_t n = s->batch, l = s->length, rows = n * l;
  const layers::Rows input = layers::rows_of(x, e, "x");
  s->x = Tensor(DType::float32, {rows, e});
  std::copy(input.data, input.data + rows * e, s->x.data<float>());
  s->q = Tensor(DType::float32, {rows, e});
  s->k = Tensor(DType::float32, {rows, kv_width});
  s->v = Tensor(DType::float32, {rows, kv_width});
  layers::affine(input.data, rows, e, parameters_.at("q_proj.weight").data<float>(), nullptr, e,
                 s->q.data<float>());
  layers::affine(input.data, rows, e, parameters_.at("k_proj.weight").data<float>(), nullptr,
                 kv_width, s->k.data<float>());
  layers::affine(input.data, rows, e, parameters_.at("v_proj.weight").data<float>(), nullptr,
                 kv_width, s->v.data<float>());

  // Map m (0 or 1) of every head: its queries and keys through strides, the shared values.
  const auto queries = [&](int m) {
    return TensorView{
        s->q.data<float>() + m * d, DType::float32, 4, {n, l, h, d}, {l * e, e, 2 * d, 1}};
  };
  const auto keys = [&](int m) {
    return TensorView{s->k.data<float>() + m * d,
                      DType::float32,
                      4,
                      {n, l, hk, d},
                      {l * kv_width, kv_width, 2 * d, 1}};
  };
  const TensorView values =
      TensorView::contiguous(s->v.data<float>(), DType::float32, {n, l, hk, 2 * d});
  AttentionOptions attention;
  attention.causal = o.causal;
  attention.causal_align = CausalAlign::top_left;
  for (int m = 0; m < 2; ++m) {
    Tensor& out = m == 0 ? s->out1 : s->out2;
    Tensor& lse = m == 0 ? s->lse1 : s->lse2;
    out = Tensor(DType::float32, {n, l, h, 2 * d});
    lse = Tensor(DType::float64, {n, h, l});
    attention_forward(queries(m), keys(m), values, attention,
                      {out.mutable_view(), lse.mutable_view(), {}});
  }

  // Heads: (O1 − λ O2), normalized by their RMS, times the weight and 1 − λ_init.
  s->lambda = lambda();
  const double scale = 1.0 - lambda_init();
  const float* weight = parameters_.at("subln_weight").data<float>();
  s->normalized = Tensor(DType::float32, {rows * h, 2 * d});
  s->inverse = Tensor(DType::float32, {rows * h});
  s->attended = Tensor(DType::float32, {rows, e});
  for (std::int64_t r = 0; r < rows * h; ++r) {
    const float* a = s->out1.data<float>() + r * 2 * d;
    const float* b = s->out2.data<float>() + r * 2 * d;
    std::vector<double> head(static_cast<std::size_t>(2 * d));
    double squares = 0.0;
    for (std::int64_t c = 0; c < 2 * d; ++c) {
      head[static_cast<std::size_t>(c)] = double{a[c]} - s->lambda * double{b[c]};
      squares += head[static_cast<std::size_t>(c)] * head[static_cast<std::size_t>(c)];
    }
    const double inverse = 1.0 / std::sqrt(squares / static_cast<double>(2 * d) + kEpsilon);
    s->inverse.data<float>()[r] = static_cast<float>(inverse);
    for (std::int64_t c = 0; c < 2 * d; ++c) {
      const double normalized = head[static_cast<std::size_t>(c)] * inverse;
      s->normalized.data<float>()[r * 2 * d + c] = static_cast<float>(normalized);
      s->attended.data<float>()[r * 2 * d + c] = static_cast<float>(normalized * weight[c] * scale);
    }
  }
  Tensor output(DType::float32, {n, l, e});
  layers::affine(s->attended.data<float>(), rows, e,
                 parameters_.at("out_proj.weight").data<float>(), nullptr, e, output.data<float>());
  saved_ = std::move(s);
  return output;
}

Tensor DifferentialAttention::backward(const TensorView& dout) {
  if (!saved_) throw Error("backward: expected a forward call first, got none");
  const Saved& s = *saved_;
  const DifferentialAttentionOptions& o = options_;
  const std::int64_t e = o.embed_dim, h = o.num_heads, hk = o.num_kv_heads, d = e / h / 2;
  const std::int64_t kv_width = 2 * hk * d, n = s.batch, l = s.length, rows = n * l;
  const layers::Rows d_output = layers::rows_of(dout, e, "dout");
  if (d_output.count != rows) {
    throw Error(fmt::format("dout: expected [N, L, E] = [{}, {}, {}], got {}", n, l, e,
                            dout.shape_string()));
  }
  // Output projection.
  Tensor d_attended(DType::float32, {rows, e});
  layers::affine_backward(s.attended.data<float>(), d_output.data, rows, e, e,
                          parameters_.at("out_proj.weight").data<float>(), d_attended.data<float>(),
                          gradients_.at("out_proj.weight").data<float>(), nullptr);
  // Normalization, then the subtraction: dO1 = dH, dO2 = −λ dH, dλ = −Σ dH·O2.
  const double scale = 1.0 - lambda_init();
  const float* weight = parameters_.at("subln_weight").data<float>();
  float* d_weight = gradients_.at("subln_weight").data<float>();
  Tensor d_out1(DType::float32, {n, l, h, 2 * d}), d_out2(DType::float32, {n, l, h, 2 * d});
  std::vector<double> d_weight_sum(static_cast<std::size_t>(2 * d), 0.0);
  double d_lambda = 0.0;
  for (std::int64_t r = 0; r < rows * h; ++r) {
    const float* normalized = s.normalized.data<float>() + r * 2 * d;
    const float* dy = d_attended.data<float>() + r * 2 * d;
    std::vector<double> dn(static_cast<std::size_t>(2 * d));
    double projection = 0.0;  // mean(dn·n)
    for (std::int64_t c = 0; c < 2 * d; ++c) {
      dn[static_cast<std::size_t>(c)] = double{dy[c]} * weight[c] * scale;
      d_weight_sum[static_cast<std::size_t>(c)] += double{dy[c]} * normalized[c] * scale;
      projection += dn[static_cast<std::size_t>(c)] * normalized[c];
    }
    projection /= static_cast<double>(2 * d);
    const double inverse = s.inverse.data<float>()[r];
    for (std::int64_t c = 0; c < 2 * d; ++c) {
      const double dh = inverse * (dn[static_cast<std::size_t>(c)] - normalized[c] * projection);
      d_out1.data<float>()[r * 2 * d + c] = static_cast<float>(dh);
      d_out2.data<float>()[r * 2 * d + c] = static_cast<float>(-s.lambda * dh);
      d_lambda -= dh * double{s.out2.data<float>()[r * 2 * d + c]};
    }
  }
  for (std::int64_t c = 0; c < 2 * d; ++c)
    d_weight[c] += static_cast<float>(d_weight_sum[static_cast<std::size_t>(c)]);
  // λ = e^(q1·k1) − e^(q2·k2) + λ_init.
  const NamedTensors& p = parameters_;
  for (int m = 0; m < 2; ++m) {
    const Tensor& lq = p.at(m == 0 ? "lambda_q1" : "lambda_q2");
    const Tensor& lk = p.at(m == 0 ? "lambda_k1" : "lambda_k2");
    const double factor = (m == 0 ? 1.0 : -1.0) * d_lambda * std::exp(dot(lq, lk));
    float* dq = gradients_.at(m == 0 ? "lambda_q1" : "lambda_q2").data<float>();
    float* dk = gradients_.at(m == 0 ? "lambda_k1" : "lambda_k2").data<float>();
    for (std::int64_t c = 0; c < d; ++c) {
      dq[c] += static_cast<float>(factor * lk.data<float>()[c]);
      dk[c] += static_cast<float>(factor * lq.data<float>()[c]);
    }
  }
  // The two attention backwards, into strided views of dQ and dK; their dV summed.
  Tensor dq(DType::float32, {rows, e}), dk(DType::float32, {rows, kv_width});
  Tensor dv(DType::float32, {rows, kv_width}), dv_second(DType::float32, {rows, kv_width});
  AttentionOptions attention;
  attention.causal = o.causal;
  attention.causal_align = CausalAlign::top_left;
  const TensorView values =
      TensorView::contiguous(s.v.data<float>(), DType::float32, {n, l, hk, 2 * d});
  for (int m = 0; m < 2; ++m) {
    const std::array<std::int64_t, 4> q_strides{l * e, e, 2 * d, 1};
    const std::array<std::int64_t, 4> k_strides{l * kv_width, kv_width, 2 * d, 1};
    const TensorView queries{s.q.data<float>() + m * d, DType::float32, 4, {n, l, h, d}, q_strides};
    const TensorView keys{s.k.data<float>() + m * d, DType::float32, 4, {n, l, hk, d}, k_strides};
    AttentionGradients gradients;
    gradients.dq =
        MutableTensorView{dq.data<float>() + m * d, DType::float32, 4, {n, l, h, d}, q_strides};
    gradients.dk =
        MutableTensorView{dk.data<float>() + m * d, DType::float32, 4, {n, l, hk, d}, k_strides};
    gradients.dv = MutableTensorView::contiguous((m == 0 ? dv : dv_second).data<float>(),
                                                 DType::float32, {n, l, hk, 2 * d});
    const Tensor& out = m == 0 ? s.out1 : s.out2;
    const Tensor& lse = m == 0 ? s.lse1 : s.lse2;
    attention_backward(queries, keys, values, attention, (m == 0 ? d_out1 : d_out2).view(),
                       std::nullopt, gradients, SavedForward{out.view(), lse.view()});
  }
  for (std::int64_t c = 0; c < dv.numel(); ++c) dv.data<float>()[c] += dv_second.data<float>()[c];
  // The projections: dx is the sum of the three.
  Tensor dx(DType::float32, {n, l, e}), part(DType::float32, {rows, e});
  layers::affine_backward(s.x.data<float>(), dq.data<float>(), rows, e, e,
                          p.at("q_proj.weight").data<float>(), dx.data<float>(),
                          gradients_.at("q_proj.weight").data<float>(), nullptr);
  for (auto [projection, gradient] :
       {std::pair{"k_proj.weight", &dk}, std::pair{"v_proj.weight", &dv}}) {
    layers::affine_backward(s.x.data<float>(), gradient->data<float>(), rows, e, kv_width,
                            p.at(projection).data<float>(), part.data<float>(),
                            gradients_.at(projection).data<float>(), nullptr);
    for (std::int64_t c = 0; c < dx.numel(); ++c) dx.data<float>()[c] += part.data<float>()[c];
  }
  return dx;
}

}  // namespace qkv
