// CPU patch encode / fold / correlate without a patch matrix in memory.
//
// Layout shared by the three ops (all tensors contiguous):
//   x      [B, C, H, W]
//   basis  [G, D, R]   G = 1 (one basis for all locations) or L (one per location)
//   mean   [Gm, D]     Gm = 1 or L, or an undefined tensor for "no mean"
//   coeffs [B, L, R]
// A patch vector is flattened in (c, ky, kx) order; locations are row-major.
// Parallelism is over independent outputs only (locations, output rows, or
// fixed reduction chunks summed in a fixed order), so results do not depend on
// the number of threads. _Pragma (not #pragma) because the loops sit inside
// AT_DISPATCH macro arguments.

#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <vector>

#include "podiff_ops.h"

namespace {

constexpr int64_t kImages = 4;  // images projected together in encode

struct Grid {
  int64_t C, H, W, P, S, nH, nW, L, D;
  Grid(int64_t C_, int64_t H_, int64_t W_, int64_t P_, int64_t S_)
      : C(C_), H(H_), W(W_), P(P_), S(S_), nH((H_ - P_) / S_ + 1), nW((W_ - P_) / S_ + 1) {
    L = nH * nW;
    D = C * P * P;
  }
};

// Copies patch l of image b into v[D] and subtracts the mean when given.
template <typename T>
inline void gather_patch(const T* x, const Grid& g, int64_t b, int64_t l, const T* mean, T* v) {
  const int64_t oy = (l / g.nW) * g.S, ox = (l % g.nW) * g.S;
  const T* img = x + b * g.C * g.H * g.W;
  int64_t d = 0;
  for (int64_t c = 0; c < g.C; ++c)
    for (int64_t ky = 0; ky < g.P; ++ky) {
      const T* row = img + (c * g.H + oy + ky) * g.W + ox;
      for (int64_t kx = 0; kx < g.P; ++kx, ++d) v[d] = row[kx];
    }
  if (mean != nullptr)
    for (d = 0; d < g.D; ++d) v[d] -= mean[d];
}

void check_inputs(const torch::Tensor& basis, const c10::optional<torch::Tensor>& mean) {
  TORCH_CHECK(basis.dim() == 3, "basis must be [G, D, R], got ", basis.sizes());
  TORCH_CHECK(basis.is_contiguous(), "basis must be contiguous");
  if (mean.has_value()) {
    TORCH_CHECK(mean->dim() == 2 && mean->size(1) == basis.size(1), "mean must be [G, D], got ", mean->sizes());
    TORCH_CHECK(mean->is_contiguous() && mean->scalar_type() == basis.scalar_type(), "mean: contiguous, basis dtype");
  }
}

}  // namespace

torch::Tensor patch_encode(torch::Tensor x, torch::Tensor basis, c10::optional<torch::Tensor> mean, int64_t P,
                     int64_t S) {
  TORCH_CHECK(x.dim() == 4 && x.is_contiguous() && x.device().is_cpu(), "x must be a contiguous CPU [B, C, H, W]");
  check_inputs(basis, mean);
  const int64_t B = x.size(0), R = basis.size(2), G = basis.size(0);
  const Grid g(x.size(1), x.size(2), x.size(3), P, S);
  TORCH_CHECK(basis.size(1) == g.D && (G == 1 || G == g.L), "basis must be [1 or L, D, R]");
  auto out = torch::empty({B, g.L, R}, x.options());
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "podiff_patch_encode", [&] {
    const scalar_t* xp = x.data_ptr<scalar_t>();
    const scalar_t* bp = basis.data_ptr<scalar_t>();
    const scalar_t* mp = mean.has_value() ? mean->data_ptr<scalar_t>() : nullptr;
    const int64_t Gm = mean.has_value() ? mean->size(0) : 1;
    scalar_t* op = out.data_ptr<scalar_t>();
    at::parallel_for(0, g.L, 16, [&](int64_t l0, int64_t l1) {
      std::vector<scalar_t> v(kImages * g.D), acc(kImages * R);
      for (int64_t l = l0; l < l1; ++l) {
        const scalar_t* phi = bp + (G == 1 ? 0 : l) * g.D * R;
        const scalar_t* mu = mp == nullptr ? nullptr : mp + (Gm == 1 ? 0 : l) * g.D;
        // Images in groups of kImages so each basis row is loaded once per group.
        for (int64_t b0 = 0; b0 < B; b0 += kImages) {
          const int64_t nb = std::min<int64_t>(kImages, B - b0);
          for (int64_t i = 0; i < nb; ++i) gather_patch(xp, g, b0 + i, l, mu, v.data() + i * g.D);
          for (int64_t i = 0; i < nb; ++i) std::fill(acc.begin() + i * R, acc.begin() + (i + 1) * R, scalar_t(0));
          for (int64_t d = 0; d < g.D; ++d) {
            const scalar_t* row = phi + d * R;
            for (int64_t i = 0; i < nb; ++i) {
              const scalar_t vd = v[i * g.D + d];
              scalar_t* a = acc.data() + i * R;
_Pragma("omp simd")
              for (int64_t r = 0; r < R; ++r) a[r] += vd * row[r];
            }
          }
          for (int64_t i = 0; i < nb; ++i) std::copy(acc.begin() + i * R, acc.begin() + (i + 1) * R, op + ((b0 + i) * g.L + l) * R);
        }
      }
    });
  });
  return out;
}

// Output-centric: every output pixel gathers the patches covering it; no atomics.
torch::Tensor patch_decode(torch::Tensor coeffs, torch::Tensor basis, c10::optional<torch::Tensor> mean, int64_t H,
                   int64_t W, int64_t P, int64_t S, bool average) {
  TORCH_CHECK(coeffs.dim() == 3 && coeffs.is_contiguous() && coeffs.device().is_cpu(),
              "coeffs must be a contiguous CPU [B, L, R]");
  check_inputs(basis, mean);
  const int64_t B = coeffs.size(0), R = coeffs.size(2), G = basis.size(0), D = basis.size(1);
  TORCH_CHECK(D % (P * P) == 0, "D must be a multiple of P*P");
  const Grid g(D / (P * P), H, W, P, S);
  TORCH_CHECK(coeffs.size(1) == g.L && basis.size(2) == R && (G == 1 || G == g.L), "shape mismatch");
  auto out = torch::empty({B, g.C, H, W}, coeffs.options());
  AT_DISPATCH_FLOATING_TYPES(coeffs.scalar_type(), "podiff_patch_decode", [&] {
    const scalar_t* cp = coeffs.data_ptr<scalar_t>();
    const scalar_t* bp = basis.data_ptr<scalar_t>();
    const scalar_t* mp = mean.has_value() ? mean->data_ptr<scalar_t>() : nullptr;
    const int64_t Gm = mean.has_value() ? mean->size(0) : 1;
    scalar_t* op = out.data_ptr<scalar_t>();
    // Rows (c, y) in parallel, images innermost: each basis row is read once per covering
    // patch, not once per image (the local basis is the largest operand).
    at::parallel_for(0, g.C * H, 1, [&](int64_t row0, int64_t row1) {
      std::vector<scalar_t> acc(B);
      for (int64_t row = row0; row < row1; ++row) {
        const int64_t y = row % H, c = row / H;
        const int64_t oy_hi = std::min(y / S, g.nH - 1);
        const int64_t oy_lo = std::max<int64_t>(0, y - P + S) / S;
        for (int64_t xx = 0; xx < W; ++xx) {
          const int64_t ox_hi = std::min(xx / S, g.nW - 1);
          const int64_t ox_lo = std::max<int64_t>(0, xx - P + S) / S;
          std::fill(acc.begin(), acc.end(), scalar_t(0));
          for (int64_t oy = oy_lo; oy <= oy_hi; ++oy)
            for (int64_t ox = ox_lo; ox <= ox_hi; ++ox) {
              const int64_t l = oy * g.nW + ox;
              const int64_t d = (c * P + (y - oy * S)) * P + (xx - ox * S);
              const scalar_t* phi = bp + ((G == 1 ? 0 : l) * D + d) * R;
              const scalar_t mu = mp == nullptr ? scalar_t(0) : mp[(Gm == 1 ? 0 : l) * D + d];
              for (int64_t b = 0; b < B; ++b) {
                const scalar_t* a = cp + (b * g.L + l) * R;
                scalar_t dot = mu;
                _Pragma("omp simd reduction(+ : dot)")
                for (int64_t r = 0; r < R; ++r) dot += a[r] * phi[r];
                acc[b] += dot;
              }
            }
          const scalar_t scale = average ? scalar_t(1) / scalar_t((oy_hi - oy_lo + 1) * (ox_hi - ox_lo + 1))
                                         : scalar_t(1);
          for (int64_t b = 0; b < B; ++b) op[((b * g.C + c) * H + y) * W + xx] = acc[b] * scale;
        }
      }
    });
  });
  return out;
}

// sum over rows of patch(x) ⊗ grad: [1, D, R] (pooled over b and l) or [L, D, R] (pooled over b).
torch::Tensor patch_correlate(torch::Tensor x, torch::Tensor grad, int64_t P, int64_t S, bool local) {
  TORCH_CHECK(x.dim() == 4 && x.is_contiguous() && x.device().is_cpu(), "x must be a contiguous CPU [B, C, H, W]");
  TORCH_CHECK(grad.dim() == 3 && grad.is_contiguous() && grad.scalar_type() == x.scalar_type(),
              "grad must be a contiguous [B, L, R] of x's dtype");
  const int64_t B = x.size(0), R = grad.size(2);
  const Grid g(x.size(1), x.size(2), x.size(3), P, S);
  TORCH_CHECK(grad.size(0) == B && grad.size(1) == g.L, "grad must be [B, L, R]");
  auto out = torch::zeros({local ? g.L : 1, g.D, R}, x.options());
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "podiff_patch_correlate", [&] {
    const scalar_t* xp = x.data_ptr<scalar_t>();
    const scalar_t* gp = grad.data_ptr<scalar_t>();
    scalar_t* op = out.data_ptr<scalar_t>();
    auto accumulate = [&](int64_t b, int64_t l, scalar_t* v, scalar_t* dst) {
      gather_patch<scalar_t>(xp, g, b, l, nullptr, v);
      const scalar_t* gr = gp + (b * g.L + l) * R;
      for (int64_t d = 0; d < g.D; ++d) {
        const scalar_t vd = v[d];
        scalar_t* row = dst + d * R;
_Pragma("omp simd")
        for (int64_t r = 0; r < R; ++r) row[r] += vd * gr[r];
      }
    };
    if (local) {
      at::parallel_for(0, g.L, 16, [&](int64_t l0, int64_t l1) {
        std::vector<scalar_t> v(g.D);
        for (int64_t l = l0; l < l1; ++l)
          for (int64_t b = 0; b < B; ++b) accumulate(b, l, v.data(), op + l * g.D * R);
      });
    } else {
      // A fixed number of chunks, summed in order: deterministic for any thread count.
      const int64_t rows = B * g.L, chunks = std::min<int64_t>(64, rows);
      std::vector<scalar_t> partial(chunks * g.D * R, scalar_t(0));
      at::parallel_for(0, chunks, 1, [&](int64_t k0, int64_t k1) {
        std::vector<scalar_t> v(g.D);
        for (int64_t k = k0; k < k1; ++k)
          for (int64_t m = k * rows / chunks; m < (k + 1) * rows / chunks; ++m)
            accumulate(m / g.L, m % g.L, v.data(), partial.data() + k * g.D * R);
      });
      for (int64_t k = 0; k < chunks; ++k)
        for (int64_t i = 0; i < g.D * R; ++i) op[i] += partial[k * g.D * R + i];
    }
  });
  return out;
}
