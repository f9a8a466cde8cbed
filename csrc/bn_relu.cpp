// bn_relu_cpp: relu(gamma * (x - mean) * invstd + beta) per channel, in x's dtype and layout.
// bn_relu_backward_cpp: its gradients, with the ReLU mask recomputed from x: one fused pass for the
// two per-channel reductions (sum g, sum g * x_hat), one pass for grad_x.
#include "cpu_common.h"

namespace densenet_fused {
namespace cpu {
namespace {

template <typename scalar_t>
void forward_kernel(const View3<const scalar_t>& x, const View3<scalar_t>& z, const BN<acc_type<scalar_t>>& bn,
                    bool cl) {
  const int64_t C = x.C, S = x.S;
  if (!cl) {
    at::parallel_for(0, x.N * C, std::max<int64_t>(1, 32768 / std::max<int64_t>(1, S)), [&](int64_t b, int64_t e) {
      for (int64_t i = b; i < e; ++i) {
        const int64_t n = i / C, c = i % C;
        fill_run(x.data + n * x.sN + c * x.sC, z.data + n * z.sN + c * z.sC, S, bn.mean[c], bn.invstd[c], bn.gamma[c],
                 bn.beta[c]);
      }
    });
    return;
  }
  at::parallel_for(0, x.N * S, std::max<int64_t>(1, 32768 / std::max<int64_t>(1, C)), [&](int64_t b, int64_t e) {
    int64_t n = b / S, s = b % S;
    for (int64_t p = b; p < e; ++p) {
      fill_row(x.data + n * x.sN + s * x.sS, z.data + n * z.sN + s * z.sS, C, bn.mean, bn.invstd, bn.gamma, bn.beta);
      if (++s == S) s = 0, ++n;
    }
  });
}

// Per-channel sum of g and of g * x_hat, g = grad_z masked by relu(bn(x)) > 0.
template <typename scalar_t>
void reduce_kernel(const View3<const scalar_t>& dz, const View3<const scalar_t>& x, const BN<acc_type<scalar_t>>& bn,
                   bool cl, double* sum_g, double* sum_gx) {
  using acc_t = acc_type<scalar_t>;
  const int64_t C = x.C, S = x.S;
  if (!cl) {
    at::parallel_for(0, C, 1, [&](int64_t c0, int64_t c1) {
      for (int64_t c = c0; c < c1; ++c) {
        const acc_t p[7] = {bn.mean[c], bn.invstd[c], bn.gamma[c], bn.beta[c], acc_t(0), acc_t(0), acc_t(0)};
        double sg = 0, sgx = 0;
        for (int64_t n = 0; n < x.N; ++n) {
          acc_t lg[kLanes] = {0}, lgx[kLanes] = {0};
          bn_relu_backward_run<scalar_t, true, GradMode::kNone>(x.data + n * x.sN + c * x.sC,
                                                                static_cast<scalar_t*>(nullptr),
                                                                dz.data + n * dz.sN + c * dz.sC, S, p, lg, lgx);
          for (int u = 0; u < kLanes; ++u) {
            sg += lg[u];
            sgx += lgx[u];
          }
        }
        sum_g[c] = sg;
        sum_gx[c] = sgx;
      }
    });
    return;
  }
  auto sums = chunked_channel_sums(x.N * S, C, 2, [&](int64_t p0, int64_t p1, double* acc) {
    std::vector<acc_t> chunk(2 * C, acc_t(0));
    int64_t n = p0 / S, s = p0 % S;
    for (int64_t p = p0; p < p1; ++p) {
      bn_relu_backward_row<scalar_t, true, GradMode::kNone>(
          x.data + n * x.sN + s * x.sS, static_cast<scalar_t*>(nullptr), dz.data + n * dz.sN + s * dz.sS, C, bn.mean,
          bn.invstd, bn.gamma, bn.beta, static_cast<const acc_t*>(nullptr), static_cast<const acc_t*>(nullptr),
          static_cast<const acc_t*>(nullptr), chunk.data(), chunk.data() + C);
      if (++s == S) s = 0, ++n;
    }
    for (int64_t i = 0; i < 2 * C; ++i) acc[i] += chunk[i];
  });
  std::copy(sums.begin(), sums.begin() + C, sum_g);
  std::copy(sums.begin() + C, sums.end(), sum_gx);
}

// grad_x = k * (g - mg - x_hat * mgx), k = gamma * invstd (mg = mgx = 0 in eval mode).
template <typename scalar_t>
void grad_kernel(const View3<const scalar_t>& dz, const View3<const scalar_t>& x, const View3<scalar_t>& dx,
                 const BN<acc_type<scalar_t>>& bn, const acc_type<scalar_t>* k, const acc_type<scalar_t>* mg,
                 const acc_type<scalar_t>* mgx, bool cl) {
  using acc_t = acc_type<scalar_t>;
  const int64_t C = x.C, S = x.S;
  if (!cl) {
    at::parallel_for(0, x.N * C, std::max<int64_t>(1, 32768 / std::max<int64_t>(1, S)), [&](int64_t b, int64_t e) {
      for (int64_t i = b; i < e; ++i) {
        const int64_t n = i / C, c = i % C;
        const acc_t p[7] = {bn.mean[c], bn.invstd[c], bn.gamma[c], bn.beta[c], k[c], mg[c], mgx[c]};
        bn_relu_backward_run<scalar_t, false, GradMode::kStore>(x.data + n * x.sN + c * x.sC,
                                                                dx.data + n * dx.sN + c * dx.sC,
                                                                dz.data + n * dz.sN + c * dz.sC, S, p, static_cast<acc_t*>(nullptr), static_cast<acc_t*>(nullptr));
      }
    });
    return;
  }
  at::parallel_for(0, x.N * S, std::max<int64_t>(1, 32768 / std::max<int64_t>(1, C)), [&](int64_t b, int64_t e) {
    int64_t n = b / S, s = b % S;
    for (int64_t p = b; p < e; ++p) {
      bn_relu_backward_row<scalar_t, false, GradMode::kStore>(
          x.data + n * x.sN + s * x.sS, dx.data + n * dx.sN + s * dx.sS, dz.data + n * dz.sN + s * dz.sS, C, bn.mean,
          bn.invstd, bn.gamma, bn.beta, k, mg, mgx, static_cast<acc_t*>(nullptr), static_cast<acc_t*>(nullptr));
      if (++s == S) s = 0, ++n;
    }
  });
}

at::Tensor bn_relu_cpp(const at::Tensor& x_in, const at::Tensor& mean, const at::Tensor& invstd,
                       const at::Tensor& gamma, const at::Tensor& beta) {
  constexpr const char* op = "bn_relu_cpp";
  check_input(x_in, op);
  check_bn(x_in, mean, invstd, gamma, beta, op);
  at::AutoDispatchBelowADInplaceOrView guard;
  const bool cl = is_channels_last(x_in);
  const at::Tensor x = in_layout(x_in, cl);
  at::Tensor z = empty_layout(x.size(0), x.size(1), x.sizes().slice(2), cl, x.options());
  if (x.numel() == 0) return z;
  const auto m = mean.contiguous(), is = invstd.contiguous(), g = gamma.contiguous(), b = beta.contiguous();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), op, [&] {
    using acc_t = acc_type<scalar_t>;
    forward_kernel<scalar_t>(view3<const scalar_t>(x), view3<scalar_t>(z), bn_params<acc_t>(m, is, g, b), cl);
  });
  return z;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> bn_relu_backward_cpp(const at::Tensor& grad_z_in,
                                                                    const at::Tensor& x_in, const at::Tensor& mean,
                                                                    const at::Tensor& invstd, const at::Tensor& gamma,
                                                                    const at::Tensor& beta, bool training) {
  constexpr const char* op = "bn_relu_backward_cpp";
  check_input(x_in, op);
  check_bn(x_in, mean, invstd, gamma, beta, op);
  check_like(grad_z_in, x_in, x_in.sizes().slice(2), x_in.size(1), op, "grad_z");
  at::AutoDispatchBelowADInplaceOrView guard;
  const bool cl = is_channels_last(x_in);
  const at::Tensor x = in_layout(x_in, cl);
  const at::Tensor dz = in_layout(grad_z_in, cl);
  const int64_t C = x.size(1);
  const auto acc = acc_scalar_type(x.scalar_type());
  at::Tensor dx = empty_layout(x.size(0), C, x.sizes().slice(2), cl, x.options());
  at::Tensor grad_gamma = at::zeros({C}, x.options().dtype(acc));
  at::Tensor grad_beta = at::zeros({C}, x.options().dtype(acc));
  if (x.numel() == 0) return {dx, grad_gamma, grad_beta};
  const auto m = mean.contiguous(), is = invstd.contiguous(), g = gamma.contiguous(), b = beta.contiguous();
  const double count = static_cast<double>(x.numel() / C);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), op, [&] {
    using acc_t = acc_type<scalar_t>;
    const auto bn = bn_params<acc_t>(m, is, g, b);
    const auto xv = view3<const scalar_t>(x);
    const auto dzv = view3<const scalar_t>(dz);
    std::vector<double> sum_g(C), sum_gx(C);
    reduce_kernel<scalar_t>(dzv, xv, bn, cl, sum_g.data(), sum_gx.data());
    std::vector<acc_t> k(C), mg(C, acc_t(0)), mgx(C, acc_t(0));
    acc_t* gg = grad_gamma.data_ptr<acc_t>();
    acc_t* gb = grad_beta.data_ptr<acc_t>();
    for (int64_t c = 0; c < C; ++c) {
      gb[c] = static_cast<acc_t>(sum_g[c]);
      gg[c] = static_cast<acc_t>(sum_gx[c]);
      k[c] = bn.gamma[c] * bn.invstd[c];
      if (training) {
        mg[c] = static_cast<acc_t>(gb[c] / static_cast<acc_t>(count));
        mgx[c] = static_cast<acc_t>(gg[c] / static_cast<acc_t>(count));
      }
    }
    grad_kernel<scalar_t>(dzv, xv, view3<scalar_t>(dx), bn, k.data(), mg.data(), mgx.data(), cl);
  });
  return {dx, grad_gamma, grad_beta};
}

}  // namespace
}  // namespace cpu
}  // namespace densenet_fused

TORCH_LIBRARY_FRAGMENT(densenet_fused, m) {
  m.def("bn_relu_cpp(Tensor x, Tensor mean, Tensor invstd, Tensor gamma, Tensor beta) -> Tensor");
  m.def(
      "bn_relu_backward_cpp(Tensor grad_z, Tensor x, Tensor mean, Tensor invstd, Tensor gamma, Tensor beta, "
      "bool training) -> (Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(densenet_fused, CPU, m) {
  m.impl("bn_relu_cpp", &densenet_fused::cpu::bn_relu_cpp);
  m.impl("bn_relu_backward_cpp", &densenet_fused::cpu::bn_relu_backward_cpp);
}
