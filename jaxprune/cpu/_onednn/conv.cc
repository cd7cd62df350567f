// The three directions of a 2-D convolution (NHWC activations, HWIO kernels, float32) as XLA FFI
// handlers that run oneDNN's convolution primitives, for jaxprune.ops.onednn on XLA:CPU.
//
//   jaxprune_conv_fwd          (x[N,H,W,C], w[KH,KW,C,O])      -> y[N,Ho,Wo,O]
//   jaxprune_conv_bwd_data     (dy[N,Ho,Wo,O], w[KH,KW,C,O])   -> dx[N,H,W,C]
//   jaxprune_conv_bwd_weights  (x[N,H,W,C], dy[N,Ho,Wo,O])     -> dw[KH,KW,C,O]
//   jaxprune_conv_fwd_winograd, jaxprune_conv_bwd_data_winograd: the first two for 3x3 windows,
//     stride 1 and padding 0-2, by Winograd's F(2x2, 3x3) algorithm (below): 2.25x fewer
//     multiplications, the remaining ones as 16 matrix products run by oneDNN's matmul.
//
// jaxprune_conv_fwd runs 3x3, stride-1 convolutions of up to 64 channels with oneDNN's
// backward-data kernel, which is faster there (RunsAsBackwardData).
//
// Attributes: stride and padding (the same on both spatial axes, zeros on each side). oneDNN picks
// its kernels' weight layout; the HWIO weights are reordered into it (and the weight gradient out
// of it) on each call. Primitives are built once per shape and kept in a process-wide cache; they
// run with a scratchpad of the calling thread's, so XLA may call them from several threads at once
// (one per device when a CPU process has several).
#include <algorithm>
#include <cstdint>
#include <cstring>
#include <immintrin.h>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <tuple>
#include <vector>

#include <omp.h>

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

// The activations' layout as oneDNN is told it: NHWC, except with exactly 8 channels on both sides,
// where NHWC's bytes are also those of oneDNN's 8-channel-blocked layout (nChw8c: one block). Told
// that, oneDNN runs its AVX2 kernels, whose 8-lane vectors those widths fill, where for NHWC it
// runs AVX-512 ones: on an AMD EPYC 1.3x-1.5x slower at the forward pass of a round_to=8 ResNet-56
// cut's first stage, whose training step the change made 1.1x-1.3x faster (RESULTS.md section 3).
tag ActivationLayout(const Shape& s) { return s.c == 8 && s.o == 8 ? tag::nChw8c : tag::nhwc; }

std::unique_ptr<Plan> MakePlan(const Shape& s, int direction) {
  auto plan = std::make_unique<Plan>();
  plan->x_md = dnnl::memory::desc({s.n, s.c, s.h, s.w}, dt::f32, ActivationLayout(s));
  plan->y_md = dnnl::memory::desc({s.n, s.o, s.ho, s.wo}, dt::f32, ActivationLayout(s));
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

// oneDNN 2.6's backward-data kernel runs 3x3, stride-1 convolutions of up to 64 channels at
// 0.95x-1.8x the speed of its forward kernel (faster on 88 of 90 shapes, most of all with 8 or 16
// output channels; experiments/results/onednn_forward_kernels.md), and such a forward convolution is the input gradient of its mirror image: the convolution
// from C_out to C_in channels at padding 2 - p, with the window flipped and its channel axes
// swapped. Forward calls of those shapes run that way.
bool RunsAsBackwardData(const Shape& s) {
  return s.kh == 3 && s.kw == 3 && s.stride == 1 && s.padding <= 2 && std::max(s.c, s.o) <= 64;
}

Shape Mirror(const Shape& s) {
  return Shape{s.n, s.ho, s.wo, s.o, 3, 3, s.c, s.h, s.w, 1, 2 - s.padding};
}

ffi::Error Run(const Shape& s, int direction, float* x, float* kernel, float* y) {
  if (s.stride < 1 || s.padding < 0) return ffi::Error::InvalidArgument("bad stride or padding");
  if (direction == kForward && RunsAsBackwardData(s)) {
    // mirrored[kh][kw][o][c] = kernel[2 - kh][2 - kw][c][o]: the mirror's HWIO kernel.
    thread_local std::vector<float> mirrored;
    float* w = static_cast<float*>(Scratch(mirrored, 9 * s.c * s.o * sizeof(float)));
    for (long tap = 0; tap < 9; tap++)
      for (long c = 0; c < s.c; c++)
        for (long o = 0; o < s.o; o++)
          w[((8 - tap) * s.o + o) * s.c + c] = kernel[(tap * s.c + c) * s.o + o];
    return Run(Mirror(s), kBackwardData, y, w, x);  // its dx is our y, its dy our x
  }
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


// ---------------------------------------------------------------------------------------------
// Winograd's F(2x2, 3x3) (Lavin & Gray, 2016). Each 2x2 block ("tile") of output pixels needs a
// 4x4 patch d of the input; with the transforms
//   B^T = [1 0 -1 0; 0 1 1 0; 0 -1 1 0; 0 1 0 -1],  G = [1 0 0; .5 .5 .5; .5 -.5 .5; 0 0 1],
//   A^T = [1 1 1 0; 0 1 -1 -1],
// the tile is A^T [ sum_c (G g_co G^T) . (B^T d_c B) ] A, an elementwise product in the 4x4
// transformed space. Summed over channels, each of the 16 positions is one matrix product
// V[T, C] @ U[C, O] over the tiles T. Tiles are processed in blocks so that the transformed input
// and products of a block stay in cache: blocks of kTileBlock through oneDNN's matmul, or, with
// few channels (at most kSmallChannels, C_out a multiple of 8), blocks of kSmallTileBlock that
// each thread takes through both transforms and its own register-blocked products (oneDNN's
// matmul is slow at those sizes).
//
// The input gradient of a 3x3, stride-1 convolution is the forward convolution of dy with the
// window flipped and the channel axes swapped, at padding 2 - p: the same code with the kernel
// transform reading taps in reverse and the matrix product reading U transposed.

constexpr long kTileBlock = 512;
// Up to 64 channels the few-channel form beats oneDNN's matmul: 1.07-1.17x at 40-64 channels on
// an AMD EPYC (experiments/results/3_ab_winograd_panels*.md, against the bound of 32 before).
constexpr long kSmallChannels = 64;
constexpr long kSmallTileBlock = 128;

bool WinogradSupported() {
  return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
}

// The transforms, compiled for AVX2 (RunWinograd refuses CPUs without it), written once for a
// lane type: 8 floats, or 1 for the channels past a multiple of 8.
#pragma GCC push_options
#pragma GCC target("avx2,fma")
struct Lanes8 {
  __m256 v;
  static Lanes8 Load(const float* p) { return {_mm256_loadu_ps(p)}; }
  void Store(float* p) const { _mm256_storeu_ps(p, v); }
  Lanes8 operator+(Lanes8 b) const { return {_mm256_add_ps(v, b.v)}; }
  Lanes8 operator-(Lanes8 b) const { return {_mm256_sub_ps(v, b.v)}; }
  Lanes8 Half() const { return {_mm256_mul_ps(v, _mm256_set1_ps(0.5f))}; }
};
struct Lanes1 {
  float v;
  static Lanes1 Load(const float* p) { return {*p}; }
  void Store(float* p) const { *p = v; }
  Lanes1 operator+(Lanes1 b) const { return {v + b.v}; }
  Lanes1 operator-(Lanes1 b) const { return {v - b.v}; }
  Lanes1 Half() const { return {v * 0.5f}; }
};

// Calls body.template operator()<L>(i) for i in [0, n): Lanes8 while 8 fit, then Lanes1.
template <typename Body>
void ForLanes(long n, Body&& body) {
  long i = 0;
  for (; i + 8 <= n; i += 8) body.template operator()<Lanes8>(i);
  for (; i < n; i++) body.template operator()<Lanes1>(i);
}

// u[16] (row-major 4x4) = G g G^T for the 3x3 taps g[9], at lanes [o, o + width).
template <typename L>
inline void KernelTile(const float* const g[9], float* const u[16], long o) {
  L t[4][3];
  for (int j = 0; j < 3; j++) {
    L g0 = L::Load(g[j] + o), g1 = L::Load(g[3 + j] + o), g2 = L::Load(g[6 + j] + o);
    t[0][j] = g0;
    t[1][j] = (g0 + g1 + g2).Half();
    t[2][j] = (g0 - g1 + g2).Half();
    t[3][j] = g2;
  }
  for (int i = 0; i < 4; i++) {
    L a = t[i][0], b = t[i][1], c = t[i][2];
    a.Store(u[4 * i] + o);
    (a + b + c).Half().Store(u[4 * i + 1] + o);
    (a - b + c).Half().Store(u[4 * i + 2] + o);
    c.Store(u[4 * i + 3] + o);
  }
}

// v[16] = B^T d B for the 4x4 patch d[16], at lanes [c, c + width).
template <typename L>
inline void InputTile(const float* const d[16], float* const v[16], long c) {
  L s[4][4];
  for (int j = 0; j < 4; j++) {
    L d0 = L::Load(d[j] + c), d1 = L::Load(d[4 + j] + c);
    L d2 = L::Load(d[8 + j] + c), d3 = L::Load(d[12 + j] + c);
    s[0][j] = d0 - d2;
    s[1][j] = d1 + d2;
    s[2][j] = d2 - d1;
    s[3][j] = d1 - d3;
  }
  for (int i = 0; i < 4; i++) {
    (s[i][0] - s[i][2]).Store(v[4 * i] + c);
    (s[i][1] + s[i][2]).Store(v[4 * i + 1] + c);
    (s[i][2] - s[i][1]).Store(v[4 * i + 2] + c);
    (s[i][1] - s[i][3]).Store(v[4 * i + 3] + c);
  }
}

// y[4] (row-major 2x2) = A^T m A for m[16], at lanes [o, o + width).
template <typename L>
inline void OutputTile(const float* const m[16], float* const y[4], long o) {
  L s[2][4];
  for (int j = 0; j < 4; j++) {
    L m0 = L::Load(m[j] + o), m1 = L::Load(m[4 + j] + o);
    L m2 = L::Load(m[8 + j] + o), m3 = L::Load(m[12 + j] + o);
    s[0][j] = m0 + m1 + m2;
    s[1][j] = m1 - m2 - m3;
  }
  for (int i = 0; i < 2; i++) {
    (s[i][0] + s[i][1] + s[i][2]).Store(y[2 * i] + o);
    (s[i][1] - s[i][2] - s[i][3]).Store(y[2 * i + 1] + o);
  }
}

// The geometry of one Winograd convolution: in[N, H, W, C_in] -> out[N, Ho, Wo, C_out].
struct WinogradShape {
  long n, h, w, c_in, c_out, padding, ho, wo, tiles_h, tiles_w;
  long tiles() const { return n * tiles_h * tiles_w; }
};

WinogradShape MakeWinogradShape(long n, long h, long w, long c_in, long c_out, long padding) {
  long ho = h + 2 * padding - 2, wo = w + 2 * padding - 2;
  return {n, h, w, c_in, c_out, padding, ho, wo, (ho + 1) / 2, (wo + 1) / 2};
}

// U[16][C][O] from the HWIO kernel, taps reversed when `flip` (the input gradient).
void TransformKernel(const float* kernel, long C, long O, bool flip,
                                   float* U) {
#pragma omp parallel for
  for (long c = 0; c < C; c++) {
    const float* g[9];
    for (int k = 0; k < 9; k++) g[k] = kernel + ((flip ? 8 - k : k) * C + c) * O;
    float* u[16];
    for (int k = 0; k < 16; k++) u[k] = U + (k * C + c) * O;
    ForLanes(O, [&]<typename L>(long o) { KernelTile<L>(g, u, o); });
  }
}

// The distance between the 16 matrices of a block of `rows` tiles by `channels`: 64 bytes more
// than they take, so that the 16 rows a tile reads or writes are not 4 KiB apart (they would
// compete for the same L1 cache sets).
long KStride(long rows, long channels) { return rows * channels + 16; }

// Calls body(t, n, ti, tj) for the tiles t in [t0, t1) (image n, tile row ti, tile column tj),
// split in contiguous ranges over the calling thread's OpenMP team when `parallel`.
template <typename Body>
void ForTiles(const WinogradShape& s, long t0, long t1, bool parallel, Body&& body) {
#pragma omp parallel if (parallel)
  {
    const long threads = omp_get_num_threads(), me = omp_get_thread_num();
    const long per_thread = (t1 - t0 + threads - 1) / threads;
    const long first = t0 + me * per_thread, last = std::min(t1, first + per_thread);
    const long per_image = s.tiles_h * s.tiles_w;
    long n = first / per_image, ti = first % per_image / s.tiles_w, tj = first % s.tiles_w;
    for (long t = first; t < last; t++) {
      body(t, n, ti, tj);
      if (++tj == s.tiles_w) {
        tj = 0;
        if (++ti == s.tiles_h) ti = 0, n++;
      }
    }
  }
}

// V[16][t1 - t0][C_in] (matrices KStride apart) for the tiles [t0, t1).
void TransformInput(const WinogradShape& s, const float* x, long t0, long t1, bool parallel,
                    const float* zeros, float* V) {
  const long ks = KStride(t1 - t0, s.c_in);
  ForTiles(s, t0, t1, parallel, [&](long t, long n, long ti, long tj) {
    const float* d[16];
    for (int i = 0; i < 4; i++)
      for (int j = 0; j < 4; j++) {
        long h = 2 * ti - s.padding + i, w = 2 * tj - s.padding + j;
        bool inside = h >= 0 && h < s.h && w >= 0 && w < s.w;
        d[4 * i + j] = inside ? x + ((n * s.h + h) * s.w + w) * s.c_in : zeros;
      }
    float* v[16];
    for (int k = 0; k < 16; k++) v[k] = V + k * ks + (t - t0) * s.c_in;
    ForLanes(s.c_in, [&]<typename L>(long c) { InputTile<L>(d, v, c); });
  });
}

// out's pixels of the tiles [t0, t1) from M[16][t1 - t0][C_out] (KStride apart); pixels past
// the edge (odd Ho or Wo) go to `discard`, one row of C_out per thread of the team.
void TransformOutput(const WinogradShape& s, const float* M, long t0, long t1, bool parallel,
                     float* discard, float* out) {
  const long ks = KStride(t1 - t0, s.c_out);
  ForTiles(s, t0, t1, parallel, [&](long t, long n, long ti, long tj) {
    const float* m[16];
    for (int k = 0; k < 16; k++) m[k] = M + k * ks + (t - t0) * s.c_out;
    float* y[4];
    float* mine = discard + omp_get_thread_num() * s.c_out;
    for (int i = 0; i < 2; i++)
      for (int j = 0; j < 2; j++) {
        long h = 2 * ti + i, w = 2 * tj + j;
        y[2 * i + j] = h < s.ho && w < s.wo ? out + ((n * s.ho + h) * s.wo + w) * s.c_out : mine;
      }
    ForLanes(s.c_out, [&]<typename L>(long o) { OutputTile<L>(m, y, o); });
  });
}

// M[r, :] = V[r, :] @ U for `Rows` rows and 8 * Vecs columns: the accumulators stay in registers
// (Rows * Vecs <= 12 of AVX2's 16), each step one row of U and one broadcast V element per row.
template <int Vecs, int Rows>
inline void SmallTile(const float* v, long ldv, const float* u, long ldu, float* m, long ldm,
                      long depth) {
  __m256 acc[Rows][Vecs];
#pragma GCC unroll 12
  for (int r = 0; r < Rows; r++)
#pragma GCC unroll 4
    for (int j = 0; j < Vecs; j++) acc[r][j] = _mm256_setzero_ps();
  for (long c = 0; c < depth; c++) {
    __m256 b[Vecs];
#pragma GCC unroll 4
    for (int j = 0; j < Vecs; j++) b[j] = _mm256_loadu_ps(u + c * ldu + 8 * j);
#pragma GCC unroll 12
    for (int r = 0; r < Rows; r++) {
      __m256 a = _mm256_broadcast_ss(v + r * ldv + c);
#pragma GCC unroll 4
      for (int j = 0; j < Vecs; j++) acc[r][j] = _mm256_fmadd_ps(a, b[j], acc[r][j]);
    }
  }
#pragma GCC unroll 12
  for (int r = 0; r < Rows; r++)
#pragma GCC unroll 4
    for (int j = 0; j < Vecs; j++) _mm256_storeu_ps(m + r * ldm + 8 * j, acc[r][j]);
}

// SmallTile over `rows` rows, Rows at a time; the rows left over with fewer (Rows - 1, ...) rather
// than one by one: a single row keeps too few accumulators in flight to hide the FMA latency.
template <int Vecs, int Rows>
inline void RowPanel(const float* v, long ldv, const float* u, long ldu, float* m, long ldm,
                     long depth, long rows) {
  long r = 0;
  for (; r + Rows <= rows; r += Rows)
    SmallTile<Vecs, Rows>(v + r * ldv, ldv, u, ldu, m + r * ldm, ldm, depth);
  if constexpr (Rows > 1)
    if (r < rows)
      RowPanel<Vecs, Rows - 1>(v + r * ldv, ldv, u, ldu, m + r * ldm, ldm, depth, rows - r);
}

// M[16][rows][N] = V[16][rows][K] @ U[16][K][N] (V's and M's matrices KStride apart) for N a
// multiple of 8, on one thread, in column panels: 24 columns 4 rows at a time where exactly 24 are
// left, else 16 columns 6 rows at a time, and a last 8 columns 12 rows at a time.
void SmallProducts(const float* V, const float* U, float* M, long rows, long K, long N) {
  for (long k = 0; k < 16; k++) {
    const float* v = V + k * KStride(rows, K);
    const float* u = U + k * K * N;
    float* m = M + k * KStride(rows, N);
    for (long n0 = 0; n0 < N;) {
      if (N - n0 == 24) {
        RowPanel<3, 4>(v, K, u + n0, N, m + n0, N, K, rows);
        n0 += 24;
      } else if (N - n0 >= 16) {
        RowPanel<2, 6>(v, K, u + n0, N, m + n0, N, K, rows);
        n0 += 16;
      } else {
        RowPanel<1, 12>(v, K, u + n0, N, m + n0, N, K, rows);
        n0 += 8;
      }
    }
  }
}
#pragma GCC pop_options

// The 16 matrix products of a block of `tiles` tiles, with U[16][C][O] read as [16][C_in][C_out]
// (forward) or transposed (the input gradient).
struct BlockProduct {
  dnnl::matmul main;
  dnnl::memory::desc v_md, u_md, m_md, scratchpad_md;
};

BlockProduct MakeBlockProduct(const WinogradShape& s, long tiles, bool transposed) {
  using dims = dnnl::memory::dims;
  BlockProduct p;
  p.v_md = dnnl::memory::desc(dims{16, tiles, s.c_in}, dt::f32,
                              dims{KStride(tiles, s.c_in), s.c_in, 1});
  p.m_md = dnnl::memory::desc(dims{16, tiles, s.c_out}, dt::f32,
                              dims{KStride(tiles, s.c_out), s.c_out, 1});
  // U is stored [16][C][O]; forward reads it as [16][K = C][N = O], the input gradient as
  // [16][K = O][N = C].
  p.u_md = transposed ? dnnl::memory::desc(dims{16, s.c_in, s.c_out}, dt::f32,
                                           dims{s.c_in * s.c_out, 1, s.c_in})
                      : dnnl::memory::desc(dims{16, s.c_in, s.c_out}, dt::f32, tag::abc);
  dnnl::matmul::primitive_desc pd(dnnl::matmul::desc(p.v_md, p.u_md, p.m_md), UserScratchpad(),
                                  Engine());
  p.scratchpad_md = pd.scratchpad_desc();
  p.main = dnnl::matmul(pd);
  return p;
}

// Few channels (C_out a multiple of 8, at most kSmallChannels on each side): SmallProducts.
// Otherwise oneDNN's matmul on blocks of kTileBlock tiles (a WinogradPlan).
bool FewChannels(const WinogradShape& s) {
  return s.c_out % 8 == 0 && std::max(s.c_in, s.c_out) <= kSmallChannels;
}

struct WinogradPlan {
  BlockProduct full, tail;  // blocks of kTileBlock tiles, and the last one if shorter
};

std::unique_ptr<WinogradPlan> MakeWinogradPlan(const WinogradShape& s, bool transposed) {
  auto plan = std::make_unique<WinogradPlan>();
  long full = std::min(kTileBlock, s.tiles()), tail = s.tiles() % full;
  plan->full = MakeBlockProduct(s, full, transposed);
  if (tail) plan->tail = MakeBlockProduct(s, tail, transposed);
  return plan;
}

WinogradPlan& GetWinogradPlan(const WinogradShape& s, bool transposed) {
  static std::mutex mutex;
  static std::map<std::tuple<bool, long, long, long, long, long, long>,
                  std::unique_ptr<WinogradPlan>>
      plans;
  std::lock_guard<std::mutex> lock(mutex);
  auto& slot = plans[{transposed, s.n, s.h, s.w, s.c_in, s.c_out, s.padding}];
  if (!slot) slot = MakeWinogradPlan(s, transposed);
  return *slot;
}

// The few-channel form: each thread takes whole blocks of kSmallTileBlock tiles through the input
// transform, SmallProducts and the output transform, in buffers of its own (one parallel region
// per call; the matrices are too small to share between threads). U as TransformKernel wrote it.
void RunSmall(const WinogradShape& s, bool transposed, const float* in, const float* U,
              const float* zeros, float* discard, float* out) {
  const long K = s.c_in, N = s.c_out;
  std::vector<float> u_kn;  // U as SmallProducts reads it, [16][K = C_in][N = C_out]
  if (transposed) {
    u_kn.resize(16 * K * N);
    for (long k = 0; k < 16; k++)
      for (long n = 0; n < N; n++)
        for (long c = 0; c < K; c++) u_kn[(k * K + c) * N + n] = U[(k * N + n) * K + c];
    U = u_kn.data();
  }
  const long blocks = (s.tiles() + kSmallTileBlock - 1) / kSmallTileBlock;
#pragma omp parallel
  {
    std::vector<float> V(16 * KStride(kSmallTileBlock, K)), M(16 * KStride(kSmallTileBlock, N));
    float* mine = discard + omp_get_thread_num() * N;
#pragma omp for schedule(static)
    for (long b = 0; b < blocks; b++) {
      long t0 = b * kSmallTileBlock, t1 = std::min(s.tiles(), t0 + kSmallTileBlock);
      TransformInput(s, in, t0, t1, false, zeros, V.data());
      SmallProducts(V.data(), U, M.data(), t1 - t0, K, N);
      TransformOutput(s, M.data(), t0, t1, false, mine, out);
    }
  }
}

// in[N,H,W,C_in] (*) kernel -> out[N,Ho,Wo,C_out]. Forward: kernel [3,3,C_in,C_out]. Input
// gradient (`transposed`): in is dy, out is dx, kernel [3,3,C_out,C_in] as the forward pass had it.
ffi::Error RunWinograd(const WinogradShape& s, bool transposed, const float* in,
                       const float* kernel, float* out) {
  if (s.padding < 0 || s.padding > 2 || s.ho < 1 || s.wo < 1)
    return ffi::Error::InvalidArgument("Winograd F(2x2,3x3): padding 0-2 and a 3x3 window only");
  if (!WinogradSupported()) return ffi::Error::InvalidArgument("Winograd F(2x2,3x3) needs AVX2");
  try {
    thread_local dnnl::stream stream(Engine());
    thread_local std::vector<float> u, v, m, zeros, discard, scratchpad;
    // U as TransformKernel writes it: [16][C][O] of the forward kernel.
    const long kernel_c = transposed ? s.c_out : s.c_in, kernel_o = transposed ? s.c_in : s.c_out;
    float* U = static_cast<float*>(Scratch(u, 16 * kernel_c * kernel_o * sizeof(float)));
    zeros.assign(s.c_in, 0.f);
    discard.resize(s.c_out * omp_get_max_threads());
    TransformKernel(kernel, kernel_c, kernel_o, transposed, U);
    if (FewChannels(s)) {
      RunSmall(s, transposed, in, U, zeros.data(), discard.data(), out);
      return ffi::Error::Success();
    }
    WinogradPlan& plan = GetWinogradPlan(s, transposed);
    const long full = plan.full.v_md.dims()[1];
    float* V = static_cast<float*>(Scratch(v, 16 * KStride(full, s.c_in) * sizeof(float)));
    float* M = static_cast<float*>(Scratch(m, 16 * KStride(full, s.c_out) * sizeof(float)));
    for (long t0 = 0; t0 < s.tiles(); t0 += full) {
      long t1 = std::min(s.tiles(), t0 + full);
      TransformInput(s, in, t0, t1, true, zeros.data(), V);
      BlockProduct& product = t1 - t0 == full ? plan.full : plan.tail;
      dnnl::memory pad(product.scratchpad_md, Engine(),
                       Scratch(scratchpad, product.scratchpad_md.get_size()));
      product.main.execute(stream, {{DNNL_ARG_SRC, dnnl::memory(product.v_md, Engine(), V)},
                                    {DNNL_ARG_WEIGHTS, dnnl::memory(product.u_md, Engine(), U)},
                                    {DNNL_ARG_DST, dnnl::memory(product.m_md, Engine(), M)},
                                    {DNNL_ARG_SCRATCHPAD, pad}});
      stream.wait();
      TransformOutput(s, M, t0, t1, true, discard.data(), out);
    }
  } catch (const dnnl::error& e) {
    return ffi::Error::Internal(std::string("oneDNN: ") + e.what());
  }
  return ffi::Error::Success();
}

ffi::Error ForwardWinograd(ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> kernel,
                           ffi::ResultBuffer<ffi::F32> y, int64_t stride, int64_t padding) {
  auto xd = x.dimensions(), kd = kernel.dimensions();
  if (stride != 1 || kd[0] != 3 || kd[1] != 3)
    return ffi::Error::InvalidArgument("Winograd F(2x2,3x3): a 3x3 window at stride 1 only");
  auto s = MakeWinogradShape(xd[0], xd[1], xd[2], xd[3], kd[3], padding);
  return RunWinograd(s, false, x.typed_data(), kernel.typed_data(), y->typed_data());
}

ffi::Error BackwardDataWinograd(ffi::Buffer<ffi::F32> dy, ffi::Buffer<ffi::F32> kernel,
                                ffi::ResultBuffer<ffi::F32> dx, int64_t stride, int64_t padding) {
  auto dyd = dy.dimensions(), kd = kernel.dimensions();
  if (stride != 1 || kd[0] != 3 || kd[1] != 3)
    return ffi::Error::InvalidArgument("Winograd F(2x2,3x3): a 3x3 window at stride 1 only");
  // The mirror's padding 2 - p is in 0-2 exactly when p is; RunWinograd checks it.
  auto s = MakeWinogradShape(dyd[0], dyd[1], dyd[2], dyd[3], kd[2], 2 - padding);
  return RunWinograd(s, true, dy.typed_data(), kernel.typed_data(), dx->typed_data());
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
XLA_FFI_DEFINE_HANDLER_SYMBOL(jaxprune_conv_fwd_winograd, ForwardWinograd, JAXPRUNE_BIND);
XLA_FFI_DEFINE_HANDLER_SYMBOL(jaxprune_conv_bwd_data_winograd, BackwardDataWinograd, JAXPRUNE_BIND);

// Whether this CPU runs the Winograd handlers (they are compiled for AVX2 and FMA).
extern "C" int jaxprune_winograd_supported() { return WinogradSupported(); }

extern "C" const char* jaxprune_onednn_version() {
  static std::string version = [] {
    const dnnl_version_t* v = dnnl_version();
    return std::to_string(v->major) + "." + std::to_string(v->minor) + "." +
           std::to_string(v->patch);
  }();
  return version.c_str();
}
