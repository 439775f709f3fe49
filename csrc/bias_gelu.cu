// Fused bias + tanh-GELU, forward and backward, for fp32 / fp16 / bf16 tensors (fp32 math).
//
// Plain CUDA: includes only CUDA headers and exports extern "C" launchers that take raw pointers and a
// cudaStream_t, so nvcc compiles it without torch headers (a CPU-only machine can compile-check it) and the
// torch binding lives in cuda_kernels_binding.cpp.
//
//   y  = gelu_tanh(x + bias)                   gelu_tanh(v) = 0.5·v·(1 + tanh(k0·(v + k1·v³)))
//   dx = dy · gelu_tanh'(x + bias)             k0 = sqrt(2/π), k1 = 0.044715
//
// Layout: x, y, dy, dx are contiguous [rows, cols]; bias is [cols] (nullptr = no bias). dbias = Σ_rows dx is
// left to the caller (a column reduction torch does well). dtype codes: 0 = fp32, 1 = fp16, 2 = bf16.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "cuda_dtype.cuh"

namespace {

constexpr float kSqrt2OverPi = 0.7978845608028654f;
constexpr float kCoeff = 0.044715f;

using megaocto_cuda::from_float;
using megaocto_cuda::to_float;

// Grid-stride loop over all rows·cols elements; the column (for the bias) is the index modulo cols.
template <typename T>
__global__ void bias_gelu_fwd_kernel(const T* __restrict__ x, const T* __restrict__ bias, T* __restrict__ y,
                                     int64_t n, int64_t cols) {
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    float v = to_float(x[i]);
    if (bias != nullptr) v += to_float(bias[i % cols]);
    const float t = tanhf(kSqrt2OverPi * (v + kCoeff * v * v * v));
    y[i] = from_float<T>(0.5f * v * (1.0f + t));
  }
}

template <typename T>
__global__ void bias_gelu_bwd_kernel(const T* __restrict__ dy, const T* __restrict__ x, const T* __restrict__ bias,
                                     T* __restrict__ dx, int64_t n, int64_t cols) {
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    float v = to_float(x[i]);
    if (bias != nullptr) v += to_float(bias[i % cols]);
    const float t = tanhf(kSqrt2OverPi * (v + kCoeff * v * v * v));
    // d/dv [0.5 v (1 + t)] = 0.5 (1 + t) + 0.5 v (1 - t²) k0 (1 + 3 k1 v²)
    const float grad = 0.5f * (1.0f + t) + 0.5f * v * (1.0f - t * t) * kSqrt2OverPi * (1.0f + 3.0f * kCoeff * v * v);
    dx[i] = from_float<T>(to_float(dy[i]) * grad);
  }
}

// Enough blocks to fill the GPU without one thread per element for huge tensors (grid-stride covers the rest).
inline unsigned int num_blocks(int64_t n, int threads) {
  const int64_t blocks = (n + threads - 1) / threads;
  return static_cast<unsigned int>(blocks < 65536 ? (blocks > 0 ? blocks : 1) : 65536);
}

template <typename T>
cudaError_t launch_fwd(const void* x, const void* bias, void* y, int64_t rows, int64_t cols, cudaStream_t stream) {
  const int64_t n = rows * cols;
  if (n == 0) return cudaSuccess;
  constexpr int kThreads = 256;
  bias_gelu_fwd_kernel<T><<<num_blocks(n, kThreads), kThreads, 0, stream>>>(
      static_cast<const T*>(x), static_cast<const T*>(bias), static_cast<T*>(y), n, cols);
  return cudaGetLastError();
}

template <typename T>
cudaError_t launch_bwd(const void* dy, const void* x, const void* bias, void* dx, int64_t rows, int64_t cols,
                       cudaStream_t stream) {
  const int64_t n = rows * cols;
  if (n == 0) return cudaSuccess;
  constexpr int kThreads = 256;
  bias_gelu_bwd_kernel<T><<<num_blocks(n, kThreads), kThreads, 0, stream>>>(
      static_cast<const T*>(dy), static_cast<const T*>(x), static_cast<const T*>(bias), static_cast<T*>(dx), n, cols);
  return cudaGetLastError();
}

}  // namespace

// y = gelu_tanh(x + bias); bias may be nullptr. Returns cudaErrorInvalidValue for an unknown dtype code.
extern "C" cudaError_t megaocto_bias_gelu_fwd(const void* x, const void* bias, void* y, int64_t rows, int64_t cols,
                                              int dtype, cudaStream_t stream) {
  switch (dtype) {
    case 0: return launch_fwd<float>(x, bias, y, rows, cols, stream);
    case 1: return launch_fwd<__half>(x, bias, y, rows, cols, stream);
    case 2: return launch_fwd<__nv_bfloat16>(x, bias, y, rows, cols, stream);
    default: return cudaErrorInvalidValue;
  }
}

// dx = dy · gelu_tanh'(x + bias); bias may be nullptr. Returns cudaErrorInvalidValue for an unknown dtype code.
extern "C" cudaError_t megaocto_bias_gelu_bwd(const void* dy, const void* x, const void* bias, void* dx, int64_t rows,
                                              int64_t cols, int dtype, cudaStream_t stream) {
  switch (dtype) {
    case 0: return launch_bwd<float>(dy, x, bias, dx, rows, cols, stream);
    case 1: return launch_bwd<__half>(dy, x, bias, dx, rows, cols, stream);
    case 2: return launch_bwd<__nv_bfloat16>(dy, x, bias, dx, rows, cols, stream);
    default: return cudaErrorInvalidValue;
  }
}
