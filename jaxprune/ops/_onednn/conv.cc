// The three directions of a 2-D convolution (NHWC activations, HWIO kernels, float32) as XLA FFI
// handlers that run oneDNN's convolution primitives, for jaxprune.ops.onednn on XLA:CPU.
//
//   jaxprune_conv_fwd          (x[N,H,W,C], w[KH,KW,C,O])      -> y[N,Ho,Wo,O]
//   jaxprune_conv_bwd_data     (dy[N,Ho,Wo,O], w[KH,KW,C,O])   -> dx[N,H,W,C]
//   jaxprune_conv_bwd_weights  (x[N,H,W,C], dy[N,Ho,Wo,O])     -> dw[KH,KW,C,O]
//
// Attributes: stride and padding (the same on both spatial axes, zeros on each side). oneDNN picks
// its kernels' weight layout; the HWIO weights are reordered into it (and the weight gradient out
// of it) on each call. Primitives are built once per shape and kept in a process-wide cache; they
// run with a scratchpad of the calling thread's, so XLA may call them from several threads at once
// (one per device when a CPU process has several).
#include <cstdint>
#include <cstring>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <tuple>
#include <vector>

#include "oneapi/dnnl/dnnl.hpp"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

using dt = dnnl::memory::data_type;
using tag = dnnl::memory::format_tag;

enum Direction : int { kForward = 0, kBackwardData = 1, kBackwardWeights = 2 };

struct Shape {
  int64_t n, h, w, c, kh, kw, o, ho, wo, stride, padding;
  auto key(int direction) const {
    return std::make_tuple(direction, n, h, w, c, kh, kw, o, ho, wo, stride, padding);
  }
};

dnnl::engine& Engine() {
  static dnnl::engine engine(dnnl::engine::kind::cpu, 0);
  return engine;
}

// A primitive with the reorders between HWIO weights and the layout its kernel wants.
struct Plan {
  dnnl::primitive main;
  dnnl::memory::desc kernel_md;       // the primitive's weights / weight-gradient layout
  dnnl::memory::desc hwio_md;         // the caller's HWIO layout
  bool reorder = false;               // kernel_md != hwio_md
  dnnl::reorder to_kernel_layout;     // HWIO -> kernel_md (forward, backward data)
  dnnl::reorder to_hwio;              // kernel_md -> HWIO (backward weights)
  dnnl::memory::desc x_md, y_md;
  dnnl::memory::desc scratchpad_md;
};

dnnl::primitive_attr UserScratchpad() {
  dnnl::primitive_attr attr;
  attr.set_scratchpad_mode(dnnl::scratchpad_mode::user);
  return attr;
}

dnnl::memory::desc AnyWeights(const Shape& s) {
  return dnnl::memory::desc({s.o, s.c, s.kh, s.kw}, dt::f32, tag::any);
}

// The descriptor arguments after the memory descriptors: strides, left and right padding. oneDNN's
// right padding makes (H + pl + pr - KH) / stride + 1 == Ho exactly.
struct Window {
  dnnl::memory::dims strides, pad_l, pad_r;
  explicit Window(const Shape& s)
      : strides{s.stride, s.stride},
        pad_l{s.padding, s.padding},
        pad_r{(s.ho - 1) * s.stride + s.kh - s.h - s.padding,
              (s.wo - 1) * s.stride + s.kw - s.w - s.padding} {}
};

// Backward data and backward weights take the same descriptor arguments.
template <typename Primitive>
typename Primitive::primitive_desc BackwardDesc(
    const Shape& s, const Plan& plan, const dnnl::convolution_forward::primitive_desc& hint) {
  Window window(s);
  typename Primitive::desc desc(dnnl::algorithm::convolution_direct, plan.x_md, AnyWeights(s),
                                plan.y_md, window.strides, window.pad_l, window.pad_r);
  return typename Primitive::primitive_desc(desc, UserScratchpad(), Engine(), hint);
}

std::unique_ptr<Plan> MakePlan(const Shape& s, int direction) {
  auto plan = std::make_unique<Plan>();
  plan->x_md = dnnl::memory::desc({s.n, s.c, s.h, s.w}, dt::f32, tag::nhwc);
  plan->y_md = dnnl::memory::desc({s.n, s.o, s.ho, s.wo}, dt::f32, tag::nhwc);
  plan->hwio_md = dnnl::memory::desc({s.o, s.c, s.kh, s.kw}, dt::f32, tag::hwio);
  Window window(s);
  dnnl::convolution_forward::desc fwd_desc(
      dnnl::prop_kind::forward_training, dnnl::algorithm::convolution_direct, plan->x_md,
      AnyWeights(s), plan->y_md, window.strides, window.pad_l, window.pad_r);
  dnnl::convolution_forward::primitive_desc fwd(fwd_desc, UserScratchpad(), Engine());
  if (direction == kForward) {
    plan->kernel_md = fwd.weights_desc();
    plan->scratchpad_md = fwd.scratchpad_desc();
    plan->main = dnnl::convolution_forward(fwd);
  } else if (direction == kBackwardData) {
    auto pd = BackwardDesc<dnnl::convolution_backward_data>(s, *plan, fwd);
    plan->kernel_md = pd.weights_desc();
    plan->scratchpad_md = pd.scratchpad_desc();
    plan->main = dnnl::convolution_backward_data(pd);
  } else {
    auto pd = BackwardDesc<dnnl::convolution_backward_weights>(s, *plan, fwd);
    plan->kernel_md = pd.diff_weights_desc();
    plan->scratchpad_md = pd.scratchpad_desc();
    plan->main = dnnl::convolution_backward_weights(pd);
  }
  plan->reorder = plan->kernel_md != plan->hwio_md;
  if (plan->reorder) {
    if (direction == kBackwardWeights) {
      plan->to_hwio = dnnl::reorder(dnnl::reorder::primitive_desc(
          Engine(), plan->kernel_md, Engine(), plan->hwio_md));
    } else {
      plan->to_kernel_layout = dnnl::reorder(dnnl::reorder::primitive_desc(
          Engine(), plan->hwio_md, Engine(), plan->kernel_md));
    }
  }
  return plan;
}

Plan& GetPlan(const Shape& s, int direction) {
  static std::mutex mutex;
  static std::map<decltype(s.key(0)), std::unique_ptr<Plan>> plans;
  std::lock_guard<std::mutex> lock(mutex);
  auto& slot = plans[s.key(direction)];
  if (!slot) slot = MakePlan(s, direction);
  return *slot;
}

// Per-thread buffers: weights in the kernel's layout, and the primitive's scratchpad.
void* Scratch(std::vector<float>& buffer, size_t bytes) {
  if (buffer.size() * sizeof(float) < bytes) buffer.resize(bytes / sizeof(float) + 16);
  return buffer.data();
}

ffi::Error Run(const Shape& s, int direction, float* x, float* kernel, float* y) {
  if (s.stride < 1 || s.padding < 0) return ffi::Error::InvalidArgument("bad stride or padding");
  try {
    Plan& plan = GetPlan(s, direction);
    thread_local dnnl::stream stream(Engine());
    dnnl::memory x_mem(plan.x_md, Engine(), x);
    dnnl::memory y_mem(plan.y_md, Engine(), y);
    dnnl::memory hwio_mem(plan.hwio_md, Engine(), kernel);
    thread_local std::vector<float> kernel_buffer, scratchpad_buffer;
    dnnl::memory kernel_mem = hwio_mem;
    if (plan.reorder) {
      void* data = Scratch(kernel_buffer, plan.kernel_md.get_size());
      kernel_mem = dnnl::memory(plan.kernel_md, Engine(), data);
    }
    dnnl::memory scratchpad(plan.scratchpad_md, Engine(),
                            Scratch(scratchpad_buffer, plan.scratchpad_md.get_size()));
    if (direction == kForward) {
      if (plan.reorder) plan.to_kernel_layout.execute(stream, hwio_mem, kernel_mem);
      plan.main.execute(stream, {{DNNL_ARG_SRC, x_mem},
                                 {DNNL_ARG_WEIGHTS, kernel_mem},
                                 {DNNL_ARG_DST, y_mem},
                                 {DNNL_ARG_SCRATCHPAD, scratchpad}});
    } else if (direction == kBackwardData) {
      if (plan.reorder) plan.to_kernel_layout.execute(stream, hwio_mem, kernel_mem);
      plan.main.execute(stream, {{DNNL_ARG_DIFF_DST, y_mem},
                                 {DNNL_ARG_WEIGHTS, kernel_mem},
                                 {DNNL_ARG_DIFF_SRC, x_mem},
                                 {DNNL_ARG_SCRATCHPAD, scratchpad}});
    } else {
      plan.main.execute(stream, {{DNNL_ARG_SRC, x_mem},
                                 {DNNL_ARG_DIFF_DST, y_mem},
                                 {DNNL_ARG_DIFF_WEIGHTS, kernel_mem},
                                 {DNNL_ARG_SCRATCHPAD, scratchpad}});
      if (plan.reorder) plan.to_hwio.execute(stream, kernel_mem, hwio_mem);
    }
    stream.wait();
  } catch (const dnnl::error& e) {
    return ffi::Error::Internal(std::string("oneDNN: ") + e.what());
  }
  return ffi::Error::Success();
}

Shape ShapeOf(ffi::Buffer<ffi::F32>::Dimensions x, ffi::Buffer<ffi::F32>::Dimensions kernel,
              ffi::Buffer<ffi::F32>::Dimensions y, int64_t stride, int64_t padding) {
  return Shape{x[0], x[1], x[2], x[3], kernel[0], kernel[1], kernel[3], y[1], y[2], stride,
               padding};
}

ffi::Error Forward(ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> kernel,
                   ffi::ResultBuffer<ffi::F32> y, int64_t stride, int64_t padding) {
  Shape s = ShapeOf(x.dimensions(), kernel.dimensions(), y->dimensions(), stride, padding);
  return Run(s, kForward, x.typed_data(), kernel.typed_data(), y->typed_data());
}

ffi::Error BackwardData(ffi::Buffer<ffi::F32> dy, ffi::Buffer<ffi::F32> kernel,
                        ffi::ResultBuffer<ffi::F32> dx, int64_t stride, int64_t padding) {
  Shape s = ShapeOf(dx->dimensions(), kernel.dimensions(), dy.dimensions(), stride, padding);
  return Run(s, kBackwardData, dx->typed_data(), kernel.typed_data(), dy.typed_data());
}

ffi::Error BackwardWeights(ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> dy,
                           ffi::ResultBuffer<ffi::F32> dkernel, int64_t stride, int64_t padding) {
  Shape s = ShapeOf(x.dimensions(), dkernel->dimensions(), dy.dimensions(), stride, padding);
  return Run(s, kBackwardWeights, x.typed_data(), dkernel->typed_data(), dy.typed_data());
}

}  // namespace

#define JAXPRUNE_BIND                            \
  ffi::Ffi::Bind()                               \
      .Arg<ffi::Buffer<ffi::F32>>()              \
      .Arg<ffi::Buffer<ffi::F32>>()              \
      .Ret<ffi::Buffer<ffi::F32>>()              \
      .Attr<int64_t>("stride")                   \
      .Attr<int64_t>("padding")

XLA_FFI_DEFINE_HANDLER_SYMBOL(jaxprune_conv_fwd, Forward, JAXPRUNE_BIND);
XLA_FFI_DEFINE_HANDLER_SYMBOL(jaxprune_conv_bwd_data, BackwardData, JAXPRUNE_BIND);
XLA_FFI_DEFINE_HANDLER_SYMBOL(jaxprune_conv_bwd_weights, BackwardWeights, JAXPRUNE_BIND);

extern "C" const char* jaxprune_onednn_version() {
  static std::string version = [] {
    const dnnl_version_t* v = dnnl_version();
    return std::to_string(v->major) + "." + std::to_string(v->minor) + "." +
           std::to_string(v->patch);
  }();
  return version.c_str();
}
