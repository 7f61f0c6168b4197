// CUDA side of rast_kernels._C (built only with a CUDA torch and nvcc): the Philox4x32-10 generator on
// the GPU, the same function as the CPU kernel's, so a GPU test can check the CUDA build against
// rast_kernels/ops/philox.py. Torch-free: cuda_ops.cpp holds the tensor glue.
#include <cuda_runtime.h>

#include <cstdint>

#include "rast_sample_cpu.h"

namespace rast_kernels {
namespace cuda {

// One thread per (row, group of 4 columns): out[row, c] = word c & 3 of counter (c >> 2, offset lo, offset hi, 0).
__global__ void philox_words_kernel(const int64_t* __restrict__ seed, const int64_t* __restrict__ offset,
                                    int64_t batch, int64_t num_columns, int64_t* __restrict__ out) {
  const int64_t groups = (num_columns + 3) / 4;
  const int64_t idx = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (idx >= batch * groups) return;
  const int64_t row = idx / groups, g = idx % groups;
  const uint64_t s = static_cast<uint64_t>(seed[row]), o = static_cast<uint64_t>(offset[row]);
  uint32_t w[4];
  cpu::philox4x32_10(static_cast<uint32_t>(g), static_cast<uint32_t>(o), static_cast<uint32_t>(o >> 32), 0u,
                     static_cast<uint32_t>(s), static_cast<uint32_t>(s >> 32), w);
  int64_t* dst = out + row * num_columns;
  for (int lane = 0; lane < 4; ++lane) {
    const int64_t c = 4 * g + lane;
    if (c < num_columns) dst[c] = static_cast<int64_t>(w[lane]);
  }
}

const char* launch_philox_words(int device, const int64_t* seed, const int64_t* offset, int64_t batch,
                                int64_t num_columns, int64_t* out, void* stream) {
  const int64_t work = batch * ((num_columns + 3) / 4);
  if (work == 0) return nullptr;
  int previous = 0;
  cudaError_t err = cudaGetDevice(&previous);
  if (err == cudaSuccess && previous != device) err = cudaSetDevice(device);
  if (err != cudaSuccess) return cudaGetErrorString(err);
  constexpr int kThreads = 256;
  const int64_t blocks = (work + kThreads - 1) / kThreads;
  philox_words_kernel<<<static_cast<unsigned>(blocks), kThreads, 0, static_cast<cudaStream_t>(stream)>>>(
      seed, offset, batch, num_columns, out);
  err = cudaGetLastError();
  if (previous != device) cudaSetDevice(previous);
  return err == cudaSuccess ? nullptr : cudaGetErrorString(err);
}

}  // namespace cuda
}  // namespace rast_kernels
