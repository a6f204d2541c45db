// Declarations of the extension's entry points; module.cpp binds them to Python.
#pragma once

#include <torch/extension.h>

#include <vector>

// patch_ops.cpp — layout: x [B,C,H,W], basis [G,D,R] (G = 1 or L), mean [Gm,D] or none, coeffs [B,L,R].
torch::Tensor patch_encode(torch::Tensor x, torch::Tensor basis, c10::optional<torch::Tensor> mean, int64_t P,
                           int64_t S);
torch::Tensor patch_decode(torch::Tensor coeffs, torch::Tensor basis, c10::optional<torch::Tensor> mean, int64_t H,
                         int64_t W, int64_t P, int64_t S, bool average);
torch::Tensor patch_correlate(torch::Tensor x, torch::Tensor grad, int64_t P, int64_t S, bool local);

// eigh.cpp — a [batch,n,n] symmetric -> {w [batch,n] descending, v [batch,n,n] columns}.
std::vector<torch::Tensor> batched_eigh_cpu(torch::Tensor a, int64_t ql_max_n);
std::vector<torch::Tensor> jacobi_eigh_cpu(torch::Tensor a, bool working_double);
std::vector<torch::Tensor> batched_eigh_cuda(torch::Tensor a);
bool has_cuda_eigh();
int64_t cuda_eigh_max_n(int64_t smem_limit);
