// The fused BN -> ReLU -> 1x1 conv of a dense layer, read in place from the block's feature buffer.
//
// bn_relu_conv1x1_cpp: y[n] = weight @ relu(bn(x[n])) for x = buf[:, :C] (any strides: NCHW or
// channels-last).  The pixels are cut into tiles; each thread normalizes one tile into a cache-sized
// buffer and multiplies it by the weight with BLAS (at::mm_out) straight into the output, so the
// normalized input never exists as a C x N*HW tensor.
//
// bn_relu_conv1x1_backward_cpp: the same tiles again: Z = relu(bn(x)) is recomputed per tile,
// grad_weight += dY Z^T, dZ = W^T dY, g = dZ * (bn(x) > 0); one pass gives the per-channel sums of g and
// g * x_hat and adds gamma * invstd * g into grad_buffer[:, :C].  In training mode a second,
// GEMM-free pass subtracts gamma * invstd * (mean(g) + x_hat * mean(g * x_hat)).  (16-bit dtypes
// instead recompute dZ in the second pass, so grad_buffer is rounded once, as the reference does.)
#include "cpu_common.h"

namespace densenet_fused {
namespace cpu {
namespace {

// z[c * ldz + j] = relu(bn(x)) for the tile's pixels (channels-first x).
template <typename scalar_t, typename out_t>
void fill_cf(const View3<const scalar_t>& x, const BN<acc_type<scalar_t>>& bn, const std::vector<Segment>& segs,
             out_t* z, int64_t ldz) {
  for (int64_t c = 0; c < x.C; ++c) {
    out_t* zr = z + c * ldz;
    for (const Segment& seg : segs) {
      fill_run(x.data + seg.n * x.sN + c * x.sC + seg.s, zr + seg.j, seg.len, bn.mean[c], bn.invstd[c], bn.gamma[c],
               bn.beta[c]);
    }
  }
}

// z[j * ldz + c] = relu(bn(x)) for the tile's pixels g0 .. g1-1 (channels-last x).
template <typename scalar_t, typename out_t>
void fill_cl(const View3<const scalar_t>& x, const BN<acc_type<scalar_t>>& bn, int64_t g0, int64_t g1, out_t* z,
             int64_t ldz) {
  int64_t n = g0 / x.S, s = g0 % x.S;
  for (int64_t j = 0; j < g1 - g0; ++j) {
    fill_row(x.data + n * x.sN + s * x.sS, z + j * ldz, x.C, bn.mean, bn.invstd, bn.gamma, bn.beta);
    if (++s == x.S) s = 0, ++n;
  }
}

// ---------------------------------------------------------------------------------------------------
// Forward.

at::Tensor bn_relu_conv1x1_cpp(const at::Tensor& x_in, const at::Tensor& mean, const at::Tensor& invstd,
                               const at::Tensor& gamma, const at::Tensor& beta, const at::Tensor& weight) {
  constexpr const char* op = "bn_relu_conv1x1_cpp";
  check_input(x_in, op);
  check_bn(x_in, mean, invstd, gamma, beta, op);
  check_weight(weight, x_in, op);
  at::AutoDispatchBelowADInplaceOrView guard;
  const bool cl = is_channels_last(x_in);
  const at::Tensor x = in_layout(x_in, cl);
  const int64_t N = x.size(0), C = x.size(1), S = spatial_numel(x), P = N * S, B = weight.size(0);
  at::Tensor y = empty_layout(N, B, x.sizes().slice(2), cl, x.options());
  if (P == 0 || B == 0) return y;
  if (C == 0) return y.zero_();
  const at::Tensor w = weight.contiguous();
  const auto m = mean.contiguous(), is = invstd.contiguous(), g = gamma.contiguous(), b = beta.contiguous();
  // y's storage: [P, B] rows (channels-last) or [N, B, S] (channels-first).
  const at::Tensor y_rows = cl ? y.movedim(1, -1).reshape({P, B}) : at::Tensor();
  const at::Tensor y3 = cl ? at::Tensor() : y.view({N, B, S});
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), op, [&] {
    using acc_t = acc_type<scalar_t>;
    const auto bn = bn_params<acc_t>(m, is, g, b);
    const auto xv = view3<const scalar_t>(x);
    const Tiling tiling = plan_tiles(P, C * static_cast<int64_t>(sizeof(scalar_t)), tile_bytes());
    const int64_t T = tiling.tile;
    at::parallel_for(0, tiling.ntiles, 1, [&](int64_t t0, int64_t t1) {
      at::AutoDispatchBelowADInplaceOrView worker_guard;  // TLS is per thread
      at::Tensor zbuf = cl ? at::empty({T, C}, x.options()) : at::empty({C, T}, x.options());
      at::Tensor ybuf;  // channels-first tiles spanning several samples: GEMM here, then scatter
      std::vector<Segment> segs;
      for (int64_t t = t0; t < t1; ++t) {
        const int64_t g0 = t * T, g1 = std::min(P, g0 + T), len = g1 - g0;
        if (cl) {
          fill_cl<scalar_t, scalar_t>(xv, bn, g0, g1, zbuf.data_ptr<scalar_t>(), C);
          at::Tensor out = y_rows.narrow(0, g0, len);
          at::mm_out(out, zbuf.narrow(0, 0, len), w.t());
          continue;
        }
        tile_segments(g0, g1, S, segs);
        fill_cf<scalar_t, scalar_t>(xv, bn, segs, zbuf.data_ptr<scalar_t>(), T);
        mm_tile_into<scalar_t>(y3, w, zbuf.narrow(1, 0, len), segs, ybuf, T);
      }
    });
  });
  return y;
}

// ---------------------------------------------------------------------------------------------------
// Backward.

// What one pass over the tiles does (the elementwise part; pass 1 also recomputes Z for grad_weight).
enum class TilePass {
  kSumsAndGrad,  // pass 1: the sums, and grad_buffer += k * g (float32/float64, or eval mode)
  kSums,         // pass 1 of 16-bit training: the sums only
  kFullGrad,     // pass 2 of 16-bit training: grad_buffer += k * (g - mean_g - x_hat * mean_gx)
};

// One thread's scratch for the tiles it runs.
struct TileScratch {
  at::Tensor z, dz;  // relu(bn(x)) and W^T dY of a tile: [C, T] (channels-first) or [T, C]
  at::Tensor dy;     // dY of a tile, when it cannot be a view of grad_y (allocated on first use)
  std::vector<Segment> segs;
};

// The tiled backward: the tiles are cut into nchunks chunks (one per thread), each with its own
// grad_weight and sums, so that the result does not depend on which thread ran what.
template <typename scalar_t>
struct BackwardTiles {
  using acc_t = acc_type<scalar_t>;
  View3<const scalar_t> x;
  View3<const scalar_t> dy;
  View3<scalar_t> gb;  // grad_buffer[:, :C] (or the temporary standing in for it)
  const BNBackward<acc_t>& coefs;
  bool cl;
  at::Tensor dy_tensor;  // grad_y (for zero-copy tile views)
  at::Tensor w_acc;      // [B, C] in acc_t
  at::Tensor w_t;        // w_acc^T [C, B]
  int64_t P, T, ntiles, nchunks;
  at::Tensor dw_partial;     // [nchunks, B, C]: each chunk's grad_weight
  std::vector<double> sums;  // [nchunks, 2, C]: each chunk's sum g and sum g * x_hat

  BackwardTiles(const at::Tensor& x_t, const at::Tensor& dy_t, const at::Tensor& target,
                const BNBackward<acc_t>& coefs_, const at::Tensor& w, bool cl_)
      : x(view3<const scalar_t>(x_t)), dy(view3<const scalar_t>(dy_t)), gb(view3<scalar_t>(target)), coefs(coefs_),
        cl(cl_), dy_tensor(dy_t), w_acc(w), w_t(w.t()), P(x.N * x.S) {
    const int64_t C = x.C, B = dy.C;
    const Tiling tiling = plan_tiles(P, (2 * C + B) * static_cast<int64_t>(sizeof(acc_t)), 2 * tile_bytes());
    T = tiling.tile;
    ntiles = tiling.ntiles;
    nchunks = std::min(ntiles, tiling.nthreads);
    dw_partial = at::zeros({nchunks, B, C}, w_acc.options());
    sums.assign(static_cast<size_t>(nchunks * 2 * C), 0.0);
  }

  // dY of the tile as an acc_t matrix: [B, len] (channels-first) or [len, B] (channels-last); a
  // view of grad_y when possible, else gathered into buf.
  at::Tensor dy_tile(int64_t g0, int64_t g1, const std::vector<Segment>& segs, at::Tensor& buf) const {
    const int64_t len = g1 - g0, B = dy.C, S = dy.S;
    constexpr bool same = std::is_same_v<scalar_t, acc_t>;
    if (!cl) {
      if (same && segs.size() == 1) {
        return dy_tensor.select(0, segs[0].n).flatten(1).narrow(1, segs[0].s, len);
      }
      if (!buf.defined()) buf = at::empty({B, T}, w_acc.options());
      acc_t* d = buf.data_ptr<acc_t>();
      for (int64_t b = 0; b < B; ++b) {
        for (const Segment& seg : segs) {
          const scalar_t* src = dy.data + seg.n * dy.sN + b * dy.sC + seg.s;
          acc_t* dst = d + b * T + seg.j;
          for (int64_t i = 0; i < seg.len; ++i) dst[i] = static_cast<acc_t>(src[i]);
        }
      }
      return buf.narrow(1, 0, len);
    }
    if (same && dy.sN == S * dy.sS) {  // uniformly strided pixel rows
      return dy_tensor.as_strided({len, B}, {dy.sS, 1}, dy_tensor.storage_offset() + g0 * dy.sS);
    }
    if (!buf.defined()) buf = at::empty({T, B}, w_acc.options());
    acc_t* d = buf.data_ptr<acc_t>();
    int64_t n = g0 / S, s = g0 % S;
    for (int64_t j = 0; j < len; ++j) {
      const scalar_t* src = dy.data + n * dy.sN + s * dy.sS;
      for (int64_t b = 0; b < B; ++b) d[j * B + b] = static_cast<acc_t>(src[b]);
      if (++s == S) s = 0, ++n;
    }
    return buf.narrow(0, 0, len);
  }

  static constexpr GradMode grad_mode(TilePass pass) {
    return pass == TilePass::kSums ? GradMode::kNone
                                   : (pass == TilePass::kFullGrad ? GradMode::kAddFull : GradMode::kAddLocal);
  }

  // Elementwise part of a tile, channels-first: dz [C, ld] holds W^T dY.  Adds sum g and sum g * x_hat
  // into sums[c], sums[C + c] (not in kFullGrad) and the pass's gradient into grad_buffer.
  template <TilePass PASS>
  void elementwise_cf(const std::vector<Segment>& segs, const acc_t* dz, int64_t ld, double* sums) const {
    constexpr bool SUMS = PASS != TilePass::kFullGrad;
    const int64_t C = x.C;
    for (int64_t c = 0; c < C; ++c) {
      const ChannelBN<acc_t> p = coefs.channel(c);
      const acc_t* dzr = dz + c * ld;
      acc_t lg[kLanes] = {0}, lgx[kLanes] = {0};
      for (const Segment& seg : segs) {
        bn_relu_backward_run<scalar_t, SUMS, grad_mode(PASS)>(x.data + seg.n * x.sN + c * x.sC + seg.s,
                                                              gb.data + seg.n * gb.sN + c * gb.sC + seg.s,
                                                              dzr + seg.j, seg.len, p, lg, lgx);
      }
      if constexpr (SUMS) {
        double sg = 0, sgx = 0;
        for (int u = 0; u < kLanes; ++u) sg += lg[u], sgx += lgx[u];
        sums[c] += sg;
        sums[C + c] += sgx;
      }
    }
  }

  // Elementwise part of a tile, channels-last: dz [len, C] (row stride ld).  The tile's sums are
  // accumulated per channel in acc_t (vectorized across channels), then added to the double sums.
  template <TilePass PASS>
  void elementwise_cl(int64_t g0, int64_t g1, const acc_t* dz, int64_t ld, double* sums) const {
    constexpr bool SUMS = PASS != TilePass::kFullGrad;
    const int64_t C = x.C, S = x.S;
    std::vector<acc_t> tile_sums(SUMS ? 2 * C : 0, acc_t(0));
    acc_t* sg = tile_sums.data();
    acc_t* sgx = SUMS ? sg + C : nullptr;
    int64_t n = g0 / S, s = g0 % S;
    for (int64_t j = 0; j < g1 - g0; ++j) {
      bn_relu_backward_row<scalar_t, SUMS, grad_mode(PASS)>(x.data + n * x.sN + s * x.sS,
                                                            gb.data + n * gb.sN + s * gb.sS, dz + j * ld, C, coefs,
                                                            sg, sgx);
      if (++s == S) s = 0, ++n;
    }
    if constexpr (SUMS) {
      for (int64_t c = 0; c < 2 * C; ++c) sums[c] += tile_sums[c];
    }
  }

  // Tile t: in pass 1 Z = relu(bn(x)) is recomputed and dw += dY Z^T; then dZ = W^T dY and the
  // elementwise part.
  template <TilePass PASS>
  void tile(int64_t t, at::Tensor& dw, double* tile_sums, TileScratch& s) const {
    const int64_t C = x.C, g0 = t * T, g1 = std::min(P, g0 + T), len = g1 - g0;
    constexpr bool pass1 = PASS != TilePass::kFullGrad;
    if (!cl) tile_segments(g0, g1, x.S, s.segs);
    const at::Tensor dyt = dy_tile(g0, g1, s.segs, s.dy);
    if (cl) {
      if constexpr (pass1) {
        fill_cl<scalar_t, acc_t>(x, coefs.bn, g0, g1, s.z.data_ptr<acc_t>(), C);
        dw.addmm_(dyt.t(), s.z.narrow(0, 0, len));
      }
      at::Tensor dz = s.dz.narrow(0, 0, len);
      at::mm_out(dz, dyt, w_acc);
      elementwise_cl<PASS>(g0, g1, s.dz.data_ptr<acc_t>(), C, tile_sums);
    } else {
      if constexpr (pass1) {
        fill_cf<scalar_t, acc_t>(x, coefs.bn, s.segs, s.z.data_ptr<acc_t>(), T);
        dw.addmm_(dyt, s.z.narrow(1, 0, len).t());
      }
      at::Tensor dz = s.dz.narrow(1, 0, len);
      at::mm_out(dz, w_t, dyt);
      elementwise_cf<PASS>(s.segs, s.dz.data_ptr<acc_t>(), T, tile_sums);
    }
  }

  // One pass over all tiles, a chunk of consecutive tiles at a time.
  template <TilePass PASS>
  void run() {
    const int64_t C = x.C;
    at::parallel_for(0, nchunks, 1, [&](int64_t k0, int64_t k1) {
      at::AutoDispatchBelowADInplaceOrView worker_guard;  // TLS is per thread
      TileScratch s;
      s.z = cl ? at::empty({T, C}, w_acc.options()) : at::empty({C, T}, w_acc.options());
      s.dz = cl ? at::empty({T, C}, w_acc.options()) : at::empty({C, T}, w_acc.options());
      for (int64_t chunk = k0; chunk < k1; ++chunk) {
        at::Tensor dw = dw_partial.select(0, chunk);
        double* chunk_sums = PASS == TilePass::kFullGrad ? nullptr : sums.data() + chunk * 2 * C;
        for (int64_t t = ntiles * chunk / nchunks; t < ntiles * (chunk + 1) / nchunks; ++t) {
          tile<PASS>(t, dw, chunk_sums, s);
        }
      }
    });
  }

  // The chunks' sums added up in chunk order: sum g [C], then sum g * x_hat [C].
  std::vector<double> channel_sums() const {
    const int64_t C = x.C;
    std::vector<double> total(static_cast<size_t>(2 * C), 0.0);
    for (int64_t chunk = 0; chunk < nchunks; ++chunk) {
      for (int64_t i = 0; i < 2 * C; ++i) total[i] += sums[chunk * 2 * C + i];
    }
    return total;
  }
};

// grad -= k * (mean_g + x_hat * mean_gx) = a + (x - mean) * ib per element, a = k * mean_g,
// ib = k * invstd * mean_gx: the training-mode correction after pass 1 added k * g (no GEMM).
template <typename scalar_t, typename acc_t>
inline void correct_run(scalar_t* __restrict g, const scalar_t* __restrict x, int64_t len, acc_t a, acc_t m, acc_t ib) {
  for (int64_t i = 0; i < len; ++i) {
    g[i] = static_cast<scalar_t>(static_cast<acc_t>(g[i]) - (a + (static_cast<acc_t>(x[i]) - m) * ib));
  }
}

template <typename scalar_t, typename acc_t>
inline void correct_row(scalar_t* __restrict g, const scalar_t* __restrict x, int64_t C, const acc_t* __restrict a,
                        const acc_t* __restrict m, const acc_t* __restrict ib) {
  for (int64_t c = 0; c < C; ++c) {
    g[c] = static_cast<scalar_t>(static_cast<acc_t>(g[c]) - (a[c] + (static_cast<acc_t>(x[c]) - m[c]) * ib[c]));
  }
}

template <typename scalar_t>
void correction_pass(const View3<const scalar_t>& x, const View3<scalar_t>& gb,
                     const BNBackward<acc_type<scalar_t>>& coefs, bool cl) {
  using acc_t = acc_type<scalar_t>;
  const int64_t C = x.C, S = x.S;
  const BN<acc_t>& bn = coefs.bn;
  std::vector<acc_t> a(C), ib(C);
  for (int64_t c = 0; c < C; ++c) {
    a[c] = coefs.mean_g[c] * coefs.k[c], ib[c] = bn.invstd[c] * (coefs.mean_gx[c] * coefs.k[c]);
  }
  if (!cl) {
    at::parallel_for(0, x.N * C, std::max<int64_t>(1, 32768 / std::max<int64_t>(1, S)), [&](int64_t b0, int64_t b1) {
      for (int64_t i = b0; i < b1; ++i) {
        const int64_t n = i / C, c = i % C;
        correct_run<scalar_t, acc_t>(gb.data + n * gb.sN + c * gb.sC, x.data + n * x.sN + c * x.sC, S, a[c],
                                     bn.mean[c], ib[c]);
      }
    });
    return;
  }
  at::parallel_for(0, x.N * S, std::max<int64_t>(1, 32768 / std::max<int64_t>(1, C)), [&](int64_t p0, int64_t p1) {
    int64_t n = p0 / S, s = p0 % S;
    for (int64_t p = p0; p < p1; ++p) {
      correct_row<scalar_t, acc_t>(gb.data + n * gb.sN + s * gb.sS, x.data + n * x.sN + s * x.sS, C, a.data(),
                                   bn.mean, ib.data());
      if (++s == S) s = 0, ++n;
    }
  });
}

// True when t is a view the kernels can write through directly in the given layout.
bool writable_in_layout(const at::Tensor& t, bool cl) {
  int64_t sS = 0;
  if (!flat_spatial_stride(t, &sS)) return false;
  return cl ? t.stride(1) == 1 : sS == 1;
}

void check_backward_args(const at::Tensor& grad_y, const at::Tensor& x, const at::Tensor& mean,
                         const at::Tensor& invstd, const at::Tensor& gamma, const at::Tensor& beta,
                         const at::Tensor& weight, const at::Tensor& grad_buffer, const char* op) {
  check_input(x, op);
  check_bn(x, mean, invstd, gamma, beta, op);
  check_weight(weight, x, op);
  const int64_t N = x.size(0), C = x.size(1);
  check_like(grad_y, x, x.sizes().slice(2), weight.size(0), op, "grad_y");
  check_input(grad_buffer, op, "grad_buffer");
  TORCH_CHECK(grad_buffer.dim() == x.dim() && grad_buffer.size(0) == N && grad_buffer.size(1) >= C &&
                  grad_buffer.sizes().slice(2) == x.sizes().slice(2),
              op, ": grad_buffer must be [N, >= C, *spatial] with x's N, spatial sizes and C = ", C,
              "; got grad_buffer ", grad_buffer.sizes(), " for x ", x.sizes());
  TORCH_CHECK(grad_buffer.scalar_type() == x.scalar_type(), op, ": grad_buffer dtype ", grad_buffer.scalar_type(),
              " must match x's ", x.scalar_type());
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> bn_relu_conv1x1_backward_cpp(
    const at::Tensor& grad_y_in, const at::Tensor& x_in, const at::Tensor& mean, const at::Tensor& invstd,
    const at::Tensor& gamma, const at::Tensor& beta, const at::Tensor& weight, const at::Tensor& grad_buffer,
    bool training) {
  constexpr const char* op = "bn_relu_conv1x1_backward_cpp";
  check_backward_args(grad_y_in, x_in, mean, invstd, gamma, beta, weight, grad_buffer, op);
  const int64_t N = x_in.size(0), C = x_in.size(1), B = weight.size(0);
  at::AutoDispatchBelowADInplaceOrView guard;
  const bool cl = is_channels_last(x_in);
  const at::Tensor x = in_layout(x_in, cl);
  const at::Tensor dy = in_layout(grad_y_in, cl);
  const auto acc = acc_scalar_type(x.scalar_type());
  const int64_t P = N * spatial_numel(x);
  at::Tensor grad_gamma = at::zeros({C}, x.options().dtype(acc));
  at::Tensor grad_beta = at::zeros({C}, x.options().dtype(acc));
  at::Tensor grad_weight = at::zeros({B, C}, x.options().dtype(acc));
  if (P == 0 || C == 0 || B == 0) return {grad_weight.to(weight.scalar_type()), grad_gamma, grad_beta};

  at::Tensor gb_prefix = grad_buffer.narrow(1, 0, C);
  at::Tensor target = gb_prefix;  // where grad_x is added; a temporary when grad_buffer's layout is exotic
  if (!writable_in_layout(gb_prefix, cl)) target = empty_layout(N, C, x.sizes().slice(2), cl, x.options()).zero_();
  const auto m = mean.contiguous(), is = invstd.contiguous(), g = gamma.contiguous(), b = beta.contiguous();
  const at::Tensor w_acc = weight.to(acc).contiguous();

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), op, [&] {
    using acc_t = acc_type<scalar_t>;
    constexpr bool reduced = !std::is_same_v<scalar_t, acc_t>;
    BNBackward<acc_t> coefs(bn_params<acc_t>(m, is, g, b), C);
    BackwardTiles<scalar_t> tiles(x, dy, target, coefs, w_acc, cl);
    // 16-bit training waits with the gradient for pass 2 (recomputing dZ), so that grad_buffer is rounded
    // once; otherwise pass 1 adds k * g and (training) a GEMM-free pass subtracts the rest.
    if (training && reduced) {
      tiles.template run<TilePass::kSums>();
    } else {
      tiles.template run<TilePass::kSumsAndGrad>();
    }
    const std::vector<double> total = tiles.channel_sums();
    finalize_bn_sums(total.data(), total.data() + C, static_cast<double>(P), training, grad_gamma, grad_beta, coefs);
    at::sum_out(grad_weight, tiles.dw_partial, {0});
    if (training && !reduced) correction_pass<scalar_t>(tiles.x, tiles.gb, coefs, cl);
    if (training && reduced) tiles.template run<TilePass::kFullGrad>();
  });
  if (!target.is_same(gb_prefix)) gb_prefix.add_(target);
  return {grad_weight.to(weight.scalar_type()), grad_gamma, grad_beta};
}

}  // namespace
}  // namespace cpu
}  // namespace densenet_fused

TORCH_LIBRARY_FRAGMENT(densenet_fused, m) {
  m.def(
      "bn_relu_conv1x1_cpp(Tensor x, Tensor mean, Tensor invstd, Tensor gamma, Tensor beta, Tensor weight) "
      "-> Tensor");
  m.def(
      "bn_relu_conv1x1_backward_cpp(Tensor grad_y, Tensor x, Tensor mean, Tensor invstd, Tensor gamma, "
      "Tensor beta, Tensor weight, Tensor(a!) grad_buffer, bool training) -> (Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(densenet_fused, CPU, m) {
  m.impl("bn_relu_conv1x1_cpp", &densenet_fused::cpu::bn_relu_conv1x1_cpp);
  m.impl("bn_relu_conv1x1_backward_cpp", &densenet_fused::cpu::bn_relu_conv1x1_backward_cpp);
}
