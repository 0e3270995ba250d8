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
// Compiled on first use by coupled_diffusion/models/_onednn.py.

#include <cstdint>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <tuple>
#include <unordered_map>

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

// oneDNN's version, for the Python side's report.
extern "C" int cd_onednn_version(int* major, int* minor, int* patch) {
  const dnnl_version_t* v = dnnl_version();
  *major = v->major;
  *minor = v->minor;
  *patch = v->patch;
  return 0;
}
