// Parallel-order cyclic Jacobi for one symmetric n×n matrix: the pieces shared by
// the CUDA kernel (eigh_cuda.cu, one thread block per matrix) and its serial CPU
// twin (eigh_cpu.cpp), so the GPU algorithm is exercised on machines without a GPU.
//
// A sweep is m-1 rounds (m = n rounded up to even). Each round pairs every index
// with exactly one other (the circle method), so its m/2 rotations touch disjoint
// rows and columns and can be computed from the same A and applied at once:
// rows first, then columns, then V ← V·J. Every pair meets once per sweep.
// No torch headers: nvcc -c compiles this without them.

#pragma once

#include <math.h>
#include <stdint.h>

#if defined(__CUDACC__)
#define PODIFF_HD __host__ __device__ __forceinline__
#else
#define PODIFF_HD inline
#endif

namespace podiff_jacobi {

// Pair k (0 <= k < m/2) of round r (0 <= r < m-1) in the circle method.
// An index >= n (odd n padded to even) means "sit this round out".
PODIFF_HD void round_pair(int m, int round, int k, int* p, int* q) {
  int a, b;
  if (k == 0) {
    a = m - 1;
    b = round;
  } else {
    a = (round + k) % (m - 1);
    b = (round - k + (m - 1)) % (m - 1);
  }
  *p = a < b ? a : b;
  *q = a < b ? b : a;
}

// Symmetric Schur rotation (Golub & Van Loan, Alg. 8.4.1): with J = [[c, s], [-s, c]]
// on (p, q), (Jᵀ A J)_pq = 0. |t| <= 1 keeps the rotation the small one.
template <typename T>
PODIFF_HD void rotation(T app, T aqq, T apq, T* c, T* s) {
  if (apq == T(0)) {
    *c = T(1);
    *s = T(0);
    return;
  }
  const T tau = (aqq - app) / (T(2) * apq);
  T t;
  if (fabs(tau) > T(1e18)) {
    t = T(0.5) / tau;  // 1 + tau² would overflow; t → 1/(2 tau)
  } else {
    t = (tau >= T(0) ? T(1) : T(-1)) / (fabs(tau) + sqrt(T(1) + tau * tau));
  }
  *c = T(1) / sqrt(T(1) + t * t);
  *s = t * (*c);
}

// Rows p, q of A, column j: A ← Jᵀ A.
template <typename T>
PODIFF_HD void rotate_rows(T* A, int ld, int p, int q, int j, T c, T s) {
  const T ap = A[p * ld + j], aq = A[q * ld + j];
  A[p * ld + j] = c * ap - s * aq;
  A[q * ld + j] = s * ap + c * aq;
}

// Columns p, q of M, row i: M ← M J (for A after its rows, and for V).
template <typename T>
PODIFF_HD void rotate_cols(T* M, int ld, int p, int q, int i, T c, T s) {
  const T mp = M[i * ld + p], mq = M[i * ld + q];
  M[i * ld + p] = c * mp - s * mq;
  M[i * ld + q] = s * mp + c * mq;
}

// Position of eigenvalue i in descending order; ties keep index order, NaN sorts last.
template <typename T>
PODIFF_HD int descending_rank(const T* d, int ld, int n, int i) {
  const T di = d[i * ld];
  int rank = 0;
  for (int j = 0; j < n; ++j) {
    const T dj = d[j * ld];
    if (dj > di || (dj == di && j < i) || (di != di && (dj == dj || j < i))) ++rank;
  }
  return rank;
}

// Entry (i, j) of the symmetric matrix whose lower triangle is stored in a (row-major):
// like LAPACK's UPLO='L', the strict upper triangle is never read.
template <typename T>
PODIFF_HD T lower_entry(const T* a, int n, int i, int j) {
  return i >= j ? a[i * n + j] : a[j * n + i];
}

// Sign convention: column `col` of v (n×n, row-major) flipped so its entry of largest
// magnitude (the first such) is positive. Makes bases identical across backends and runs.
template <typename T>
PODIFF_HD void fix_column_sign(T* v, int n, int col) {
  int arg = 0;
  T best = T(-1);
  for (int row = 0; row < n; ++row) {
    const T mag = fabs(v[row * n + col]);
    if (mag > best) {
      best = mag;
      arg = row;
    }
  }
  if (v[arg * n + col] < T(0))
    for (int row = 0; row < n; ++row) v[row * n + col] = -v[row * n + col];
}

// Sweep budget. Cyclic Jacobi converges quadratically in the end, but with clustered
// eigenvalues (two eigenvalues of multiplicity 16 and 17 at n = 33, tests/test_eigh.py) the
// off-diagonal mass can fall only ~10x per sweep for a while: one such matrix needed 17
// sweeps to reach the stopping rule. 30 leaves room; converged matrices stop early (8-12
// sweeps), and a stopped iteration still leaves V orthogonal (only accuracy suffers).
constexpr int kMaxSweeps = 30;

// Off-diagonal mass small enough to stop, relative to ‖A‖_F²: n·eps² in working precision,
// i.e. ‖off(A)‖_F <= √n·eps·‖A‖_F, at the level of round-off in the rotations themselves.
template <typename T>
PODIFF_HD T converged_off(T frob2, int n, T eps) {
  return frob2 * T(n) * eps * eps;
}

}  // namespace podiff_jacobi
