// megaocto._cuda_kernels: thin torch binding of the extern "C" launchers in bias_gelu.cu and
// scaled_masked_softmax.cu.
//
// Only <torch/extension.h> and the CUDA runtime header are included — no ATen/cuda or c10/cuda headers — so this
// file compiles against a CPU torch too (compile checks in CI) and the module even imports without a GPU. The
// caller passes the CUDA stream as an integer (torch.cuda.current_stream().cuda_stream) and makes the tensors'
// device current (megaocto/kernels/cuda.py does both). Every entry point checks is_cuda, contiguity, dtype and
// shapes with TORCH_CHECK (a Python RuntimeError naming the argument), and raises on any CUDA launch error.
#include <cuda_runtime_api.h>
#include <torch/extension.h>

#include <cstdint>

extern "C" {
cudaError_t megaocto_bias_gelu_fwd(const void* x, const void* bias, void* y, int64_t rows, int64_t cols, int dtype,
                                   cudaStream_t stream);
cudaError_t megaocto_bias_gelu_bwd(const void* dy, const void* x, const void* bias, void* dx, int64_t rows,
                                   int64_t cols, int dtype, cudaStream_t stream);
cudaError_t megaocto_scaled_masked_softmax_fwd(const void* x, const uint8_t* mask, void* y, int64_t batch,
                                               int64_t heads, int64_t sq, int64_t sk, int64_t mask_batch, float scale,
                                               int causal, int dtype, cudaStream_t stream);
cudaError_t megaocto_scaled_masked_softmax_bwd(const void* dy, const void* y, void* dx, int64_t rows, int64_t sk,
                                               float scale, int dtype, cudaStream_t stream);
}

namespace {

// The dtype codes the .cu launchers switch on.
int dtype_code(const torch::Tensor& t, const char* name) {
  switch (t.scalar_type()) {
    case torch::kFloat32: return 0;
    case torch::kFloat16: return 1;
    case torch::kBFloat16: return 2;
    default: TORCH_CHECK(false, name, " must be float32, float16 or bfloat16 (got ", t.scalar_type(), ")");
  }
  return -1;
}

void check_cuda(const torch::Tensor& t, const char* name) {
  TORCH_CHECK(t.is_cuda(), name, " must be a CUDA tensor (got device ", t.device(), "); megaocto._cuda_kernels "
              "runs on GPUs only, use the torch or Triton kernels elsewhere");
  TORCH_CHECK(t.is_contiguous(), name, " must be contiguous");
}

void check_same(const torch::Tensor& a, const char* an, const torch::Tensor& b, const char* bn) {
  TORCH_CHECK(a.device() == b.device(), an, " and ", bn, " must be on the same device");
  TORCH_CHECK(a.scalar_type() == b.scalar_type(), an, " and ", bn, " must have the same dtype");
}

void check_launch(cudaError_t err, const char* op) {
  TORCH_CHECK(err == cudaSuccess, "megaocto._cuda_kernels.", op, ": CUDA error ", static_cast<int>(err), " (",
              cudaGetErrorString(err), ")");
}

cudaStream_t as_stream(int64_t stream) { return reinterpret_cast<cudaStream_t>(static_cast<intptr_t>(stream)); }

// bias: [cols] or None; x: [..., cols].
void check_bias(const c10::optional<torch::Tensor>& bias, const torch::Tensor& x) {
  if (!bias.has_value()) return;
  check_cuda(*bias, "bias");
  check_same(x, "x", *bias, "bias");
  TORCH_CHECK(bias->dim() == 1 && bias->size(0) == x.size(-1), "bias must be [", x.size(-1), "] (got ",
              bias->sizes(), ")");
}

torch::Tensor bias_gelu_fwd(const torch::Tensor& x, const c10::optional<torch::Tensor>& bias, int64_t stream) {
  check_cuda(x, "x");
  TORCH_CHECK(x.dim() >= 1, "x must have at least one dimension");
  check_bias(bias, x);
  auto y = torch::empty_like(x);
  const int64_t cols = x.size(-1);
  const int64_t rows = cols == 0 ? 0 : x.numel() / cols;
  check_launch(megaocto_bias_gelu_fwd(x.data_ptr(), bias.has_value() ? bias->data_ptr() : nullptr, y.data_ptr(), rows,
                                      cols, dtype_code(x, "x"), as_stream(stream)),
               "bias_gelu_fwd");
  return y;
}

torch::Tensor bias_gelu_bwd(const torch::Tensor& dy, const torch::Tensor& x, const c10::optional<torch::Tensor>& bias,
                            int64_t stream) {
  check_cuda(dy, "dy");
  check_cuda(x, "x");
  check_same(dy, "dy", x, "x");
  TORCH_CHECK(dy.sizes() == x.sizes(), "dy ", dy.sizes(), " must have x's shape ", x.sizes());
  check_bias(bias, x);
  auto dx = torch::empty_like(x);
  const int64_t cols = x.size(-1);
  const int64_t rows = cols == 0 ? 0 : x.numel() / cols;
  check_launch(megaocto_bias_gelu_bwd(dy.data_ptr(), x.data_ptr(), bias.has_value() ? bias->data_ptr() : nullptr,
                                      dx.data_ptr(), rows, cols, dtype_code(x, "x"), as_stream(stream)),
               "bias_gelu_bwd");
  return dx;
}

// x: [batch, heads, sq, sk]; mask: None or bool/uint8 [batch or 1, 1, sq, sk] (True/1 = masked out).
torch::Tensor scaled_masked_softmax_fwd(const torch::Tensor& x, const c10::optional<torch::Tensor>& mask, double scale,
                                        bool causal, int64_t stream) {
  check_cuda(x, "x");
  TORCH_CHECK(x.dim() == 4, "x must be [batch, heads, sq, sk] (got ", x.sizes(), ")");
  const int64_t batch = x.size(0), heads = x.size(1), sq = x.size(2), sk = x.size(3);
  TORCH_CHECK(!causal || sk >= sq, "causal softmax needs sk >= sq (got sq=", sq, ", sk=", sk, ")");
  int64_t mask_batch = 1;
  const uint8_t* mask_ptr = nullptr;
  if (mask.has_value()) {
    check_cuda(*mask, "mask");
    TORCH_CHECK(mask->device() == x.device(), "mask and x must be on the same device");
    TORCH_CHECK(mask->scalar_type() == torch::kBool || mask->scalar_type() == torch::kUInt8,
                "mask must be bool or uint8 (got ", mask->scalar_type(), ")");
    TORCH_CHECK(mask->dim() == 4 && (mask->size(0) == 1 || mask->size(0) == batch) && mask->size(1) == 1 &&
                    mask->size(2) == sq && mask->size(3) == sk,
                "mask must be [", batch, " or 1, 1, ", sq, ", ", sk, "] (got ", mask->sizes(), ")");
    mask_batch = mask->size(0);
    mask_ptr = static_cast<const uint8_t*>(mask->data_ptr());
  }
  auto y = torch::empty_like(x);
  check_launch(megaocto_scaled_masked_softmax_fwd(x.data_ptr(), mask_ptr, y.data_ptr(), batch, heads, sq, sk,
                                                  mask_batch, static_cast<float>(scale), causal ? 1 : 0,
                                                  dtype_code(x, "x"), as_stream(stream)),
               "scaled_masked_softmax_fwd");
  return y;
}

torch::Tensor scaled_masked_softmax_bwd(const torch::Tensor& dy, const torch::Tensor& y, double scale, int64_t stream) {
  check_cuda(dy, "dy");
  check_cuda(y, "y");
  check_same(dy, "dy", y, "y");
  TORCH_CHECK(dy.sizes() == y.sizes() && y.dim() >= 1, "dy ", dy.sizes(), " must have y's shape ", y.sizes());
  auto dx = torch::empty_like(y);
  const int64_t sk = y.size(-1);
  const int64_t rows = sk == 0 ? 0 : y.numel() / sk;
  check_launch(megaocto_scaled_masked_softmax_bwd(dy.data_ptr(), y.data_ptr(), dx.data_ptr(), rows, sk,
                                                  static_cast<float>(scale), dtype_code(y, "y"), as_stream(stream)),
               "scaled_masked_softmax_bwd");
  return dx;
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "megaocto prebuilt CUDA kernels (csrc/*.cu); load through megaocto.kernels.cuda";
  m.def("bias_gelu_fwd", &bias_gelu_fwd, "y = gelu_tanh(x + bias)", py::arg("x"), py::arg("bias"), py::arg("stream"));
  m.def("bias_gelu_bwd", &bias_gelu_bwd, "dx = dy * gelu_tanh'(x + bias)", py::arg("dy"), py::arg("x"),
        py::arg("bias"), py::arg("stream"));
  m.def("scaled_masked_softmax_fwd", &scaled_masked_softmax_fwd, "softmax(scale * x) over unmasked columns",
        py::arg("x"), py::arg("mask"), py::arg("scale"), py::arg("causal"), py::arg("stream"));
  m.def("scaled_masked_softmax_bwd", &scaled_masked_softmax_bwd, "dx = scale * y * (dy - sum(dy * y))", py::arg("dy"),
        py::arg("y"), py::arg("scale"), py::arg("stream"));
}
