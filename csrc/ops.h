// Declarations of the ops in rast_kernels._C (bindings.cpp exposes them to Python).
#pragma once

#include <ATen/core/Tensor.h>
#include <optional>

#include <cstdint>
#include <stdexcept>
#include <string>
#include <vector>

namespace rast_kernels {

// Raised for a tensor of the wrong dtype; bindings.cpp maps it to Python's TypeError
// (std::invalid_argument, for everything else, becomes ValueError).
struct ArgTypeError : std::runtime_error {
  explicit ArgTypeError(const std::string& what) : std::runtime_error(what) {}
};

// CPU kernel of rast_sample with one expert pair: rast_sample_pairs_cpu with K = 1 and base plausibility off
// (see rast_sample.cpp). base/expert/expert_base: [B, V_*] fp32/bf16/fp16,
// last dim contiguous; alpha, temperature, top_p, min_p: float32 [B]; top_k, seed, offset: int64 [B];
// out: int64 [B]; logprobs: float32 [B] or None.
void rast_sample_cpu(const at::Tensor& base, const at::Tensor& expert, const at::Tensor& expert_base,
                     const at::Tensor& alpha, const at::Tensor& temperature, const at::Tensor& top_k,
                     const at::Tensor& top_p, const at::Tensor& min_p, const at::Tensor& seed,
                     const at::Tensor& offset, int64_t vocab_size, at::Tensor& out,
                     const std::optional<at::Tensor>& logprobs);

// CPU kernel of rast_sample with K >= 1 expert pairs and base plausibility (see rast_sample.cpp):
// experts[k], expert_bases[k] as above; alpha: contiguous float32 [B, K]; base_plausibility and
// log_base_plausibility (its fp32 torch.log): float32 [B]; the rest as rast_sample_cpu.
void rast_sample_pairs_cpu(const at::Tensor& base, const std::vector<at::Tensor>& experts,
                           const std::vector<at::Tensor>& expert_bases, const at::Tensor& alpha,
                           const at::Tensor& temperature, const at::Tensor& top_k, const at::Tensor& top_p,
                           const at::Tensor& min_p, const at::Tensor& base_plausibility,
                           const at::Tensor& log_base_plausibility, const at::Tensor& seed, const at::Tensor& offset,
                           int64_t vocab_size, at::Tensor& out, const std::optional<at::Tensor>& logprobs);

// Philox4x32-10 words (int64 in [0, 2^32)) [B, num_columns] for rows keyed by int64 seed[B], offset[B]
// (the layout of rast_kernels.ops.philox.random_words); exposed so tests can check the generator bit for bit.
at::Tensor philox_words_cpu(const at::Tensor& seed, const at::Tensor& offset, int64_t num_columns);

// out = x @ weight^T (+ bias) for 1 <= M <= 8 rows of x, every weight row read once (see linear_rows_cpu.h).
// x: contiguous float32 [M, K]; weight: float32 [N, K] with contiguous rows (any row stride); bias: float32 [N] or
// None. Returns a new float32 [M, N].
at::Tensor linear_rows_cpu(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias);

std::string parallel_backend();

#ifdef WITH_CUDA
// Philox4x32-10 words (int64 in [0, 2^32)) [B, num_columns] for rows keyed by CUDA int64 seed[B], offset[B],
// computed on the given CUDA stream (a cudaStream_t as an integer).
at::Tensor philox_words_cuda(const at::Tensor& seed, const at::Tensor& offset, int64_t num_columns,
                             std::intptr_t stream);
#endif

}  // namespace rast_kernels
