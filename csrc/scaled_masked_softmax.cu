// Scaled masked softmax over the last dim of attention scores, forward and backward (fp32 math), for
// fp32 / fp16 / bf16 — the non-flash attention path's softmax, without materialising scale·x or the mask fill.
//
// Plain CUDA with extern "C" launchers (raw pointers + cudaStream_t); the torch binding is
// cuda_kernels_binding.cpp. dtype codes: 0 = fp32, 1 = fp16, 2 = bf16.
//
// Forward, per row r of x [batch, heads, sq, sk] (contiguous; q = r mod sq, b = r / (heads·sq)):
//   masked(j) = mask[b, 0, q, j] != 0 (mask: uint8/bool [mask_batch, 1, sq, sk], mask_batch 1 broadcasts; nullptr
//               = no mask), or j > q when causal (top-left aligned: key j <= query q, as SDPA's is_causal,
//               megaocto.model.attention.segment_mask and the Triton softmax; for sq == sk the usual causal mask)
//   y[j] = exp(scale·x[j] − m) / Σ_k exp(scale·x[k] − m) over unmasked j, m = max over unmasked; masked j -> 0.
//   A row with every column masked gives all zeros (no NaN).
// Backward (y from forward): dx[j] = scale · y[j] · (dy[j] − Σ_k dy[k]·y[k]).
//
// One warp per row; lanes stride over the columns (any sk), values are re-read instead of cached in
// registers, so there is no upper limit on sk.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "cuda_dtype.cuh"

namespace {

constexpr int kWarp = 32;
constexpr int kRowsPerBlock = 4;  // warps per block

using megaocto_cuda::from_float;
using megaocto_cuda::to_float;

__device__ __forceinline__ float warp_max(float v) {
  for (int offset = kWarp / 2; offset > 0; offset /= 2) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, offset));
  return v;
}

__device__ __forceinline__ float warp_sum(float v) {
  for (int offset = kWarp / 2; offset > 0; offset /= 2) v += __shfl_xor_sync(0xffffffffu, v, offset);
  return v;
}

template <typename T>
__global__ void softmax_fwd_kernel(const T* __restrict__ x, const uint8_t* __restrict__ mask, T* __restrict__ y,
                                   int64_t rows, int64_t heads, int64_t sq, int64_t sk, int64_t mask_batch_stride,
                                   float scale, bool causal) {
  const int64_t row = blockIdx.x * static_cast<int64_t>(kRowsPerBlock) + threadIdx.y;
  if (row >= rows) return;  // whole warp leaves together: the shuffles below stay full-warp
  const int lane = threadIdx.x;
  const int64_t q = row % sq;
  const int64_t b = row / (heads * sq);
  const T* xr = x + row * sk;
  T* yr = y + row * sk;
  const uint8_t* mr = mask != nullptr ? mask + b * mask_batch_stride + q * sk : nullptr;
  const int64_t last = causal ? q : sk - 1;  // last unmasked column by causality (top-left: key <= query)

  auto visible = [&](int64_t j) { return j <= last && (mr == nullptr || mr[j] == 0); };

  float m = -INFINITY;
  for (int64_t j = lane; j < sk; j += kWarp)
    if (visible(j)) m = fmaxf(m, scale * to_float(xr[j]));
  m = warp_max(m);

  float sum = 0.0f;
  if (m != -INFINITY)
    for (int64_t j = lane; j < sk; j += kWarp)
      if (visible(j)) sum += __expf(scale * to_float(xr[j]) - m);
  sum = warp_sum(sum);

  const float inv = sum > 0.0f ? 1.0f / sum : 0.0f;  // fully masked row: all zeros
  for (int64_t j = lane; j < sk; j += kWarp) {
    const float p = visible(j) && inv > 0.0f ? __expf(scale * to_float(xr[j]) - m) * inv : 0.0f;
    yr[j] = from_float<T>(p);
  }
}

template <typename T>
__global__ void softmax_bwd_kernel(const T* __restrict__ dy, const T* __restrict__ y, T* __restrict__ dx,
                                   int64_t rows, int64_t sk, float scale) {
  const int64_t row = blockIdx.x * static_cast<int64_t>(kRowsPerBlock) + threadIdx.y;
  if (row >= rows) return;
  const int lane = threadIdx.x;
  const T* dyr = dy + row * sk;
  const T* yr = y + row * sk;
  T* dxr = dx + row * sk;
  float dot = 0.0f;
  for (int64_t j = lane; j < sk; j += kWarp) dot += to_float(dyr[j]) * to_float(yr[j]);
  dot = warp_sum(dot);
  for (int64_t j = lane; j < sk; j += kWarp) {
    const float yj = to_float(yr[j]);
    dxr[j] = from_float<T>(scale * yj * (to_float(dyr[j]) - dot));
  }
}

inline dim3 grid_for(int64_t rows) {
  return dim3(static_cast<unsigned int>((rows + kRowsPerBlock - 1) / kRowsPerBlock));
}

template <typename T>
cudaError_t launch_fwd(const void* x, const uint8_t* mask, void* y, int64_t batch, int64_t heads, int64_t sq,
                       int64_t sk, int64_t mask_batch, float scale, bool causal, cudaStream_t stream) {
  const int64_t rows = batch * heads * sq;
  if (rows == 0 || sk == 0) return cudaSuccess;
  const int64_t mask_batch_stride = mask_batch == 1 ? 0 : sq * sk;
  softmax_fwd_kernel<T><<<grid_for(rows), dim3(kWarp, kRowsPerBlock), 0, stream>>>(
      static_cast<const T*>(x), mask, static_cast<T*>(y), rows, heads, sq, sk, mask_batch_stride, scale, causal);
  return cudaGetLastError();
}

template <typename T>
cudaError_t launch_bwd(const void* dy, const void* y, void* dx, int64_t rows, int64_t sk, float scale,
                       cudaStream_t stream) {
  if (rows == 0 || sk == 0) return cudaSuccess;
  softmax_bwd_kernel<T><<<grid_for(rows), dim3(kWarp, kRowsPerBlock), 0, stream>>>(
      static_cast<const T*>(dy), static_cast<const T*>(y), static_cast<T*>(dx), rows, sk, scale);
  return cudaGetLastError();
}

}  // namespace

// Forward (see the file comment). mask: nullptr or uint8 [mask_batch, 1, sq, sk] with mask_batch 1 or batch.
extern "C" cudaError_t megaocto_scaled_masked_softmax_fwd(const void* x, const uint8_t* mask, void* y, int64_t batch,
                                                          int64_t heads, int64_t sq, int64_t sk, int64_t mask_batch,
                                                          float scale, int causal, int dtype, cudaStream_t stream) {
  if (mask != nullptr && mask_batch != 1 && mask_batch != batch) return cudaErrorInvalidValue;
  switch (dtype) {
    case 0: return launch_fwd<float>(x, mask, y, batch, heads, sq, sk, mask_batch, scale, causal != 0, stream);
    case 1: return launch_fwd<__half>(x, mask, y, batch, heads, sq, sk, mask_batch, scale, causal != 0, stream);
    case 2: return launch_fwd<__nv_bfloat16>(x, mask, y, batch, heads, sq, sk, mask_batch, scale, causal != 0, stream);
    default: return cudaErrorInvalidValue;
  }
}

// Backward over rows = batch·heads·sq rows of sk columns: dx = scale · y · (dy − Σ dy·y).
extern "C" cudaError_t megaocto_scaled_masked_softmax_bwd(const void* dy, const void* y, void* dx, int64_t rows,
                                                          int64_t sk, float scale, int dtype, cudaStream_t stream) {
  switch (dtype) {
    case 0: return launch_bwd<float>(dy, y, dx, rows, sk, scale, stream);
    case 1: return launch_bwd<__half>(dy, y, dx, rows, sk, scale, stream);
    case 2: return launch_bwd<__nv_bfloat16>(dy, y, dx, rows, sk, scale, stream);
    default: return cudaErrorInvalidValue;
  }
}
