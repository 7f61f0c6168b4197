// Glue of the CPU linear_rows kernel: argument checks, the output, the columns split over threads.
// The arithmetic lives in linear_rows_cpu.h (torch-free).
#include "linear_rows_cpu.h"
#include "ops.h"

#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>

#include <sstream>

namespace rast_kernels {
namespace {

void check_float_cpu(const char* name, const at::Tensor& t) {
  if (!t.device().is_cpu() || t.scalar_type() != at::kFloat) {
    std::ostringstream s;
    s << name << ": expected a float32 CPU tensor, got " << t.scalar_type() << " on " << t.device();
    throw ArgTypeError(s.str());
  }
}

}  // namespace

at::Tensor linear_rows_cpu(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias) {
  check_float_cpu("x", x);
  check_float_cpu("weight", weight);
  if (x.dim() != 2 || !x.is_contiguous())
    throw std::invalid_argument("x: expected a contiguous 2-D tensor [M, K]");
  const int64_t M = x.size(0), K = x.size(1);
  if (M < 1 || M > cpu::kMaxRows)
    throw std::invalid_argument("x: expected 1 to " + std::to_string(cpu::kMaxRows) + " rows, got " +
                                std::to_string(M));
  if (weight.dim() != 2 || weight.size(1) != K || (K > 1 && weight.stride(1) != 1))
    throw std::invalid_argument("weight: expected [N, " + std::to_string(K) + "] with contiguous rows");
  const int64_t N = weight.size(0);
  const float* b = nullptr;
  if (bias.has_value()) {
    check_float_cpu("bias", *bias);
    if (bias->dim() != 1 || bias->size(0) != N || (N > 1 && bias->stride(0) != 1))
      throw std::invalid_argument("bias: expected a contiguous [" + std::to_string(N) + "] tensor");
    b = bias->data_ptr<float>();
  }
  at::Tensor y = at::empty({M, N}, x.options());
  const float* xp = x.data_ptr<float>();
  const float* wp = weight.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  const int64_t ldw = weight.stride(0);
  // a grain of 64 weight rows: a few hundred KB of weights per task at the hidden sizes of real models
  at::parallel_for(0, N, 64, [&](int64_t n0, int64_t n1) {
    cpu::linear_rows(xp, static_cast<int>(M), K, wp, ldw, b, yp, N, n0, n1);
  });
  return y;
}

}  // namespace rast_kernels
