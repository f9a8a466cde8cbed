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
void reduce_kernel(const View3<const scalar_t>& dz, const View3<const scalar_t>& x,
                   const BNBackward<acc_type<scalar_t>>& coefs, bool cl, double* sum_g, double* sum_gx) {
  using acc_t = acc_type<scalar_t>;
  const int64_t C = x.C, S = x.S;
  if (!cl) {
    at::parallel_for(0, C, 1, [&](int64_t c0, int64_t c1) {
      for (int64_t c = c0; c < c1; ++c) {
        const ChannelBN<acc_t> p = coefs.channel(c);
        double sg = 0, sgx = 0;
        for (int64_t n = 0; n < x.N; ++n) {
          add_run_sums(x.data + n * x.sN + c * x.sC, dz.data + n * dz.sN + c * dz.sC, S, p, sg, sgx);
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
      bn_relu_backward_row<scalar_t, true, GradMode::kNone>(x.data + n * x.sN + s * x.sS, nullptr,
                                                            dz.data + n * dz.sN + s * dz.sS, C, coefs, chunk.data(),
                                                            chunk.data() + C);
      if (++s == S) s = 0, ++n;
    }
    for (int64_t i = 0; i < 2 * C; ++i) acc[i] += chunk[i];
  });
  std::copy(sums.begin(), sums.begin() + C, sum_g);
  std::copy(sums.begin() + C, sums.end(), sum_gx);
}

// grad_x = k * (g - mean_g - x_hat * mean_gx) (the means are 0 in eval mode).
template <typename scalar_t>
void grad_kernel(const View3<const scalar_t>& dz, const View3<const scalar_t>& x, const View3<scalar_t>& dx,
                 const BNBackward<acc_type<scalar_t>>& coefs, bool cl) {
  const int64_t C = x.C, S = x.S;
  if (!cl) {
    at::parallel_for(0, x.N * C, std::max<int64_t>(1, 32768 / std::max<int64_t>(1, S)), [&](int64_t b, int64_t e) {
      for (int64_t i = b; i < e; ++i) {
        const int64_t n = i / C, c = i % C;
        bn_relu_backward_run<scalar_t, false, GradMode::kStore>(x.data + n * x.sN + c * x.sC,
                                                                dx.data + n * dx.sN + c * dx.sC,
                                                                dz.data + n * dz.sN + c * dz.sC, S, coefs.channel(c),
                                                                nullptr, nullptr);
      }
    });
    return;
  }
  at::parallel_for(0, x.N * S, std::max<int64_t>(1, 32768 / std::max<int64_t>(1, C)), [&](int64_t b, int64_t e) {
    int64_t n = b / S, s = b % S;
    for (int64_t p = b; p < e; ++p) {
      bn_relu_backward_row<scalar_t, false, GradMode::kStore>(x.data + n * x.sN + s * x.sS,
                                                              dx.data + n * dx.sN + s * dx.sS,
                                                              dz.data + n * dz.sN + s * dz.sS, C, coefs, nullptr,
                                                              nullptr);
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
    const auto xv = view3<const scalar_t>(x);
    const auto dzv = view3<const scalar_t>(dz);
    BNBackward<acc_t> coefs(bn_params<acc_t>(m, is, g, b), C);
    std::vector<double> sum_g(C), sum_gx(C);
    reduce_kernel<scalar_t>(dzv, xv, coefs, cl, sum_g.data(), sum_gx.data());
    finalize_bn_sums(sum_g.data(), sum_gx.data(), count, training, grad_gamma, grad_beta, coefs);
    grad_kernel<scalar_t>(dzv, xv, view3<scalar_t>(dx), coefs, cl);
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
