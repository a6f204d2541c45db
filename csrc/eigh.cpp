// Batched symmetric eigensolver: torch-facing wrapper, the CPU solver, and the
// serial CPU twin of the CUDA Jacobi kernel.
//
// CPU, parallel over the batch (torch.linalg.eigh on CPU runs a batch through LAPACK
// one matrix at a time on one core; small matrices cannot use more, the batch can):
//  - n <= ql_max_n: Householder tridiagonalisation + implicit QL (tred2/tql2 of
//    EISPACK, as in JAMA), in double for every input dtype, one matrix per task;
//  - larger n: LAPACK syevd through ATen, one contiguous chunk of the batch per thread.
// Eigenvalues are returned descending with eigenvectors in the matching columns.

#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <atomic>
#include <limits>
#include <cfloat>
#include <cmath>
#include <numeric>
#include <vector>

#include "eigh_cuda.h"
#include "jacobi.h"
#include "podiff_ops.h"

#ifdef PODIFF_WITH_CUDA
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#endif

namespace {

// Householder reduction of the symmetric V (n×n, row-major, overwritten with the
// orthogonal transform) to tridiagonal form: diagonal d, sub-diagonal e.
void tred2(int n, double* V, double* d, double* e) {
  auto v = [&](int i, int j) -> double& { return V[i * n + j]; };
  for (int j = 0; j < n; ++j) d[j] = v(n - 1, j);
  for (int i = n - 1; i > 0; --i) {
    double scale = 0.0, h = 0.0;
    for (int k = 0; k < i; ++k) scale += std::fabs(d[k]);
    if (scale == 0.0) {
      e[i] = d[i - 1];
      for (int j = 0; j < i; ++j) {
        d[j] = v(i - 1, j);
        v(i, j) = 0.0;
        v(j, i) = 0.0;
      }
    } else {
      for (int k = 0; k < i; ++k) {
        d[k] /= scale;
        h += d[k] * d[k];
      }
      double f = d[i - 1];
      double g = std::sqrt(h);
      if (f > 0) g = -g;
      e[i] = scale * g;
      h -= f * g;
      d[i - 1] = f - g;
      for (int j = 0; j < i; ++j) e[j] = 0.0;
      for (int j = 0; j < i; ++j) {
        f = d[j];
        v(j, i) = f;
        g = e[j] + v(j, j) * f;
        for (int k = j + 1; k <= i - 1; ++k) {
          g += v(k, j) * d[k];
          e[k] += v(k, j) * f;
        }
        e[j] = g;
      }
      f = 0.0;
      for (int j = 0; j < i; ++j) {
        e[j] /= h;
        f += e[j] * d[j];
      }
      const double hh = f / (h + h);
      for (int j = 0; j < i; ++j) e[j] -= hh * d[j];
      for (int j = 0; j < i; ++j) {
        f = d[j];
        g = e[j];
        for (int k = j; k <= i - 1; ++k) v(k, j) -= (f * e[k] + g * d[k]);
        d[j] = v(i - 1, j);
        v(i, j) = 0.0;
      }
    }
    d[i] = h;
  }
  for (int i = 0; i < n - 1; ++i) {  // accumulate the transformations
    v(n - 1, i) = v(i, i);
    v(i, i) = 1.0;
    const double h = d[i + 1];
    if (h != 0.0) {
      for (int k = 0; k <= i; ++k) d[k] = v(k, i + 1) / h;
      for (int j = 0; j <= i; ++j) {
        double g = 0.0;
        for (int k = 0; k <= i; ++k) g += v(k, i + 1) * v(k, j);
        for (int k = 0; k <= i; ++k) v(k, j) -= g * d[k];
      }
    }
    for (int k = 0; k <= i; ++k) v(k, i + 1) = 0.0;
  }
  for (int j = 0; j < n; ++j) {
    d[j] = v(n - 1, j);
    v(n - 1, j) = 0.0;
  }
  v(n - 1, n - 1) = 1.0;
  e[0] = 0.0;
}

// Implicit QL on the tridiagonal (d, e). W holds the transform TRANSPOSED (row k is
// column k of V), so each Givens rotation touches two contiguous rows.
// Returns false if an eigenvalue did not converge in 60 iterations.
bool tql2(int n, double* W, double* d, double* e) {
  for (int i = 1; i < n; ++i) e[i - 1] = e[i];
  e[n - 1] = 0.0;
  double f = 0.0, tst1 = 0.0;
  const double eps = DBL_EPSILON;
  for (int l = 0; l < n; ++l) {
    tst1 = std::max(tst1, std::fabs(d[l]) + std::fabs(e[l]));
    int m = l;
    while (m < n - 1 && !(std::fabs(e[m]) <= eps * tst1)) ++m;
    if (m > l) {
      int iter = 0;
      do {
        if (++iter > 60) return false;
        double g = d[l];
        double p = (d[l + 1] - g) / (2.0 * e[l]);
        double r = std::hypot(p, 1.0);
        if (p < 0) r = -r;
        d[l] = e[l] / (p + r);
        d[l + 1] = e[l] * (p + r);
        const double dl1 = d[l + 1];
        double h = g - d[l];
        for (int i = l + 2; i < n; ++i) d[i] -= h;
        f += h;
        p = d[m];
        double c = 1.0, c2 = 1.0, c3 = 1.0, s = 0.0, s2 = 0.0;
        const double el1 = e[l + 1];
        for (int i = m - 1; i >= l; --i) {
          c3 = c2;
          c2 = c;
          s2 = s;
          g = c * e[i];
          h = c * p;
          r = std::hypot(p, e[i]);
          e[i + 1] = s * r;
          s = e[i] / r;
          c = p / r;
          p = c * d[i] - s * g;
          d[i + 1] = h + s * (c * g + s * d[i]);
          double* wi = W + static_cast<int64_t>(i) * n;
          double* wi1 = wi + n;
          for (int k = 0; k < n; ++k) {
            const double hk = wi1[k];
            wi1[k] = s * wi[k] + c * hk;
            wi[k] = c * wi[k] - s * hk;
          }
        }
        p = -s * s2 * c3 * el1 * e[l] / dl1;
        e[l] = s * p;
        d[l] = c * p;
      } while (std::fabs(e[l]) > eps * tst1);
    }
    d[l] += f;
    e[l] = 0.0;
  }
  return true;
}

// The sign convention of podiff_jacobi::fix_column_sign, for a vector stored contiguously.
void fix_row_sign(double* w, int n) {
  int arg = 0;
  for (int k = 1; k < n; ++k)
    if (std::fabs(w[k]) > std::fabs(w[arg])) arg = k;
  if (w[arg] < 0)
    for (int k = 0; k < n; ++k) w[k] = -w[k];
}

// One matrix: a (lower triangle of n×n) -> w descending, v eigenvectors in columns.
template <typename T>
bool eigh_one_ql(const T* a, T* w, T* v, int n, std::vector<double>& V, std::vector<double>& Wt,
                 std::vector<double>& d, std::vector<double>& e) {
  for (int i = 0; i < n; ++i)
    for (int j = 0; j < n; ++j) V[i * n + j] = static_cast<double>(podiff_jacobi::lower_entry(a, n, i, j));
  tred2(n, V.data(), d.data(), e.data());
  for (int i = 0; i < n; ++i)
    for (int j = 0; j < n; ++j) Wt[j * n + i] = V[i * n + j];
  const bool ok = tql2(n, Wt.data(), d.data(), e.data());
  for (int i = 0; i < n; ++i) fix_row_sign(Wt.data() + i * n, n);  // row i of Wt is eigenvector i
  for (int i = 0; i < n; ++i) {
    const int rank = podiff_jacobi::descending_rank(d.data(), 1, n, i);
    w[rank] = static_cast<T>(d[i]);
    for (int row = 0; row < n; ++row) v[row * n + rank] = static_cast<T>(Wt[i * n + row]);
  }
  return ok;
}

// The CUDA kernel's algorithm, one "thread" at a time: same pairing, rotations, update
// order, stopping rule, and the same working precision T (double in the kernel).
template <typename T, typename IO>
void eigh_one_jacobi(const IO* a, IO* w, IO* v, int n, T eps, std::vector<T>& A, std::vector<T>& V,
                     std::vector<T>& cs, std::vector<T>& sn, std::vector<int>& pp, std::vector<int>& qq) {
  using namespace podiff_jacobi;
  const int m = n + (n & 1), half = m / 2, nn = n * n;
  T frob2 = T(0);
  for (int i = 0; i < nn; ++i) {
    A[i] = static_cast<T>(lower_entry(a, n, i / n, i % n));
    V[i] = (i / n == i % n) ? T(1) : T(0);
    frob2 += A[i] * A[i];
  }
  const T stop = converged_off(frob2, n, eps);
  for (int sweep = 0; sweep < kMaxSweeps; ++sweep) {
    T off = T(0);
    for (int i = 0; i < nn; ++i)
      if (i / n != i % n) off += A[i] * A[i];
    if (!(off > stop)) break;
    for (int round = 0; round < m - 1; ++round) {
      for (int k = 0; k < half; ++k) {
        int p, q;
        round_pair(m, round, k, &p, &q);
        T c = T(1), s = T(0);
        if (q < n) rotation(A[p * n + p], A[q * n + q], A[p * n + q], &c, &s);
        pp[k] = q < n ? p : -1;
        qq[k] = q;
        cs[k] = c;
        sn[k] = s;
      }
      for (int idx = 0; idx < half * n; ++idx) {
        const int k = idx / n;
        if (pp[k] >= 0 && sn[k] != T(0)) rotate_rows(A.data(), n, pp[k], qq[k], idx % n, cs[k], sn[k]);
      }
      for (int idx = 0; idx < half * n; ++idx) {
        const int k = idx / n;
        if (pp[k] >= 0 && sn[k] != T(0)) {
          rotate_cols(A.data(), n, pp[k], qq[k], idx % n, cs[k], sn[k]);
          rotate_cols(V.data(), n, pp[k], qq[k], idx % n, cs[k], sn[k]);
        }
      }
      for (int k = 0; k < half; ++k)
        if (pp[k] >= 0 && sn[k] != T(0)) A[pp[k] * n + qq[k]] = A[qq[k] * n + pp[k]] = T(0);
    }
  }
  for (int i = 0; i < n; ++i) fix_column_sign(V.data(), n, i);
  for (int i = 0; i < n; ++i) {
    const int rank = descending_rank(A.data(), n + 1, n, i);
    w[rank] = static_cast<IO>(A[i * n + i]);
    for (int row = 0; row < n; ++row) v[row * n + rank] = static_cast<IO>(V[row * n + i]);
  }
}

void check_square(const torch::Tensor& a) {
  TORCH_CHECK(a.dim() == 3 && a.size(1) == a.size(2), "a must be [batch, n, n], got ", a.sizes());
  TORCH_CHECK(a.is_contiguous(), "a must be contiguous");
  TORCH_CHECK(a.scalar_type() == torch::kFloat || a.scalar_type() == torch::kDouble,
              "a must be float32 or float64, got ", a.scalar_type());
  TORCH_CHECK(a.size(1) <= 4096, "n must be at most 4096, got ", a.size(1));
}

}  // namespace

std::vector<torch::Tensor> batched_eigh_cpu(torch::Tensor a, int64_t ql_max_n) {
  check_square(a);
  TORCH_CHECK(a.device().is_cpu(), "batched_eigh_cpu needs a CPU tensor");
  const int64_t batch = a.size(0);
  const int n = static_cast<int>(a.size(1));
  auto w = torch::empty({batch, n}, a.options());
  auto v = torch::empty({batch, n, n}, a.options());
  if (batch == 0 || n == 0) return {w, v};
  if (n > ql_max_n) {
    // LAPACK (syevd, through ATen) on one contiguous chunk of the batch per thread: ATen
    // runs a batch through LAPACK one matrix at a time on one core; the chunks use them all.
    at::parallel_for(0, batch, 1, [&](int64_t b0, int64_t b1) {
      auto [values, vectors] = at::linalg_eigh(a.slice(0, b0, b1));  // reads the lower triangle
      w.slice(0, b0, b1).copy_(values.flip(-1));
      auto out = v.slice(0, b0, b1);
      out.copy_(vectors.flip(-1));
      AT_DISPATCH_FLOATING_TYPES(a.scalar_type(), "podiff_eigh_signs", [&] {
        scalar_t* vp = out.data_ptr<scalar_t>();
        for (int64_t b = 0; b < b1 - b0; ++b)
          for (int col = 0; col < n; ++col) podiff_jacobi::fix_column_sign(vp + b * n * n, n, col);
      });
    });
    return {w, v};
  }
  std::atomic<int64_t> failed{-1};
  AT_DISPATCH_FLOATING_TYPES(a.scalar_type(), "podiff_batched_eigh_cpu", [&] {
    const scalar_t* ap = a.data_ptr<scalar_t>();
    scalar_t* wp = w.data_ptr<scalar_t>();
    scalar_t* vp = v.data_ptr<scalar_t>();
    at::parallel_for(0, batch, 1, [&](int64_t b0, int64_t b1) {
      std::vector<double> V(n * n), Wt(n * n), d(n), e(n);
      for (int64_t b = b0; b < b1; ++b)
        if (!eigh_one_ql(ap + b * n * n, wp + b * n, vp + b * n * n, n, V, Wt, d, e)) failed = b;
    });
  });
  TORCH_CHECK(failed.load() < 0, "batched_eigh: QL iteration did not converge for matrix ", failed.load(),
              " (non-finite entries?)");
  return {w, v};
}

std::vector<torch::Tensor> jacobi_eigh_cpu(torch::Tensor a, bool working_double) {
  check_square(a);
  TORCH_CHECK(a.device().is_cpu(), "jacobi_eigh_cpu needs a CPU tensor");
  const int64_t batch = a.size(0);
  const int n = static_cast<int>(a.size(1));
  auto w = torch::empty({batch, n}, a.options());
  auto v = torch::empty({batch, n, n}, a.options());
  if (batch == 0 || n == 0) return {w, v};
  AT_DISPATCH_FLOATING_TYPES(a.scalar_type(), "podiff_jacobi_eigh_cpu", [&] {
    const scalar_t* ap = a.data_ptr<scalar_t>();
    scalar_t* wp = w.data_ptr<scalar_t>();
    scalar_t* vp = v.data_ptr<scalar_t>();
    auto run = [&](auto zero) {
      using T = decltype(zero);
      const T eps = std::numeric_limits<T>::epsilon();
      at::parallel_for(0, batch, 1, [&](int64_t b0, int64_t b1) {
        const int half = (n + 1) / 2;
        std::vector<T> A(n * n), V(n * n), cs(half), sn(half);
        std::vector<int> pp(half), qq(half);
        for (int64_t b = b0; b < b1; ++b)
          eigh_one_jacobi<T, scalar_t>(ap + b * n * n, wp + b * n, vp + b * n * n, n, eps, A, V, cs, sn, pp, qq);
      });
    };
    if (working_double) run(0.0); else run(scalar_t(0));
  });
  return {w, v};
}

bool has_cuda_eigh() {
#ifdef PODIFF_WITH_CUDA
  return true;
#else
  return false;
#endif
}

std::vector<torch::Tensor> batched_eigh_cuda(torch::Tensor a) {
  check_square(a);
#ifdef PODIFF_WITH_CUDA
  TORCH_CHECK(a.is_cuda(), "batched_eigh_cuda needs a CUDA tensor");
  const c10::cuda::CUDAGuard guard(a.device());
  const int64_t batch = a.size(0);
  const int n = static_cast<int>(a.size(1));
  auto w = torch::empty({batch, n}, a.options());
  auto v = torch::empty({batch, n, n}, a.options());
  if (batch == 0 || n == 0) return {w, v};
  void* stream = c10::cuda::getCurrentCUDAStream().stream();
  const int rc = a.scalar_type() == torch::kFloat
      ? podiff_jacobi_eigh_cuda_f32(a.data_ptr<float>(), w.data_ptr<float>(), v.data_ptr<float>(), batch, n, stream)
      : podiff_jacobi_eigh_cuda_f64(a.data_ptr<double>(), w.data_ptr<double>(), v.data_ptr<double>(), batch, n,
                                    stream);
  TORCH_CHECK(rc != kPodiffJacobiTooLarge, "batched_eigh_cuda: n = ", n,
              " does not fit in one block's shared memory for ", a.scalar_type());
  TORCH_CHECK(rc == 0, "batched_eigh_cuda: CUDA error ", rc);
  return {w, v};
#else
  TORCH_CHECK(false, "the podiff extension was built without CUDA");
  return {a, a};
#endif
}

int64_t cuda_eigh_max_n(int64_t smem_limit) {
  // Largest n whose block fits in `smem_limit` bytes (for the dispatcher's choice).
  int64_t n = 0;
  while (n < 1024 && podiff_jacobi_smem_bytes(static_cast<int>(n + 1), 256) <=
                         static_cast<size_t>(smem_limit))
    ++n;
  return n;
}
