// channel_stats_cpp(x) -> (mean, var): per-channel mean and biased variance of x [N, C, *spatial] over
// the batch and all spatial dims.  Two passes (mean, then squared deviations) accumulated in double;
// deterministic (the summation order depends only on the shape, not on the thread count).
#include "cpu_common.h"

namespace densenet_fused {
namespace cpu {
namespace {

// sum over i < len of f(p[i]) in double, with kLanes independent partial sums.
template <typename scalar_t, typename F>
inline double sum_run(const scalar_t* p, int64_t len, const F& f) {
  double lanes[kLanes] = {0};
  int64_t i = 0;
  for (; i + kLanes <= len; i += kLanes) {
    for (int u = 0; u < kLanes; ++u) lanes[u] += f(static_cast<double>(p[i + u]));
  }
  double tail = 0;
  for (; i < len; ++i) tail += f(static_cast<double>(p[i]));
  double s = 0;
  for (int u = 0; u < kLanes; ++u) s += lanes[u];
  return s + tail;
}

// sum of f(x) over one channel's pixels (channels-first): the (n, c) planes in order.
template <typename scalar_t, typename F>
double channel_sum_cf(const View3<const scalar_t>& x, int64_t c, const F& f) {
  double sum = 0;
  for (int64_t n = 0; n < x.N; ++n) sum += sum_run(x.data + n * x.sN + c * x.sC, x.S, f);
  return sum;
}

// Per-channel sums of f(x, c) over all pixels (channels-last), in the deterministic chunk order.
template <typename scalar_t, typename F>
std::vector<double> channel_sums_cl(const View3<const scalar_t>& x, const F& f) {
  const int64_t C = x.C, S = x.S;
  return chunked_channel_sums(x.N * S, C, 1, [&](int64_t p0, int64_t p1, double* acc) {
    for (int64_t g = p0; g < p1; ++g) {
      const scalar_t* row = x.data + (g / S) * x.sN + (g % S) * x.sS;
      for (int64_t c = 0; c < C; ++c) acc[c] += f(static_cast<double>(row[c]), c);
    }
  });
}

// Channels-first: both passes over a channel in one task (its planes are still in cache for the second).
template <typename scalar_t>
void stats_channels_first(const View3<const scalar_t>& x, double* mean, double* var) {
  const double count = static_cast<double>(x.N * x.S);
  at::parallel_for(0, x.C, 1, [&](int64_t c0, int64_t c1) {
    for (int64_t c = c0; c < c1; ++c) {
      const double m = channel_sum_cf(x, c, [](double v) { return v; }) / count;
      mean[c] = m;
      var[c] = channel_sum_cf(x, c, [m](double v) { return (v - m) * (v - m); }) / count;
    }
  });
}

// Channels-last: a pass for the means, then one for the squared deviations.
template <typename scalar_t>
void stats_channels_last(const View3<const scalar_t>& x, double* mean, double* var) {
  const int64_t C = x.C;
  const double count = static_cast<double>(x.N * x.S);
  const auto sums = channel_sums_cl(x, [](double v, int64_t) { return v; });
  for (int64_t c = 0; c < C; ++c) mean[c] = sums[c] / count;
  const auto squares = channel_sums_cl(x, [mean](double v, int64_t c) {
    const double d = v - mean[c];
    return d * d;
  });
  for (int64_t c = 0; c < C; ++c) var[c] = squares[c] / count;
}

std::tuple<at::Tensor, at::Tensor> channel_stats_cpp(const at::Tensor& x_in) {
  constexpr const char* op = "channel_stats_cpp";
  check_input(x_in, op);
  const bool cl = is_channels_last(x_in);
  const at::Tensor x = in_layout(x_in, cl);
  const int64_t C = x.size(1);
  const auto acc = acc_scalar_type(x.scalar_type());
  at::Tensor mean = at::empty({C}, x.options().dtype(at::kDouble));
  at::Tensor var = at::empty({C}, x.options().dtype(at::kDouble));
  if (x.numel() == 0) {
    mean.fill_(std::numeric_limits<double>::quiet_NaN());
    var.fill_(std::numeric_limits<double>::quiet_NaN());
  } else {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), op, [&] {
      const auto v = view3<const scalar_t>(x);
      if (cl) {
        stats_channels_last(v, mean.data_ptr<double>(), var.data_ptr<double>());
      } else {
        stats_channels_first(v, mean.data_ptr<double>(), var.data_ptr<double>());
      }
    });
  }
  if (acc == at::kDouble) return {mean, var};
  return {mean.to(acc), var.to(acc)};
}

}  // namespace
}  // namespace cpu
}  // namespace densenet_fused

TORCH_LIBRARY_FRAGMENT(densenet_fused, m) { m.def("channel_stats_cpp(Tensor x) -> (Tensor, Tensor)"); }

TORCH_LIBRARY_IMPL(densenet_fused, CPU, m) { m.impl("channel_stats_cpp", &densenet_fused::cpu::channel_stats_cpp); }
