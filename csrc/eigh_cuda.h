// C interface of the CUDA batched eigensolver (eigh_cuda.cu), free of CUDA and torch
// types so that eigh.cpp can include it in CPU-only builds too.
#pragma once

#include <stddef.h>
#include <stdint.h>

// Returned when a matrix and its eigenvectors do not fit in one block's shared memory.
constexpr int kPodiffJacobiTooLarge = -1;

// Shared memory one block needs for an n×n matrix with `threads` threads: A and V,
// the round's rotations (c, s, p, q) and a reduction scratch, all in double (the
// working precision for every input dtype). About n ≤ 118 fits in 227 KB (H100).
inline size_t podiff_jacobi_smem_bytes(int n, int threads) {
  const size_t half = static_cast<size_t>((n + 1) / 2);
  return sizeof(double) * (2 * static_cast<size_t>(n) * n + 2 * half + threads) + sizeof(int) * 2 * half + 16;
}

// a [batch, n, n] symmetric (row-major, device memory) -> w [batch, n] descending,
// v [batch, n, n] eigenvectors in columns. Returns 0 (cudaSuccess), a cudaError_t
// value, or kPodiffJacobiTooLarge. `stream` is a cudaStream_t.
int podiff_jacobi_eigh_cuda_f32(const float* a, float* w, float* v, int64_t batch, int n, void* stream);
int podiff_jacobi_eigh_cuda_f64(const double* a, double* w, double* v, int64_t batch, int n, void* stream);
