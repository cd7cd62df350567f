// oneDNN's forward kernel against its backward-data kernel on the same 3x3, stride-1, padding-1
// forward convolution (NHWC, float32, batch 128), the measurement behind RunsAsBackwardData in
// jaxprune/cpu/_onednn/conv.cc: a forward convolution from C_in to C_out channels equals the input
// gradient of the convolution from C_out to C_in with the window flipped, so the backward-data
// primitive can compute it (the weights' layout aside, which does not change the time).
//
//   g++ -O2 experiments/onednn_forward_kernels.cc -o /tmp/onednn_forward_kernels -ldnnl
//   /tmp/onednn_forward_kernels > experiments/results/onednn_forward_kernels.md   # ~10 s
//
// Prints a markdown table of GFLOP/s (2 * multiply-adds / time, median of 7 calls after one to
// warm up) on oneDNN's own threads.
#include <algorithm>
#include <chrono>
#include <cstdio>
#include <functional>
#include <vector>

#include "oneapi/dnnl/dnnl.hpp"

using dt = dnnl::memory::data_type;
using tag = dnnl::memory::format_tag;

namespace {

dnnl::engine engine(dnnl::engine::kind::cpu, 0);
dnnl::stream stream(engine);

double MedianSeconds(const std::function<void()>& call) {
  call();
  std::vector<double> times;
  for (int i = 0; i < 7; i++) {
    auto start = std::chrono::steady_clock::now();
    call();
    times.push_back(std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count());
  }
  std::sort(times.begin(), times.end());
  return times[times.size() / 2];
}

dnnl::convolution_forward::primitive_desc ForwardDesc(long n, long c_in, long c_out, long size) {
  dnnl::memory::desc x({n, c_in, size, size}, dt::f32, tag::nhwc);
  dnnl::memory::desc y({n, c_out, size, size}, dt::f32, tag::nhwc);
  dnnl::memory::desc w({c_out, c_in, 3, 3}, dt::f32, tag::any);
  return {{dnnl::prop_kind::forward_training, dnnl::algorithm::convolution_direct, x, w, y,
           {1, 1}, {1, 1}, {1, 1}},
          engine};
}

// x[n, size, size, c_in] -> y[n, size, size, c_out] with the forward primitive.
double Forward(long n, long c_in, long c_out, long size) {
  auto pd = ForwardDesc(n, c_in, c_out, size);
  dnnl::memory x(pd.src_desc(), engine), w(pd.weights_desc(), engine), y(pd.dst_desc(), engine);
  dnnl::convolution_forward conv(pd);
  return MedianSeconds([&] {
    conv.execute(stream, {{DNNL_ARG_SRC, x}, {DNNL_ARG_WEIGHTS, w}, {DNNL_ARG_DST, y}});
    stream.wait();
  });
}

// The same map as the input gradient of the convolution from c_out to c_in channels.
double AsBackwardData(long n, long c_in, long c_out, long size) {
  auto hint = ForwardDesc(n, c_out, c_in, size);
  dnnl::memory::desc w({c_in, c_out, 3, 3}, dt::f32, tag::any);
  dnnl::convolution_backward_data::primitive_desc pd(
      {dnnl::algorithm::convolution_direct, hint.src_desc(), w, hint.dst_desc(), {1, 1}, {1, 1},
       {1, 1}},
      engine, hint);
  dnnl::memory x(pd.diff_dst_desc(), engine), kernel(pd.weights_desc(), engine);
  dnnl::memory y(pd.diff_src_desc(), engine);
  dnnl::convolution_backward_data conv(pd);
  return MedianSeconds([&] {
    conv.execute(stream,
                 {{DNNL_ARG_DIFF_DST, x}, {DNNL_ARG_WEIGHTS, kernel}, {DNNL_ARG_DIFF_SRC, y}});
    stream.wait();
  });
}

}  // namespace

int main() {
  const dnnl_version_t* version = dnnl_version();
  std::printf("oneDNN %d.%d.%d, batch 128, 3x3, stride 1, padding 1, GFLOP/s\n\n", version->major,
              version->minor, version->patch);
  std::printf("| pixels | C_in -> C_out | forward kernel | backward-data kernel | ratio |\n");
  std::printf("|---|---|---|---|---|\n");
  const long n = 128;
  for (long size : {32L, 16L, 8L})
    for (long c_in : {3L, 8L, 16L, 24L, 32L, 64L})
      for (long c_out : {8L, 16L, 24L, 32L, 64L}) {
        double flops = 2.0 * n * size * size * c_in * c_out * 9;
        double forward = Forward(n, c_in, c_out, size);
        double backward = AsBackwardData(n, c_in, c_out, size);
        std::printf("| %ldx%ld | %ld -> %ld | %.0f | %.0f | %.2f |\n", size, size, c_in, c_out,
                    flops / forward / 1e9, flops / backward / 1e9, forward / backward);
      }
  return 0;
}
