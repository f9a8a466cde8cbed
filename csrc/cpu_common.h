// Shared helpers of the C++ CPU kernels (one kernel per csrc/<name>.cpp file).
//
// Every kernel sees its input x [N, C, *spatial] as a 3-D [N, C, S] array (spatial dims flattened),
// in one of two layouts:
//   * channels-first (CF): each (n, c) plane of S pixels is contiguous (stride sS == 1);
//   * channels-last (CL): each pixel's C channels are contiguous (sC == 1), pixels sS apart.
// x may be a channel slice buf[:, a:b] of a larger buffer: only the strides tell where things are.
// Anything else (a layout neither of these) is first copied into one of them.
//
// Statistics and BatchNorm parameters use the accumulation type: double for double, float otherwise.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <string>
#include <type_traits>
#include <vector>

namespace densenet_fused {
namespace cpu {

template <typename scalar_t>
using acc_type = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;

inline at::ScalarType acc_scalar_type(at::ScalarType t) { return t == at::kDouble ? at::kDouble : at::kFloat; }

inline int64_t divup(int64_t a, int64_t b) { return (a + b - 1) / b; }

// ------------------------------------------------------------------------------------------------
// Argument checks (clear messages for bad shapes, dtypes, devices).

inline void check_input(const at::Tensor& x, const char* op, const char* name = "x", int64_t min_dim = 2) {
  TORCH_CHECK(x.defined(), op, ": ", name, " is undefined");
  TORCH_CHECK(x.device().is_cpu(), op, ": the C++ kernels take CPU tensors, got ", name, " on ", x.device());
  TORCH_CHECK(x.layout() == at::kStrided, op, ": ", name, " must be a dense (strided) tensor");
  auto t = x.scalar_type();
  TORCH_CHECK(t == at::kFloat || t == at::kDouble || t == at::kBFloat16 || t == at::kHalf, op, ": ", name,
              " must be float32, float64, bfloat16 or float16, got ", t);
  TORCH_CHECK(x.dim() >= min_dim, op, ": ", name, " must be [N, C, *spatial] with at least ", min_dim,
              " dims, got shape ", x.sizes());
}

inline void check_vector(const at::Tensor& v, int64_t C, at::ScalarType acc, const char* op, const char* name) {
  TORCH_CHECK(v.defined(), op, ": ", name, " is undefined");
  TORCH_CHECK(v.device().is_cpu(), op, ": ", name, " must be a CPU tensor, got one on ", v.device());
  TORCH_CHECK(v.dim() == 1 && v.size(0) == C, op, ": ", name, " must be a per-channel vector of ", C,
              " elements, got shape ", v.sizes());
  TORCH_CHECK(v.scalar_type() == acc, op, ": ", name, " must have the accumulation dtype ", acc, ", got ",
              v.scalar_type());
}

inline void check_bn(const at::Tensor& x, const at::Tensor& mean, const at::Tensor& invstd, const at::Tensor& gamma,
                     const at::Tensor& beta, const char* op) {
  const int64_t C = x.size(1);
  const auto acc = acc_scalar_type(x.scalar_type());
  check_vector(mean, C, acc, op, "mean");
  check_vector(invstd, C, acc, op, "invstd");
  check_vector(gamma, C, acc, op, "gamma");
  check_vector(beta, C, acc, op, "beta");
}

inline void check_weight(const at::Tensor& weight, const at::Tensor& x, const char* op) {
  TORCH_CHECK(weight.defined(), op, ": weight is undefined");
  TORCH_CHECK(weight.device().is_cpu(), op, ": weight must be a CPU tensor, got one on ", weight.device());
  TORCH_CHECK(weight.dim() == 2 && weight.size(1) == x.size(1), op, ": weight must be [B, C] with C = ", x.size(1),
              " (x's channels), got shape ", weight.sizes());
  TORCH_CHECK(weight.scalar_type() == x.scalar_type(), op, ": weight dtype ", weight.scalar_type(),
              " must match x's ", x.scalar_type());
}

// A per-sample gradient like grad_y [N, B, *spatial]: same batch and spatial sizes as expected.
inline void check_like(const at::Tensor& t, const at::Tensor& x, at::IntArrayRef spatial, int64_t channels,
                       const char* op, const char* name) {
  check_input(t, op, name);
  std::vector<int64_t> expected{x.size(0), channels};
  expected.insert(expected.end(), spatial.begin(), spatial.end());
  TORCH_CHECK(t.sizes() == at::IntArrayRef(expected), op, ": ", name, " must have shape ", at::IntArrayRef(expected),
              ", got ", t.sizes());
  TORCH_CHECK(t.scalar_type() == x.scalar_type(), op, ": ", name, " dtype ", t.scalar_type(), " must match x's ",
              x.scalar_type());
}

// ------------------------------------------------------------------------------------------------
// Layouts.

inline int64_t spatial_numel(const at::Tensor& t) {
  int64_t s = 1;
  for (int64_t d = 2; d < t.dim(); ++d) s *= t.size(d);
  return s;
}

// True when channels are innermost (also for a channel slice of such a buffer); as _backend.is_channels_last.
inline bool is_channels_last(const at::Tensor& t) {
  return t.dim() >= 3 && t.stride(1) == 1 && spatial_numel(t) > 1;
}

// Whether the spatial dims of t can be flattened into one dim; its stride in *stride (1 when S == 1).
inline bool flat_spatial_stride(const at::Tensor& t, int64_t* stride) {
  int64_t inner_stride = -1, inner_numel = 1;
  for (int64_t d = t.dim() - 1; d >= 2; --d) {
    if (t.size(d) == 1) continue;
    if (inner_stride < 0) {
      inner_stride = t.stride(d);
    } else if (t.stride(d) != inner_stride * inner_numel) {
      return false;
    }
    inner_numel *= t.size(d);
  }
  *stride = inner_stride < 0 ? 1 : inner_stride;
  return true;
}

// t itself when the kernels can read it in the given layout, else a copy in that layout.
inline at::Tensor in_layout(const at::Tensor& t, bool channels_last) {
  int64_t sS = 0;
  const bool flat = flat_spatial_stride(t, &sS);
  if (channels_last) {
    if (flat && t.stride(1) == 1) return t;
    return t.movedim(1, -1).contiguous().movedim(-1, 1);
  }
  if (flat && sS == 1) return t;
  return t.contiguous();
}

// An empty [N, C, *spatial] tensor, channels innermost when channels_last (any spatial rank).
inline at::Tensor empty_layout(int64_t N, int64_t C, at::IntArrayRef spatial, bool channels_last,
                               const at::TensorOptions& options) {
  std::vector<int64_t> sizes{N};
  if (!channels_last) {
    sizes.push_back(C);
    sizes.insert(sizes.end(), spatial.begin(), spatial.end());
    return at::empty(sizes, options);
  }
  sizes.insert(sizes.end(), spatial.begin(), spatial.end());
  sizes.push_back(C);
  return at::empty(sizes, options).movedim(-1, 1);
}

// x [N, C, *spatial] seen as [N, C, S]: element (n, c, s) at data + n*sN + c*sC + s*sS.
template <typename T>
struct View3 {
  T* data;
  int64_t N, C, S;
  int64_t sN, sC, sS;
};

template <typename T>
inline View3<T> view3(const at::Tensor& t) {
  View3<T> v;
  v.data = t.data_ptr<std::remove_const_t<T>>();
  v.N = t.size(0);
  v.C = t.size(1);
  v.S = spatial_numel(t);
  v.sN = t.stride(0);
  v.sC = t.stride(1);
  int64_t sS = 1;
  const bool flat = flat_spatial_stride(t, &sS);
  TORCH_INTERNAL_ASSERT(flat, "densenet_fused: spatial dims are not flattenable");
  v.sS = sS;
  return v;
}

// ------------------------------------------------------------------------------------------------
// Pixel tiles: the global pixel index g = n * S + s runs over [0, N*S); a tile is a range of it.

struct Tiling {
  int64_t tile;    // pixels per tile (the last one may have fewer)
  int64_t ntiles;  // number of tiles
  int64_t nthreads;
};

inline int64_t num_threads() { return at::in_parallel_region() ? 1 : std::max<int64_t>(1, at::get_num_threads()); }

// Bytes of tile data per thread the tiled kernels aim for.  Large enough for BLAS to run near its peak
// on the tile GEMMs (smaller tiles cost up to 2x there), small enough to stay in the outer caches.
// DENSENET_FUSED_TILE_BYTES overrides it (for tuning).
inline int64_t tile_bytes() {
  static const int64_t bytes = [] {
    const char* env = std::getenv("DENSENET_FUSED_TILE_BYTES");
    return env ? std::max<int64_t>(4096, std::atoll(env)) : int64_t(1) << 20;
  }();
  return bytes;
}

// Tiles of about target_bytes (bytes_per_pixel each pixel), as many as a multiple of the thread count.
inline Tiling plan_tiles(int64_t P, int64_t bytes_per_pixel, int64_t target_bytes, int64_t min_tile = 16) {
  Tiling t;
  t.nthreads = num_threads();
  if (P <= 0) {
    t.tile = 1;
    t.ntiles = 0;
    return t;
  }
  int64_t tile = std::max<int64_t>(min_tile, target_bytes / std::max<int64_t>(1, bytes_per_pixel));
  int64_t ntiles = divup(P, tile);
  ntiles = divup(ntiles, t.nthreads) * t.nthreads;  // every thread the same number of tiles
  tile = std::max<int64_t>(1, divup(P, ntiles));
  if (tile < min_tile) tile = std::min(P, min_tile);  // tiny problems: fewer, fuller tiles
  t.tile = tile;
  t.ntiles = divup(P, tile);
  return t;
}

// A run of pixels of one sample inside a tile: pixels s .. s+len-1 of sample n, tile columns j ...
struct Segment {
  int64_t n, s, len, j;
};

inline void tile_segments(int64_t g0, int64_t g1, int64_t S, std::vector<Segment>& out) {
  out.clear();
  int64_t g = g0, j = 0;
  while (g < g1) {
    const int64_t n = g / S, s = g % S;
    const int64_t len = std::min(S - s, g1 - g);
    out.push_back({n, s, len, j});
    g += len;
    j += len;
  }
}

// y3[n, :, s] = w @ z for the pixels of one channels-first tile (y3 is [N, B, S], z is [C, len] in tile
// order).  A tile inside one sample is written in place; one spanning samples goes through the scratch
// ybuf [B, capacity] (allocated on first use) and is scattered per segment.
template <typename scalar_t>
inline void mm_tile_into(const at::Tensor& y3, const at::Tensor& w, const at::Tensor& z, const std::vector<Segment>& segs,
                         at::Tensor& ybuf, int64_t capacity) {
  const int64_t B = w.size(0), S = y3.size(2), len = z.size(1);
  if (segs.size() == 1) {
    at::Tensor out = y3.select(0, segs[0].n).narrow(1, segs[0].s, len);
    at::mm_out(out, w, z);
    return;
  }
  if (!ybuf.defined()) ybuf = at::empty({B, capacity}, y3.options());
  at::Tensor out = ybuf.narrow(1, 0, len);
  at::mm_out(out, w, z);
  const scalar_t* src = ybuf.data_ptr<scalar_t>();
  scalar_t* dst = y3.data_ptr<scalar_t>();
  for (const Segment& seg : segs) {
    for (int64_t bb = 0; bb < B; ++bb) {
      std::copy(src + bb * capacity + seg.j, src + bb * capacity + seg.j + seg.len, dst + (seg.n * B + bb) * S + seg.s);
    }
  }
}

// Per-channel BatchNorm parameters, as raw pointers in the accumulation type.
template <typename acc_t>
struct BN {
  const acc_t* mean;
  const acc_t* invstd;
  const acc_t* gamma;
  const acc_t* beta;
};

template <typename acc_t>
inline BN<acc_t> bn_params(const at::Tensor& mean, const at::Tensor& invstd, const at::Tensor& gamma,
                           const at::Tensor& beta) {
  return {mean.data_ptr<acc_t>(), invstd.data_ptr<acc_t>(), gamma.data_ptr<acc_t>(), beta.data_ptr<acc_t>()};
}

// The BatchNorm + ReLU backward with g = dz * (x_hat * gamma + beta > 0), x_hat = (x - mean) * invstd:
//   grad_x = k * (g - mean_g - x_hat * mean_gx),  k = gamma * invstd,
// mean_g = mean(g) and mean_gx = mean(g * x_hat) over the pixels in training mode, 0 in eval mode.
// ChannelBN holds one channel's numbers (for the channels-first runs), BNBackward all channels'.
template <typename acc_t>
struct ChannelBN {
  acc_t mean, invstd, gamma, beta;
  acc_t k;        // gamma * invstd
  acc_t mean_g;   // mean(g)         (0 until the sums are finalized, and in eval mode)
  acc_t mean_gx;  // mean(g * x_hat) (likewise)
};

template <typename acc_t>
struct BNBackward {
  BN<acc_t> bn;
  std::vector<acc_t> k, mean_g, mean_gx;

  BNBackward(const BN<acc_t>& bn_, int64_t C) : bn(bn_), k(C), mean_g(C, acc_t(0)), mean_gx(C, acc_t(0)) {
    for (int64_t c = 0; c < C; ++c) k[c] = bn.gamma[c] * bn.invstd[c];
  }

  ChannelBN<acc_t> channel(int64_t c) const {
    return {bn.mean[c], bn.invstd[c], bn.gamma[c], bn.beta[c], k[c], mean_g[c], mean_gx[c]};
  }
};

// From the per-channel sums (double) of g and g * x_hat: grad_beta = sum g, grad_gamma = sum g * x_hat,
// and in training mode coefs.mean_g / mean_gx = those / count (count = pixels per channel).
template <typename acc_t>
inline void finalize_bn_sums(const double* sum_g, const double* sum_gx, double count, bool training,
                             at::Tensor& grad_gamma, at::Tensor& grad_beta, BNBackward<acc_t>& coefs) {
  acc_t* gg = grad_gamma.data_ptr<acc_t>();
  acc_t* gb = grad_beta.data_ptr<acc_t>();
  for (int64_t c = 0; c < grad_gamma.size(0); ++c) {
    gb[c] = static_cast<acc_t>(sum_g[c]);
    gg[c] = static_cast<acc_t>(sum_gx[c]);
    if (training) {
      coefs.mean_g[c] = gb[c] / static_cast<acc_t>(count);
      coefs.mean_gx[c] = gg[c] / static_cast<acc_t>(count);
    }
  }
}

// relu as torch.relu: NaN propagates.
template <typename T>
inline T relu(T v) {
  return v < T(0) ? T(0) : v;
}

// grad * (pre > 0): the reference multiplies by the ReLU mask (so NaN/inf gradients propagate).
// The 0.0/1.0 factor is built with integer ops so that the compiler emits no branch (a branch on
// random signs mispredicts half the time) and can still vectorize contiguous loops.
template <typename T>
inline T relu_grad(T pre, T grad) {
  using Bits = std::conditional_t<sizeof(T) == 8, uint64_t, uint32_t>;
  static_assert(sizeof(Bits) == sizeof(T), "relu_grad: float or double");
  const T one = T(1);
  Bits one_bits;
  std::memcpy(&one_bits, &one, sizeof(T));
  const Bits bits = one_bits & (Bits(0) - static_cast<Bits>(pre > T(0)));
  T factor;
  std::memcpy(&factor, &bits, sizeof(T));
  return grad * factor;
}

// Rounds an accumulation-type value through scalar_t (a no-op unless scalar_t is narrower).
template <typename scalar_t, typename acc_t>
inline acc_t round_to(acc_t v) {
  if constexpr (std::is_same_v<scalar_t, acc_t>) {
    return v;
  } else {
    return static_cast<acc_t>(static_cast<scalar_t>(v));
  }
}

// grad += delta, rounded as the reference does: grad_buffer += grad_x.to(dtype).
template <typename scalar_t, typename acc_t>
inline scalar_t add_rounded(scalar_t grad, acc_t delta) {
  return static_cast<scalar_t>(static_cast<acc_t>(grad) + round_to<scalar_t, acc_t>(delta));
}

constexpr int kLanes = 8;  // independent partial sums, so reduction loops vectorize

// 4 x float SIMD through the GCC/Clang vector extension (SSE on x86, NEON on ARM), for the few float
// loops the auto-vectorizer handles badly (short runs with reductions and read-modify-writes).
typedef float f32x4 __attribute__((vector_size(16)));
typedef int32_t i32x4 __attribute__((vector_size(16)));

inline f32x4 load4(const float* p) {
  f32x4 v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}
inline void store4(float* p, f32x4 v) { std::memcpy(p, &v, sizeof(v)); }
inline f32x4 splat4(float v) { return f32x4{v, v, v, v}; }
// relu_grad on 4 lanes: grad * (pre > 0 ? 1 : 0).
inline f32x4 relu_grad4(f32x4 pre, f32x4 grad) {
  const i32x4 mask = pre > splat4(0.f);  // -1 where true
  const f32x4 ones = splat4(1.f);
  i32x4 one_bits;
  std::memcpy(&one_bits, &ones, sizeof(one_bits));
  const i32x4 factor_bits = one_bits & mask;
  f32x4 factor;
  std::memcpy(&factor, &factor_bits, sizeof(factor));
  return grad * factor;
}

// relu(bn(x)) of a run of one channel (restrict: no aliasing checks in the short runs of small images).
template <typename scalar_t, typename out_t, typename acc_t>
inline void fill_run(const scalar_t* __restrict x, out_t* __restrict z, int64_t len, acc_t m, acc_t is, acc_t ga,
                     acc_t be) {
  int64_t i = 0;
  if constexpr (std::is_same_v<scalar_t, float> && std::is_same_v<out_t, float>) {
    const f32x4 vm = splat4(m), vis = splat4(is), vga = splat4(ga), vbe = splat4(be), zero = splat4(0.f);
    for (; i + 4 <= len; i += 4) {
      const f32x4 v = (load4(x + i) - vm) * vis * vga + vbe;
      store4(z + i, v < zero ? zero : v);  // relu, NaN kept (as torch.relu)
    }
  }
  for (; i < len; ++i) z[i] = static_cast<out_t>(relu((static_cast<acc_t>(x[i]) - m) * is * ga + be));
}

// relu(bn(x)) of one pixel's channels.
template <typename scalar_t, typename out_t, typename acc_t>
inline void fill_row(const scalar_t* __restrict x, out_t* __restrict z, int64_t C, const acc_t* __restrict m,
                     const acc_t* __restrict is, const acc_t* __restrict ga, const acc_t* __restrict be) {
  for (int64_t c = 0; c < C; ++c) z[c] = static_cast<out_t>(relu((static_cast<acc_t>(x[c]) - m[c]) * is[c] * ga[c] + be[c]));
}

// What a backward run does with the gradient it computes (delta = k * (g - a - x_hat * b) below).
enum class GradMode {
  kNone,      // nothing: reductions only
  kAddLocal,  // out += k * g          (eval mode, or the first half of the training formula)
  kAddFull,   // out += k * (g - a - x_hat * b)
  kStore,     // out  = k * (g - a - x_hat * b)
};

// The BatchNorm + ReLU backward of one channel's contiguous run of len pixels:
//   x_hat = (x - mean) * invstd,  g = dz * (x_hat * gamma + beta > 0)
// SUMS adds g and g * x_hat into the kLanes partial sums lg / lgx (unused, may be null, without SUMS);
// MODE says what is written to out (unused, may be null, for kNone), with a = p.mean_g, b = p.mean_gx.
// Explicit 4-lane SIMD for float (the auto-vectorizer handles these short runs with reductions badly),
// plain loops for the other types.
template <typename scalar_t, bool SUMS, GradMode MODE, typename grad_t, typename acc_t>
inline void bn_relu_backward_run(const scalar_t* __restrict xp, scalar_t* __restrict out, const grad_t* __restrict dz,
                                 int64_t len, const ChannelBN<acc_t>& p, std::type_identity_t<acc_t>* __restrict lg,
                                 std::type_identity_t<acc_t>* __restrict lgx) {
  const acc_t m = p.mean, is = p.invstd, ga = p.gamma, be = p.beta, kc = p.k, a = p.mean_g, b = p.mean_gx;
  int64_t i = 0;
  if constexpr (std::is_same_v<scalar_t, float> && std::is_same_v<grad_t, float>) {
    static_assert(kLanes == 8, "two 4-lane vectors per sum");
    const f32x4 vm = splat4(m), vis = splat4(is), vga = splat4(ga), vbe = splat4(be), vk = splat4(kc);
    const f32x4 va = splat4(a), vb = splat4(b);
    f32x4 sg[2] = {splat4(0.f), splat4(0.f)}, sgx[2] = {splat4(0.f), splat4(0.f)};
    if constexpr (SUMS) {
      sg[0] = load4(lg), sg[1] = load4(lg + 4), sgx[0] = load4(lgx), sgx[1] = load4(lgx + 4);
    }
    auto quad = [&](int64_t at, int h) {
      const f32x4 xh = (load4(xp + at) - vm) * vis;
      const f32x4 gg = relu_grad4(xh * vga + vbe, load4(dz + at));
      if constexpr (SUMS) {
        sg[h] += gg;
        sgx[h] += gg * xh;
      }
      if constexpr (MODE == GradMode::kAddLocal) store4(out + at, load4(out + at) + gg * vk);
      if constexpr (MODE == GradMode::kAddFull) store4(out + at, load4(out + at) + (gg - va - xh * vb) * vk);
      if constexpr (MODE == GradMode::kStore) store4(out + at, (gg - va - xh * vb) * vk);
    };
    for (; i + 8 <= len; i += 8) {
      quad(i, 0);
      quad(i + 4, 1);
    }
    if (i + 4 <= len) {
      quad(i, 0);
      i += 4;
    }
    if constexpr (SUMS) {
      store4(lg, sg[0]);
      store4(lg + 4, sg[1]);
      store4(lgx, sgx[0]);
      store4(lgx + 4, sgx[1]);
    }
  }
  for (; i + kLanes <= len; i += kLanes) {
    for (int u = 0; u < kLanes; ++u) {
      const acc_t xh = (static_cast<acc_t>(xp[i + u]) - m) * is;
      const acc_t gg = relu_grad<acc_t>(xh * ga + be, static_cast<acc_t>(dz[i + u]));
      if constexpr (SUMS) {
        lg[u] += gg;
        lgx[u] += gg * xh;
      }
      if constexpr (MODE == GradMode::kAddLocal) out[i + u] = add_rounded<scalar_t, acc_t>(out[i + u], gg * kc);
      if constexpr (MODE == GradMode::kAddFull) {
        out[i + u] = add_rounded<scalar_t, acc_t>(out[i + u], (gg - a - xh * b) * kc);
      }
      if constexpr (MODE == GradMode::kStore) out[i + u] = static_cast<scalar_t>((gg - a - xh * b) * kc);
    }
  }
  for (; i < len; ++i) {
    const acc_t xh = (static_cast<acc_t>(xp[i]) - m) * is;
    const acc_t gg = relu_grad<acc_t>(xh * ga + be, static_cast<acc_t>(dz[i]));
    if constexpr (SUMS) {
      lg[0] += gg;
      lgx[0] += gg * xh;
    }
    if constexpr (MODE == GradMode::kAddLocal) out[i] = add_rounded<scalar_t, acc_t>(out[i], gg * kc);
    if constexpr (MODE == GradMode::kAddFull) out[i] = add_rounded<scalar_t, acc_t>(out[i], (gg - a - xh * b) * kc);
    if constexpr (MODE == GradMode::kStore) out[i] = static_cast<scalar_t>((gg - a - xh * b) * kc);
  }
}

// The same for one pixel's C channels (channels-last): per-channel parameters as arrays (vectorized
// across channels), sums into sg[c], sgx[c].  a / b may be null for kAddLocal.
template <typename scalar_t, bool SUMS, GradMode MODE, typename grad_t, typename acc_t>
inline void bn_relu_backward_row(const scalar_t* __restrict xr, scalar_t* __restrict out, const grad_t* __restrict dz,
                                 int64_t C, const acc_t* __restrict mean, const acc_t* __restrict invstd,
                                 const acc_t* __restrict gamma, const acc_t* __restrict beta,
                                 const acc_t* __restrict k, const acc_t* __restrict a, const acc_t* __restrict b,
                                 acc_t* __restrict sg, acc_t* __restrict sgx) {
  for (int64_t c = 0; c < C; ++c) {
    const acc_t xh = (static_cast<acc_t>(xr[c]) - mean[c]) * invstd[c];
    const acc_t gg = relu_grad<acc_t>(xh * gamma[c] + beta[c], static_cast<acc_t>(dz[c]));
    if constexpr (SUMS) {
      sg[c] += gg;
      sgx[c] += gg * xh;
    }
    if constexpr (MODE == GradMode::kAddLocal) out[c] = add_rounded<scalar_t, acc_t>(out[c], gg * k[c]);
    if constexpr (MODE == GradMode::kAddFull) out[c] = add_rounded<scalar_t, acc_t>(out[c], (gg - a[c] - xh * b[c]) * k[c]);
    if constexpr (MODE == GradMode::kStore) out[c] = static_cast<scalar_t>((gg - a[c] - xh * b[c]) * k[c]);
  }
}

// bn_relu_backward_row with all channels' numbers from coefs (a = mean_g, b = mean_gx).
template <typename scalar_t, bool SUMS, GradMode MODE, typename grad_t, typename acc_t>
inline void bn_relu_backward_row(const scalar_t* xr, scalar_t* out, const grad_t* dz, int64_t C,
                                 const BNBackward<acc_t>& coefs, std::type_identity_t<acc_t>* sg,
                                 std::type_identity_t<acc_t>* sgx) {
  bn_relu_backward_row<scalar_t, SUMS, MODE>(xr, out, dz, C, coefs.bn.mean, coefs.bn.invstd, coefs.bn.gamma,
                                             coefs.bn.beta, coefs.k.data(), coefs.mean_g.data(),
                                             coefs.mean_gx.data(), sg, sgx);
}

// Adds sum g and sum g * x_hat of one channel's contiguous run to sg, sgx (lanes folded in order).
template <typename scalar_t, typename grad_t, typename acc_t>
inline void add_run_sums(const scalar_t* xp, const grad_t* dz, int64_t len, const ChannelBN<acc_t>& p, double& sg,
                         double& sgx) {
  acc_t lg[kLanes] = {0}, lgx[kLanes] = {0};
  bn_relu_backward_run<scalar_t, true, GradMode::kNone>(xp, nullptr, dz, len, p, lg, lgx);
  for (int u = 0; u < kLanes; ++u) {
    sg += lg[u];
    sgx += lgx[u];
  }
}

// Deterministic per-channel sums over the pixels of a channels-last array: fixed chunks (independent of
// the thread count) accumulate their own partials, then add up in chunk order.  body(p0, p1, acc)
// adds pixels [p0, p1) into acc[k * C + c] for k < nacc.  Returns the nacc * C sums.
template <typename F>
inline std::vector<double> chunked_channel_sums(int64_t P, int64_t C, int nacc, const F& body) {
  std::vector<double> total(static_cast<size_t>(nacc * C), 0.0);
  if (P <= 0 || C <= 0) return total;
  const int64_t nchunks = std::min<int64_t>(64, std::max<int64_t>(1, P / 256));
  std::vector<double> partial(static_cast<size_t>(nchunks * nacc * C), 0.0);
  at::parallel_for(0, nchunks, 1, [&](int64_t k0, int64_t k1) {
    for (int64_t k = k0; k < k1; ++k) {
      const int64_t p0 = P * k / nchunks, p1 = P * (k + 1) / nchunks;
      body(p0, p1, partial.data() + k * nacc * C);
    }
  });
  for (int64_t k = 0; k < nchunks; ++k) {
    const double* src = partial.data() + k * nacc * C;
    for (int64_t i = 0; i < nacc * C; ++i) total[i] += src[i];
  }
  return total;
}

}  // namespace cpu
}  // namespace densenet_fused
