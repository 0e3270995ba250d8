// 2-D convolution (NHWC activations, HWIO kernels, float32) for XLA:CPU through oneDNN.
//
// Three XLA FFI handlers, one per pass of a training step:
//   cd_conv2d_fwd          y  = conv(x, w) + b
//   cd_conv2d_bwd_data     dx = conv_transpose(dy, w)
//   cd_conv2d_bwd_weights  dw, db from x and dy
// Attributes: stride_h, stride_w, pad_top, pad_bottom, pad_left, pad_right (int64).
//
// Activations are used in place (oneDNN's `nhwc` tag is JAX's row-major NHWC); kernels are
// reordered from HWIO into the blocked layout oneDNN picks for the shape, into a buffer kept with
// the cached primitive. Primitives are built once per shape and kept; calls are serialised with a
// mutex, since each convolution already uses every core through oneDNN's own OpenMP threads.
// Compiled on first use by coupled_diffusion/models/onednn.py.
//
// Below them, two kernels of our own for the U-Net's other hot spots (no oneDNN in them):
//   cd_group_norm_fwd      silu(group_norm(x + shift)), one pass per sample
//   cd_attention_fwd       multi-head softmax attention from a fused q|k|v projection

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <tuple>
#include <unordered_map>
#include <vector>

#include "oneapi/dnnl/dnnl.hpp"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;
using dnnl::memory;
using tag = dnnl::memory::format_tag;
using dt = dnnl::memory::data_type;

namespace {

struct Geometry {
  int64_t n, h, w, c, o, kh, kw, ho, wo, sh, sw, pt, pb, pl, pr;
  auto tie() const { return std::tie(n, h, w, c, o, kh, kw, ho, wo, sh, sw, pt, pb, pl, pr); }
  bool operator<(const Geometry& g) const { return tie() < g.tie(); }
};

struct Runtime {
  dnnl::engine engine{dnnl::engine::kind::cpu, 0};
  dnnl::stream stream{engine};
  std::mutex mutex;
};

Runtime& runtime() {
  static Runtime* rt = new Runtime();  // never destroyed: XLA may call in during interpreter exit
  return *rt;
}

struct Descs {
  memory::desc src, wgt, bias, dst, wgt_hwio;
  memory::dims strides, pad_l, pad_r;
};

Descs descs(const Geometry& g) {
  Descs d;
  d.src = memory::desc({g.n, g.c, g.h, g.w}, dt::f32, tag::nhwc);
  d.dst = memory::desc({g.n, g.o, g.ho, g.wo}, dt::f32, tag::nhwc);
  d.wgt = memory::desc({g.o, g.c, g.kh, g.kw}, dt::f32, tag::any);
  d.wgt_hwio = memory::desc({g.o, g.c, g.kh, g.kw}, dt::f32, tag::hwio);
  d.bias = memory::desc({g.o}, dt::f32, tag::x);
  d.strides = {g.sh, g.sw};
  d.pad_l = {g.pt, g.pl};
  d.pad_r = {g.pb, g.pr};
  return d;
}

dnnl::convolution_forward::primitive_desc forward_pd(const Runtime& rt, const Descs& d, bool with_bias) {
  using dnnl::algorithm;
  using dnnl::prop_kind;
  if (with_bias)
    return {rt.engine, prop_kind::forward_training, algorithm::convolution_direct, d.src, d.wgt, d.bias, d.dst,
            d.strides, d.pad_l, d.pad_r};
  return {rt.engine, prop_kind::forward_training, algorithm::convolution_direct, d.src, d.wgt, d.dst,
          d.strides, d.pad_l, d.pad_r};
}

// One cached primitive with the blocked-kernel buffer and the reorder into (or out of) it.
struct Plan {
  dnnl::primitive conv;
  memory wgt_blocked;      // empty when oneDNN takes HWIO as is
  dnnl::primitive reorder;

  // The kernel as the primitive reads it: `hwio` itself, or its reorder into the blocked buffer.
  memory weights_in(dnnl::stream& stream, const memory& hwio) {
    if (!wgt_blocked) return hwio;
    reorder.execute(stream, {{DNNL_ARG_FROM, hwio}, {DNNL_ARG_TO, wgt_blocked}});
    return wgt_blocked;
  }
};

Plan make_plan(Runtime& rt, dnnl::primitive conv, const memory::desc& chosen, const memory::desc& hwio, bool into_blocked) {
  Plan p;
  p.conv = conv;
  if (chosen != hwio) {
    p.wgt_blocked = memory(chosen, rt.engine);
    p.reorder = into_blocked ? dnnl::reorder(dnnl::reorder::primitive_desc(rt.engine, hwio, rt.engine, chosen))
                             : dnnl::reorder(dnnl::reorder::primitive_desc(rt.engine, chosen, rt.engine, hwio));
  }
  return p;
}

enum class Pass { kForward, kBackwardData, kBackwardWeights };

Plan& plan(Runtime& rt, Pass pass, const Geometry& g) {
  static auto* cache = new std::map<std::pair<int, Geometry>, Plan>();
  auto key = std::make_pair(static_cast<int>(pass), g);
  auto it = cache->find(key);
  if (it != cache->end()) return it->second;
  Descs d = descs(g);
  Plan p;
  if (pass == Pass::kForward) {
    auto pd = forward_pd(rt, d, true);
    p = make_plan(rt, dnnl::convolution_forward(pd), pd.weights_desc(), d.wgt_hwio, true);
  } else if (pass == Pass::kBackwardData) {
    auto hint = forward_pd(rt, d, false);
    dnnl::convolution_backward_data::primitive_desc pd(rt.engine, dnnl::algorithm::convolution_direct, d.src, d.wgt, d.dst,
                                                        d.strides, d.pad_l, d.pad_r, hint);
    p = make_plan(rt, dnnl::convolution_backward_data(pd), pd.weights_desc(), d.wgt_hwio, true);
  } else {
    auto hint = forward_pd(rt, d, true);
    dnnl::convolution_backward_weights::primitive_desc pd(rt.engine, dnnl::algorithm::convolution_direct, d.src, d.wgt, d.bias,
                                                           d.dst, d.strides, d.pad_l, d.pad_r, hint);
    p = make_plan(rt, dnnl::convolution_backward_weights(pd), pd.diff_weights_desc(), d.wgt_hwio, false);
  }
  return cache->emplace(key, std::move(p)).first->second;
}

using Dims = ffi::Span<const int64_t>;

// x: (N, H, W, C); w: (KH, KW, C, O); y: (N, HO, WO, O).
Geometry geometry(Dims x, Dims w, Dims y, int64_t sh, int64_t sw, int64_t pt, int64_t pb, int64_t pl, int64_t pr) {
  return Geometry{x[0], x[1], x[2], x[3], w[3], w[0], w[1], y[1], y[2], sh, sw, pt, pb, pl, pr};
}

// The frame every pass shares: rank checks, then, under the runtime's lock, the cached plan of `pass`
// for this geometry handed to `body(rt, descs, plan)` (which binds the buffers and runs it), and a wait.
// `x`, `w`, `y` are the input, kernel and output shapes of the forward convolution; oneDNN's
// exceptions come back as an XLA error.
template <typename F>
ffi::Error run_pass(Pass pass, Dims x, Dims w, Dims y, int64_t sh, int64_t sw, int64_t pt, int64_t pb, int64_t pl, int64_t pr,
                    F&& body) {
  const std::pair<Dims, const char*> operands[] = {{x, "the input"}, {w, "the kernel"}, {y, "the output"}};
  for (const auto& [dims, name] : operands)
    if (dims.size() != 4)
      return ffi::Error(ffi::ErrorCode::kInvalidArgument, std::string(name) + " of the convolution must have rank 4");
  try {
    Runtime& rt = runtime();
    Geometry g = geometry(x, w, y, sh, sw, pt, pb, pl, pr);
    Descs d = descs(g);
    std::lock_guard<std::mutex> lock(rt.mutex);
    body(rt, d, plan(rt, pass, g));
    rt.stream.wait();
    return ffi::Error::Success();
  } catch (const std::exception& e) {  // dnnl::error included
    return ffi::Error(ffi::ErrorCode::kInternal, std::string("oneDNN convolution failed: ") + e.what());
  }
}

ffi::Error Forward(ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> w, ffi::Buffer<ffi::F32> b, ffi::ResultBuffer<ffi::F32> y,
                   int64_t sh, int64_t sw, int64_t pt, int64_t pb, int64_t pl, int64_t pr) {
  return run_pass(Pass::kForward, x.dimensions(), w.dimensions(), y->dimensions(), sh, sw, pt, pb, pl, pr,
                  [&](Runtime& rt, const Descs& d, Plan& p) {
                    memory wuse = p.weights_in(rt.stream, memory(d.wgt_hwio, rt.engine, w.typed_data()));
                    p.conv.execute(rt.stream, {{DNNL_ARG_SRC, memory(d.src, rt.engine, x.typed_data())},
                                               {DNNL_ARG_WEIGHTS, wuse},
                                               {DNNL_ARG_BIAS, memory(d.bias, rt.engine, b.typed_data())},
                                               {DNNL_ARG_DST, memory(d.dst, rt.engine, y->typed_data())}});
                  });
}

ffi::Error BackwardData(ffi::Buffer<ffi::F32> dy, ffi::Buffer<ffi::F32> w, ffi::ResultBuffer<ffi::F32> dx, int64_t sh,
                        int64_t sw, int64_t pt, int64_t pb, int64_t pl, int64_t pr) {
  return run_pass(Pass::kBackwardData, dx->dimensions(), w.dimensions(), dy.dimensions(), sh, sw, pt, pb, pl, pr,
                  [&](Runtime& rt, const Descs& d, Plan& p) {
                    memory wuse = p.weights_in(rt.stream, memory(d.wgt_hwio, rt.engine, w.typed_data()));
                    p.conv.execute(rt.stream, {{DNNL_ARG_DIFF_DST, memory(d.dst, rt.engine, dy.typed_data())},
                                               {DNNL_ARG_WEIGHTS, wuse},
                                               {DNNL_ARG_DIFF_SRC, memory(d.src, rt.engine, dx->typed_data())}});
                  });
}

ffi::Error BackwardWeights(ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> dy, ffi::ResultBuffer<ffi::F32> dw,
                           ffi::ResultBuffer<ffi::F32> db, int64_t sh, int64_t sw, int64_t pt, int64_t pb, int64_t pl,
                           int64_t pr) {
  return run_pass(Pass::kBackwardWeights, x.dimensions(), dw->dimensions(), dy.dimensions(), sh, sw, pt, pb, pl, pr,
                  [&](Runtime& rt, const Descs& d, Plan& p) {
                    memory wm(d.wgt_hwio, rt.engine, dw->typed_data());
                    memory wuse = p.wgt_blocked ? p.wgt_blocked : wm;
                    p.conv.execute(rt.stream, {{DNNL_ARG_SRC, memory(d.src, rt.engine, x.typed_data())},
                                               {DNNL_ARG_DIFF_DST, memory(d.dst, rt.engine, dy.typed_data())},
                                               {DNNL_ARG_DIFF_WEIGHTS, wuse},
                                               {DNNL_ARG_DIFF_BIAS, memory(d.bias, rt.engine, db->typed_data())}});
                    if (p.wgt_blocked) p.reorder.execute(rt.stream, {{DNNL_ARG_FROM, p.wgt_blocked}, {DNNL_ARG_TO, wm}});
                  });
}

}  // namespace

#define CD_ATTRS                  \
  .Attr<int64_t>("stride_h")      \
      .Attr<int64_t>("stride_w")  \
      .Attr<int64_t>("pad_top")   \
      .Attr<int64_t>("pad_bottom") \
      .Attr<int64_t>("pad_left")  \
      .Attr<int64_t>("pad_right")

XLA_FFI_DEFINE_HANDLER_SYMBOL(cd_conv2d_fwd, Forward,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>() CD_ATTRS);

XLA_FFI_DEFINE_HANDLER_SYMBOL(cd_conv2d_bwd_data, BackwardData,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>() CD_ATTRS);

XLA_FFI_DEFINE_HANDLER_SYMBOL(cd_conv2d_bwd_weights, BackwardWeights,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>() CD_ATTRS);

// -------------------------------------------------------------------------------------------------
// Group norm, channels last, with an optional per-sample channel shift before it and SiLU after it
// (the U-Net's `silu(group_norm(h + temb))`), written here rather than through oneDNN, whose 3.2
// has no group normalisation:
//   cd_group_norm_fwd   x (N, P, C), scale (C), bias (C), shift (N, C)
//                       -> y (N, P, C), mean (N, G), rstd (N, G)     attributes: eps (f32), silu (i64)
// One sample per OpenMP iteration: its statistics (accumulated in double), then the normalisation
// while the sample is still in cache, so the activations are read from memory once.

namespace {

// exp(x) for the SiLU: Cephes' expf (range reduction by ln 2 in two parts, degree-6 polynomial,
// scaling by 2^n through the exponent bits), branch-free so that the loops vectorise; about 1 ulp.
inline float exp_approx(float x) {
  x = std::min(88.3762626647949f, std::max(-87.3365447505531f, x));
  float n = x * 1.44269504088896341f + 12582912.0f;  // round to nearest through 1.5 * 2^23
  n -= 12582912.0f;
  float r = x - n * 0.693359375f + n * 2.12194440e-4f;
  float z = r * r;
  float p = ((((1.9875691500e-4f * r + 1.3981999507e-3f) * r + 8.3334519073e-3f) * r + 4.1665795894e-2f) * r +
             1.6666665459e-1f) * r + 5.0000001201e-1f;
  p = p * z + r + 1.0f;
  int32_t bits = (static_cast<int32_t>(n) + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, sizeof scale);
  return p * scale;
}

struct GroupNormShape {
  int64_t p, c, g;
};

__attribute__((target_clones("avx512f", "avx2", "default")))
void group_norm_sample(const float* x, const float* scale, const float* bias, const float* shift, float* y, float* mean,
                       float* rstd, GroupNormShape s, float eps, bool silu, double* sum, double* sum_sq, float* a, float* b) {
  const int64_t p_n = s.p, c_n = s.c, cg = s.c / s.g;
  for (int64_t c = 0; c < c_n; ++c) sum[c] = sum_sq[c] = 0.0;
  for (int64_t p = 0; p < p_n; ++p) {
    const float* row = x + p * c_n;
#pragma omp simd
    for (int64_t c = 0; c < c_n; ++c) {
      double v = static_cast<double>(row[c]) + shift[c];
      sum[c] += v;
      sum_sq[c] += v * v;
    }
  }
  const double count = static_cast<double>(p_n * cg);
  for (int64_t g = 0; g < s.g; ++g) {
    double s1 = 0.0, s2 = 0.0;
    for (int64_t c = g * cg; c < (g + 1) * cg; ++c) s1 += sum[c], s2 += sum_sq[c];
    double m = s1 / count, var = std::max(s2 / count - m * m, 0.0);
    float r = static_cast<float>(1.0 / std::sqrt(var + eps));
    mean[g] = static_cast<float>(m);
    rstd[g] = r;
    for (int64_t c = g * cg; c < (g + 1) * cg; ++c) {  // y = (x + shift - mean) * rstd * scale + bias
      a[c] = scale[c] * r;
      b[c] = bias[c] + static_cast<float>((shift[c] - m) * r) * scale[c];
    }
  }
  for (int64_t p = 0; p < p_n; ++p) {
    const float* row = x + p * c_n;
    float* out = y + p * c_n;
    if (silu) {
#pragma omp simd
      for (int64_t c = 0; c < c_n; ++c) {
        float t = row[c] * a[c] + b[c];
        out[c] = t / (1.0f + exp_approx(-t));
      }
    } else {
#pragma omp simd
      for (int64_t c = 0; c < c_n; ++c) out[c] = row[c] * a[c] + b[c];
    }
  }
}

ffi::Error GroupNormForward(ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> scale, ffi::Buffer<ffi::F32> bias,
                            ffi::Buffer<ffi::F32> shift, ffi::ResultBuffer<ffi::F32> y, ffi::ResultBuffer<ffi::F32> mean,
                            ffi::ResultBuffer<ffi::F32> rstd, float eps, int64_t silu) {
  auto xd = x.dimensions(), md = mean->dimensions();
  if (xd.size() != 3 || md.size() != 2 || shift.dimensions().size() != 2)
    return ffi::Error(ffi::ErrorCode::kInvalidArgument, "group norm: x must be (N, P, C), shift (N, C), mean (N, G)");
  const int64_t n_n = xd[0];
  const GroupNormShape s{xd[1], xd[2], md[1]};
  if (s.g < 1 || s.c % s.g || scale.element_count() != s.c || bias.element_count() != s.c ||
      shift.element_count() != n_n * s.c || md[0] != n_n)
    return ffi::Error(ffi::ErrorCode::kInvalidArgument, "group norm: inconsistent shapes");
  const float *xp = x.typed_data(), *sp = scale.typed_data(), *bp = bias.typed_data(), *hp = shift.typed_data();
  float *yp = y->typed_data(), *mp = mean->typed_data(), *rp = rstd->typed_data();
  std::lock_guard<std::mutex> lock(runtime().mutex);  // one OpenMP team at a time, as the convolutions
#pragma omp parallel
  {
    std::vector<double> sums(2 * s.c);
    std::vector<float> ab(2 * s.c);
#pragma omp for schedule(static)
    for (int64_t n = 0; n < n_n; ++n)
      group_norm_sample(xp + n * s.p * s.c, sp, bp, hp + n * s.c, yp + n * s.p * s.c, mp + n * s.g, rp + n * s.g, s, eps,
                        silu != 0, sums.data(), sums.data() + s.c, ab.data(), ab.data() + s.c);
  }
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(cd_group_norm_fwd, GroupNormForward,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<float>("eps")
                                  .Attr<int64_t>("silu"));

// -------------------------------------------------------------------------------------------------
// Multi-head softmax attention over a few hundred positions, read straight from the fused q|k|v
// projection and written in the (N, P, C) layout the output projection takes, so that no head
// transposes are materialised:
//   cd_attention_fwd   qkv (N, P, 3C) -> out (N, P, C), lse (N, H, P)      attribute: heads (i64)
// out[n, i, head h] = sum_j softmax_j(q_i . k_j / sqrt(D)) v_j, and lse the log-sum-exp of each row
// of scaled logits (the backward pass rebuilds the probabilities from it). One (sample, head) per
// OpenMP iteration, its P x P logits in a per-thread buffer (in L1 or L2 up to P of a few hundred).

namespace {

// One (sample, head). Every loop below runs over the queries i, contiguous, so it vectorises without
// horizontal sums: s[j][i] = q_i . k_j / sqrt(D), the softmax over j per query, ot[d][i] = sum_j p[j][i] v_j[d].
// Scratch: qt, ot (D x P), s (P x P), m, total (P).
__attribute__((target_clones("avx512f", "avx2", "default")))
void attention_head(const float* qkv, float* out, float* lse, int64_t p_n, int64_t c_n, int64_t d_n, int64_t h, float* qt,
                    float* ot, float* s, float* m, float* total) {
  const int64_t row = 3 * c_n;
  const float scale = 1.0f / std::sqrt(static_cast<float>(d_n));
  for (int64_t i = 0; i < p_n; ++i)
    for (int64_t d = 0; d < d_n; ++d) qt[d * p_n + i] = qkv[i * row + h * d_n + d] * scale;
  for (int64_t j = 0; j < p_n; ++j) {
    const float* k = qkv + j * row + c_n + h * d_n;
    float* sj = s + j * p_n;
#pragma omp simd
    for (int64_t i = 0; i < p_n; ++i) sj[i] = 0.0f;
    for (int64_t d = 0; d < d_n; ++d) {
      const float kd = k[d];
      const float* q = qt + d * p_n;
#pragma omp simd
      for (int64_t i = 0; i < p_n; ++i) sj[i] += kd * q[i];
    }
  }
#pragma omp simd
  for (int64_t i = 0; i < p_n; ++i) m[i] = s[i], total[i] = 0.0f;
  for (int64_t j = 1; j < p_n; ++j) {
    const float* sj = s + j * p_n;
#pragma omp simd
    for (int64_t i = 0; i < p_n; ++i) m[i] = std::max(m[i], sj[i]);
  }
  for (int64_t i = 0; i < d_n * p_n; ++i) ot[i] = 0.0f;
  for (int64_t j = 0; j < p_n; ++j) {
    const float* v = qkv + j * row + 2 * c_n + h * d_n;
    float* sj = s + j * p_n;
#pragma omp simd
    for (int64_t i = 0; i < p_n; ++i) {
      sj[i] = exp_approx(sj[i] - m[i]);
      total[i] += sj[i];
    }
    for (int64_t d = 0; d < d_n; ++d) {
      const float vd = v[d];
      float* o = ot + d * p_n;
#pragma omp simd
      for (int64_t i = 0; i < p_n; ++i) o[i] += vd * sj[i];
    }
  }
  for (int64_t i = 0; i < p_n; ++i) {
    const float inv = 1.0f / total[i];
    for (int64_t d = 0; d < d_n; ++d) out[i * c_n + h * d_n + d] = ot[d * p_n + i] * inv;
    lse[i] = m[i] + std::log(total[i]);
  }
}

ffi::Error AttentionForward(ffi::Buffer<ffi::F32> qkv, ffi::ResultBuffer<ffi::F32> out, ffi::ResultBuffer<ffi::F32> lse,
                            int64_t heads) {
  auto qd = qkv.dimensions(), od = out->dimensions(), ld = lse->dimensions();
  if (qd.size() != 3 || od.size() != 3 || ld.size() != 3)
    return ffi::Error(ffi::ErrorCode::kInvalidArgument, "attention: qkv must be (N, P, 3C), out (N, P, C), lse (N, H, P)");
  const int64_t n_n = qd[0], p_n = qd[1], c_n = od[2];
  if (heads < 1 || c_n % heads || qd[2] != 3 * c_n || od[0] != n_n || od[1] != p_n || ld[0] != n_n || ld[1] != heads ||
      ld[2] != p_n)
    return ffi::Error(ffi::ErrorCode::kInvalidArgument, "attention: inconsistent shapes");
  const int64_t d_n = c_n / heads;
  const float* qp = qkv.typed_data();
  float *op = out->typed_data(), *lp = lse->typed_data();
  std::lock_guard<std::mutex> lock(runtime().mutex);  // one OpenMP team at a time, as the convolutions
#pragma omp parallel
  {
    std::vector<float> buf((2 * d_n + p_n + 2) * p_n);
    float* b = buf.data();
#pragma omp for schedule(static)
    for (int64_t nh = 0; nh < n_n * heads; ++nh) {
      const int64_t n = nh / heads, h = nh % heads;
      attention_head(qp + n * p_n * 3 * c_n, op + n * p_n * c_n, lp + (n * heads + h) * p_n, p_n, c_n, d_n, h, b,
                     b + d_n * p_n, b + 2 * d_n * p_n, b + (2 * d_n + p_n) * p_n, b + (2 * d_n + p_n + 1) * p_n);
    }
  }
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(cd_attention_fwd, AttentionForward,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<int64_t>("heads"));

// oneDNN's version, for the Python side's report.
extern "C" int cd_onednn_version(int* major, int* minor, int* patch) {
  const dnnl_version_t* v = dnnl_version();
  *major = v->major;
  *minor = v->minor;
  *patch = v->patch;
  return 0;
}
