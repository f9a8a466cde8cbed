// The fused transition: weight @ avgpool2x(relu(bn(x))), pooling (kernel 2, stride 2, floor) before the
// GEMM, which is the same function with 2^d fewer FLOPs than convolving first.  Spatial rank 1, 2 or 3.
//
// Forward: tiles of output pixels; each thread pools relu(bn(x)) of its tile's windows into a
// cache-sized buffer and multiplies it by the weight with BLAS, straight into the output.
//
// Backward, three passes:
//   1. tiles of output pixels: the pooled tile P is recomputed, grad_weight += dY P^T, dP = W^T dY
//      (dP kept for all output pixels: a quarter of x's size in 2-D);
//   2. per-channel sums of g = dP / 2^d * (bn(x) > 0) and of g * x_hat, dP upsampled one
//      (sample, channel) plane or one pixel at a time;
//   3. grad_x = gamma * invstd * (g - mean(g) - x_hat * mean(g * x_hat)) (eval mode: without the
//      means) for every input pixel; the pixels that the floor cuts off get g = 0.
#include "cpu_common.h"

namespace densenet_fused {
namespace cpu {
namespace {

// Spatial sizes padded to 3 dims (leading 1s), the pooling factor per dim (1 for padded dims), the
// output sizes, and the window's pixel offsets.
struct PoolGeometry {
  int64_t D[3], k[3], O[3];
  int64_t S, Os, K;
  int64_t window[8];

  explicit PoolGeometry(const at::Tensor& x) {
    const int64_t rank = x.dim() - 2;
    for (int d = 0; d < 3; ++d) {
      const int64_t src = d - (3 - rank);
      D[d] = src >= 0 ? x.size(2 + src) : 1;
      k[d] = src >= 0 ? 2 : 1;
      O[d] = D[d] / k[d];
    }
    S = D[0] * D[1] * D[2];
    Os = O[0] * O[1] * O[2];
    K = k[0] * k[1] * k[2];
    int64_t w = 0;
    for (int64_t a = 0; a < k[0]; ++a)
      for (int64_t b = 0; b < k[1]; ++b)
        for (int64_t c = 0; c < k[2]; ++c) window[w++] = (a * D[1] + b) * D[2] + c;
  }

  // Input pixel index (within a sample) of the first pixel of output pixel q's window.
  int64_t window_start(int64_t q) const {
    const int64_t o2 = q % O[2], o1 = (q / O[2]) % O[1], o0 = q / (O[2] * O[1]);
    return ((k[0] * o0) * D[1] + k[1] * o1) * D[2] + k[2] * o2;
  }

  // Output pixel (within a sample) of input pixel s, or -1 when the floor cuts it off.
  int64_t pooled_index(int64_t s) const {
    const int64_t i2 = s % D[2], i1 = (s / D[2]) % D[1], i0 = s / (D[2] * D[1]);
    const int64_t o0 = i0 / k[0], o1 = i1 / k[1], o2 = i2 / k[2];
    if (o0 >= O[0] || o1 >= O[1] || o2 >= O[2]) return -1;
    return (o0 * O[1] + o1) * O[2] + o2;
  }

  // dup [S] = one (sample, channel) plane dp [Os] of the pooled gradient times inv_k, spread over each
  // window; 0 where the floor cuts off.
  template <typename acc_t>
  void upsample_plane(const acc_t* dp, acc_t inv_k, acc_t* dup) const {
    const int64_t W = D[2];
    for (int64_t i0 = 0; i0 < D[0]; ++i0) {
      for (int64_t i1 = 0; i1 < D[1]; ++i1) {
        acc_t* row = dup + (i0 * D[1] + i1) * W;
        if (i0 >= k[0] * O[0] || i1 >= k[1] * O[1]) {
          std::fill(row, row + W, acc_t(0));
          continue;
        }
        const acc_t* dpr = dp + ((i0 / k[0]) * O[1] + i1 / k[1]) * O[2];
        for (int64_t w = 0; w < O[2]; ++w) row[2 * w] = row[2 * w + 1] = dpr[w] * inv_k;  // k[2] is 2
        std::fill(row + 2 * O[2], row + W, acc_t(0));
      }
    }
  }
};

// For output pixels q0 .. q1-1 (global index q = n * Os + o): element offset in x (without the channel
// term) of each window's first pixel.
void window_offsets(const PoolGeometry& pg, int64_t sN, int64_t sS, int64_t q0, int64_t q1,
                    std::vector<int64_t>& out) {
  out.resize(q1 - q0);
  for (int64_t q = q0; q < q1; ++q) out[q - q0] = (q / pg.Os) * sN + pg.window_start(q % pg.Os) * sS;
}

// Pooled relu(bn(x)) of a tile: p[c * ld + j] (channels-first) or p[j * ld + c] (channels-last).
// ROUND: round relu(bn(x)) to x's dtype before pooling, as the reference forward does.
template <typename scalar_t, typename out_t, bool ROUND>
void pooled_tile(const View3<const scalar_t>& x, const BN<acc_type<scalar_t>>& bn, const PoolGeometry& pg,
                 const std::vector<int64_t>& offs, bool cl, out_t* p, int64_t ld, std::vector<acc_type<scalar_t>>& row) {
  using acc_t = acc_type<scalar_t>;
  const int64_t C = x.C, len = static_cast<int64_t>(offs.size()), K = pg.K;
  int64_t woff[8];
  for (int64_t w = 0; w < K; ++w) woff[w] = pg.window[w] * x.sS;
  const acc_t inv_k = acc_t(1) / static_cast<acc_t>(K);
  auto f = [&](scalar_t v, int64_t c) {
    const acc_t z = relu((static_cast<acc_t>(v) - bn.mean[c]) * bn.invstd[c] * bn.gamma[c] + bn.beta[c]);
    return ROUND ? round_to<scalar_t, acc_t>(z) : z;
  };
  if (!cl) {
    for (int64_t c = 0; c < C; ++c) {
      const scalar_t* xc = x.data + c * x.sC;
      out_t* pr = p + c * ld;
      for (int64_t j = 0; j < len; ++j) {
        const scalar_t* xw = xc + offs[j];
        acc_t sum = 0;
        for (int64_t w = 0; w < K; ++w) sum += f(xw[woff[w]], c);
        pr[j] = static_cast<out_t>(sum * inv_k);
      }
    }
    return;
  }
  row.resize(C);
  for (int64_t j = 0; j < len; ++j) {
    std::fill(row.begin(), row.end(), acc_t(0));
    for (int64_t w = 0; w < K; ++w) {
      const scalar_t* xr = x.data + offs[j] + woff[w];
      for (int64_t c = 0; c < C; ++c) row[c] += f(xr[c], c);
    }
    out_t* pr = p + j * ld;
    for (int64_t c = 0; c < C; ++c) pr[c] = static_cast<out_t>(row[c] * inv_k);
  }
}

void check_pool_input(const at::Tensor& x, const char* op) {
  check_input(x, op, "x", 2);
  TORCH_CHECK(x.dim() >= 3 && x.dim() <= 5, op, ": x must have 1, 2 or 3 spatial dims, got shape ", x.sizes());
}

std::vector<int64_t> pooled_sizes(const at::Tensor& x) {
  std::vector<int64_t> out;
  for (int64_t d = 2; d < x.dim(); ++d) out.push_back(x.size(d) / 2);
  return out;
}

// ---------------------------------------------------------------------------------------------------
// Forward.

at::Tensor bn_relu_pool_conv1x1_cpp(const at::Tensor& x_in, const at::Tensor& mean, const at::Tensor& invstd,
                                    const at::Tensor& gamma, const at::Tensor& beta, const at::Tensor& weight) {
  constexpr const char* op = "bn_relu_pool_conv1x1_cpp";
  check_pool_input(x_in, op);
  check_bn(x_in, mean, invstd, gamma, beta, op);
  check_weight(weight, x_in, op);
  at::AutoDispatchBelowADInplaceOrView guard;
  const bool cl = is_channels_last(x_in);
  const at::Tensor x = in_layout(x_in, cl);
  const PoolGeometry pg(x);
  const int64_t N = x.size(0), C = x.size(1), B = weight.size(0), Po = N * pg.Os;
  const auto out_spatial = pooled_sizes(x);
  at::Tensor y = empty_layout(N, B, out_spatial, cl, x.options());
  if (Po == 0 || B == 0) return y;
  if (C == 0) return y.zero_();
  const at::Tensor w = weight.contiguous();
  const auto m = mean.contiguous(), is = invstd.contiguous(), g = gamma.contiguous(), b = beta.contiguous();
  // y's storage: [Po, B] rows (channels-last) or [N, B, Os] (channels-first).
  const bool y_cl = cl && pg.Os > 1;
  const at::Tensor y_rows = y_cl ? y.movedim(1, -1).reshape({Po, B}) : at::Tensor();
  const at::Tensor y3 = y_cl ? at::Tensor() : y.view({N, B, pg.Os});
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), op, [&] {
    using acc_t = acc_type<scalar_t>;
    const auto bn = bn_params<acc_t>(m, is, g, b);
    const auto xv = view3<const scalar_t>(x);
    const Tiling tiling = plan_tiles(Po, C * static_cast<int64_t>(sizeof(scalar_t)), tile_bytes());
    const int64_t T = tiling.tile;
    at::parallel_for(0, tiling.ntiles, 1, [&](int64_t t0, int64_t t1) {
      at::AutoDispatchBelowADInplaceOrView worker_guard;  // TLS is per thread
      at::Tensor pbuf = cl ? at::empty({T, C}, x.options()) : at::empty({C, T}, x.options());
      at::Tensor ybuf;
      std::vector<int64_t> offs;
      std::vector<acc_t> row;
      std::vector<Segment> segs;
      for (int64_t t = t0; t < t1; ++t) {
        const int64_t q0 = t * T, q1 = std::min(Po, q0 + T), len = q1 - q0;
        window_offsets(pg, xv.sN, xv.sS, q0, q1, offs);
        pooled_tile<scalar_t, scalar_t, true>(xv, bn, pg, offs, cl, pbuf.data_ptr<scalar_t>(), cl ? C : T, row);
        if (cl) {
          const at::Tensor ptile = pbuf.narrow(0, 0, len);
          if (y_cl) {
            at::Tensor out = y_rows.narrow(0, q0, len);
            at::mm_out(out, ptile, w.t());
          } else {  // 1x1 output: y is [N, B, 1] contiguous, rows of B
            at::Tensor out = y3.view({N, B}).narrow(0, q0, len);
            at::mm_out(out, ptile, w.t());
          }
          continue;
        }
        tile_segments(q0, q1, pg.Os, segs);
        mm_tile_into<scalar_t>(y3, w, pbuf.narrow(1, 0, len), segs, ybuf, T);
      }
    });
  });
  return y;
}

// ---------------------------------------------------------------------------------------------------
// Backward.

// The three backward passes (see the file comment), sharing x, the BatchNorm coefficients and dP.
template <typename scalar_t>
struct PoolBackward {
  using acc_t = acc_type<scalar_t>;
  View3<const scalar_t> x;
  const PoolGeometry& pg;
  const BNBackward<acc_t>& coefs;
  bool cl;
  at::Tensor dp;  // dP = W^T dY for all output pixels: [C, Po] (channels-first) or [Po, C] (channels-last)
  acc_t inv_k;    // 1 / 2^d

  // Pass 1, tiles of output pixels: the pooled activation P is recomputed, grad_weight = sum dY P^T,
  // dP = W^T dY.  dy: [Po, B] rows (channels-last) or [N, B, Os] (channels-first), in acc_t.
  void grad_weight_and_dp(const at::Tensor& dy, const at::Tensor& w_acc, at::Tensor& grad_weight) {
    const int64_t N = x.N, C = x.C, B = w_acc.size(0), Po = N * pg.Os;
    if (Po == 0 || B == 0) {
      dp.zero_();
      return;
    }
    const acc_t* dyp = dy.data_ptr<acc_t>();
    const Tiling tiling = plan_tiles(Po, (C + B) * static_cast<int64_t>(sizeof(acc_t)), tile_bytes());
    const int64_t T = tiling.tile, ntiles = tiling.ntiles;
    const int64_t nchunks = std::min(ntiles, tiling.nthreads);
    at::Tensor dw_partial = at::zeros({nchunks, B, C}, w_acc.options());
    at::parallel_for(0, nchunks, 1, [&](int64_t k0, int64_t k1) {
      at::AutoDispatchBelowADInplaceOrView worker_guard;  // TLS is per thread
      at::Tensor pbuf = cl ? at::empty({T, C}, w_acc.options()) : at::empty({C, T}, w_acc.options());
      at::Tensor dybuf = cl ? at::Tensor() : at::empty({B, T}, w_acc.options());
      std::vector<int64_t> offs;
      std::vector<acc_t> row;
      std::vector<Segment> segs;
      for (int64_t chunk = k0; chunk < k1; ++chunk) {
        at::Tensor dw = dw_partial.select(0, chunk);
        for (int64_t t = ntiles * chunk / nchunks; t < ntiles * (chunk + 1) / nchunks; ++t) {
          const int64_t q0 = t * T, q1 = std::min(Po, q0 + T), len = q1 - q0;
          window_offsets(pg, x.sN, x.sS, q0, q1, offs);
          pooled_tile<scalar_t, acc_t, false>(x, coefs.bn, pg, offs, cl, pbuf.data_ptr<acc_t>(), cl ? C : T, row);
          if (cl) {
            const at::Tensor dyt = dy.narrow(0, q0, len);  // [len, B]
            dw.addmm_(dyt.t(), pbuf.narrow(0, 0, len));
            at::Tensor dpt = dp.narrow(0, q0, len);
            at::mm_out(dpt, dyt, w_acc);
            continue;
          }
          tile_segments(q0, q1, pg.Os, segs);  // gather the tile's dY columns [B, len]
          acc_t* d = dybuf.data_ptr<acc_t>();
          for (int64_t bb = 0; bb < B; ++bb) {
            for (const Segment& seg : segs) {
              const acc_t* src = dyp + (seg.n * B + bb) * pg.Os + seg.s;
              std::copy(src, src + seg.len, d + bb * T + seg.j);
            }
          }
          const at::Tensor dyt = dybuf.narrow(1, 0, len);
          dw.addmm_(dyt, pbuf.narrow(1, 0, len).t());
          at::Tensor dpt = dp.narrow(1, q0, len);
          at::mm_out(dpt, w_acc.t(), dyt);
        }
      }
    });
    at::sum_out(grad_weight, dw_partial, {0});
  }

  // Pass 2: per-channel sums of g and g * x_hat (deterministic order), g = dP / 2^d upsampled and
  // masked: sum g [C], then sum g * x_hat [C].
  std::vector<double> channel_sums() const {
    const int64_t N = x.N, C = x.C, S = pg.S, Po = N * pg.Os;
    const acc_t* dpp = dp.data_ptr<acc_t>();
    if (!cl) {
      std::vector<double> total(static_cast<size_t>(2 * C), 0.0);
      at::parallel_for(0, C, 1, [&](int64_t c0, int64_t c1) {
        std::vector<acc_t> dup(S);
        for (int64_t c = c0; c < c1; ++c) {
          const ChannelBN<acc_t> p = coefs.channel(c);
          double sg = 0, sgx = 0;
          for (int64_t n = 0; n < N; ++n) {
            pg.upsample_plane(dpp + c * Po + n * pg.Os, inv_k, dup.data());
            add_run_sums(x.data + n * x.sN + c * x.sC, dup.data(), S, p, sg, sgx);
          }
          total[c] = sg;
          total[C + c] = sgx;
        }
      });
      return total;
    }
    return chunked_channel_sums(N * S, C, 2, [&](int64_t p0, int64_t p1, double* out) {
      std::vector<acc_t> sums(2 * C, acc_t(0));
      for (int64_t p = p0; p < p1; ++p) {
        const int64_t n = p / S, s = p % S, q = pg.pooled_index(s);
        if (q < 0) continue;
        bn_relu_backward_row<scalar_t, true, GradMode::kNone>(x.data + n * x.sN + s * x.sS, nullptr,
                                                              dpp + (n * pg.Os + q) * C, C, coefs, sums.data(),
                                                              sums.data() + C);
      }
      // the rows summed dP, not dP / 2^d: scaled once per chunk instead of per element
      for (int64_t i = 0; i < 2 * C; ++i) out[i] += static_cast<double>(sums[i]) * inv_k;
    });
  }

  // Pass 3: grad_x = k * (g - mean_g - x_hat * mean_gx) for every input pixel.
  void grad_x(const View3<scalar_t>& dx) const {
    const int64_t N = x.N, C = x.C, S = pg.S, Po = N * pg.Os;
    const acc_t* dpp = dp.data_ptr<acc_t>();
    if (!cl) {
      at::parallel_for(0, N * C, std::max<int64_t>(1, 16384 / std::max<int64_t>(1, S)), [&](int64_t i0, int64_t i1) {
        std::vector<acc_t> dup(S);
        for (int64_t i = i0; i < i1; ++i) {
          const int64_t n = i / C, c = i % C;
          pg.upsample_plane(dpp + c * Po + n * pg.Os, inv_k, dup.data());
          bn_relu_backward_run<scalar_t, false, GradMode::kStore>(x.data + n * x.sN + c * x.sC,
                                                                  dx.data + n * dx.sN + c * dx.sC, dup.data(), S,
                                                                  coefs.channel(c), nullptr, nullptr);
        }
      });
      return;
    }
    at::parallel_for(0, N * S, std::max<int64_t>(1, 16384 / std::max<int64_t>(1, C)), [&](int64_t p0, int64_t p1) {
      std::vector<acc_t> scaled(C), zeros(C, acc_t(0));
      for (int64_t p = p0; p < p1; ++p) {
        const int64_t n = p / S, s = p % S, q = pg.pooled_index(s);
        const acc_t* dz = zeros.data();
        if (q >= 0) {
          const acc_t* dpr = dpp + (n * pg.Os + q) * C;
          for (int64_t c = 0; c < C; ++c) scaled[c] = dpr[c] * inv_k;
          dz = scaled.data();
        }
        bn_relu_backward_row<scalar_t, false, GradMode::kStore>(x.data + n * x.sN + s * x.sS,
                                                                dx.data + n * dx.sN + s * dx.sS, dz, C, coefs,
                                                                nullptr, nullptr);
      }
    });
  }
};

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> bn_relu_pool_conv1x1_backward_cpp(
    const at::Tensor& grad_y_in, const at::Tensor& x_in, const at::Tensor& mean, const at::Tensor& invstd,
    const at::Tensor& gamma, const at::Tensor& beta, const at::Tensor& weight, bool training) {
  constexpr const char* op = "bn_relu_pool_conv1x1_backward_cpp";
  check_pool_input(x_in, op);
  check_bn(x_in, mean, invstd, gamma, beta, op);
  check_weight(weight, x_in, op);
  const int64_t N = x_in.size(0), C = x_in.size(1), B = weight.size(0);
  const auto out_spatial = pooled_sizes(x_in);
  check_like(grad_y_in, x_in, out_spatial, B, op, "grad_y");
  at::AutoDispatchBelowADInplaceOrView guard;
  const bool cl = is_channels_last(x_in);
  const at::Tensor x = in_layout(x_in, cl);
  const PoolGeometry pg(x);
  const int64_t Po = N * pg.Os, P = N * pg.S;
  // grad_y as [Po, B] rows (channels-last) or [N, B, Os] (channels-first), in the accumulation dtype.
  const auto acc = acc_scalar_type(x.scalar_type());
  const at::Tensor dy = cl ? grad_y_in.movedim(1, -1).reshape({Po, B}).to(acc).contiguous()
                           : grad_y_in.reshape({N, B, pg.Os}).to(acc).contiguous();
  at::Tensor grad_x = empty_layout(N, C, x.sizes().slice(2), cl, x.options());
  at::Tensor grad_gamma = at::zeros({C}, x.options().dtype(acc));
  at::Tensor grad_beta = at::zeros({C}, x.options().dtype(acc));
  at::Tensor grad_weight = at::zeros({B, C}, x.options().dtype(acc));
  if (P == 0 || C == 0) return {grad_x.zero_(), grad_weight.to(weight.scalar_type()), grad_gamma, grad_beta};
  const auto m = mean.contiguous(), is = invstd.contiguous(), g = gamma.contiguous(), b = beta.contiguous();
  const at::Tensor w_acc = weight.to(acc).contiguous();

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), op, [&] {
    using acc_t = acc_type<scalar_t>;
    BNBackward<acc_t> coefs(bn_params<acc_t>(m, is, g, b), C);
    PoolBackward<scalar_t> passes{view3<const scalar_t>(x), pg, coefs, cl,
                                  cl ? at::empty({Po, C}, w_acc.options()) : at::empty({C, Po}, w_acc.options()),
                                  acc_t(1) / static_cast<acc_t>(pg.K)};
    passes.grad_weight_and_dp(dy, w_acc, grad_weight);
    const std::vector<double> total = passes.channel_sums();
    finalize_bn_sums(total.data(), total.data() + C, static_cast<double>(P), training, grad_gamma, grad_beta, coefs);
    passes.grad_x(view3<scalar_t>(grad_x));
  });
  return {grad_x, grad_weight.to(weight.scalar_type()), grad_gamma, grad_beta};
}

}  // namespace
}  // namespace cpu
}  // namespace densenet_fused

TORCH_LIBRARY_FRAGMENT(densenet_fused, m) {
  m.def(
      "bn_relu_pool_conv1x1_cpp(Tensor x, Tensor mean, Tensor invstd, Tensor gamma, Tensor beta, Tensor weight) "
      "-> Tensor");
  m.def(
      "bn_relu_pool_conv1x1_backward_cpp(Tensor grad_y, Tensor x, Tensor mean, Tensor invstd, Tensor gamma, "
      "Tensor beta, Tensor weight, bool training) -> (Tensor, Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(densenet_fused, CPU, m) {
  m.impl("bn_relu_pool_conv1x1_cpp", &densenet_fused::cpu::bn_relu_pool_conv1x1_cpp);
  m.impl("bn_relu_pool_conv1x1_backward_cpp", &densenet_fused::cpu::bn_relu_pool_conv1x1_backward_cpp);
}
