// The Python module of the podiff extension: one binding per entry point.
#include "podiff_ops.h"

#ifndef PODIFF_BUILD_HASH
#define PODIFF_BUILD_HASH "jit"
#endif

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "podiff kernels: patch encode / fold / correlate (CPU), batched symmetric eigensolver (CPU, CUDA)";
  m.attr("BUILD_HASH") = PODIFF_BUILD_HASH;
  m.def("patch_encode", &patch_encode, "x [B,C,H,W], basis [G,D,R], mean [Gm,D]? -> [B,L,R]");
  m.def("patch_decode", &patch_decode, "coeffs [B,L,R], basis [G,D,R], mean? -> [B,C,H,W] (overlap sum or mean)");
  m.def("patch_correlate", &patch_correlate, "x [B,C,H,W], grad [B,L,R] -> [1 or L, D, R]");
  m.def("batched_eigh_cpu", &batched_eigh_cpu, "a [N,n,n], ql_max_n -> (w [N,n] descending, v [N,n,n]); tred2+tql2 up to ql_max_n, else LAPACK per thread");
  m.def("jacobi_eigh_cpu", &jacobi_eigh_cpu, "the CUDA kernel's parallel-order Jacobi, run serially on CPU (working precision double or the input's)");
  m.def("batched_eigh_cuda", &batched_eigh_cuda, "a [N,n,n] CUDA -> (w, v); one block per matrix");
  m.def("has_cuda_eigh", &has_cuda_eigh, "whether the CUDA eigensolver was compiled in");
  m.def("cuda_eigh_max_n", &cuda_eigh_max_n, "largest n the CUDA kernel fits in the given shared memory");
}
