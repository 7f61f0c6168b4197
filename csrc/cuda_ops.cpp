// Tensor glue of the CUDA ops (compiled only when WITH_CUDA). Needs no CUDA headers: the launcher in
// rast_sample_cuda.cu takes raw pointers, the device index and the stream handle.
#include "ops.h"

#include <ATen/ops/empty.h>

#include <string>

namespace rast_kernels {
namespace cuda {
// nullptr on success, else the CUDA error string
const char* launch_philox_words(int device, const int64_t* seed, const int64_t* offset, int64_t batch,
                                int64_t num_columns, int64_t* out, void* stream);
}

at::Tensor philox_words_cuda(const at::Tensor& seed, const at::Tensor& offset, int64_t num_columns,
                             std::intptr_t stream) {
  auto check = [](const char* name, const at::Tensor& t) {
    if (!t.is_cuda()) throw std::invalid_argument(std::string(name) + ": expected a CUDA tensor");
    if (t.scalar_type() != at::kLong) throw ArgTypeError(std::string(name) + ": expected an int64 tensor");
    if (t.dim() != 1) throw std::invalid_argument(std::string(name) + ": expected a 1-D tensor [B]");
  };
  check("seed", seed);
  check("offset", offset);
  if (offset.size(0) != seed.size(0) || offset.device() != seed.device())
    throw std::invalid_argument("offset: expected the shape and device of seed");
  if (num_columns < 0 || num_columns > (int64_t{1} << 34))
    throw std::invalid_argument("num_columns: must be in [0, 2^34], got " + std::to_string(num_columns));
  const at::Tensor s = seed.contiguous(), o = offset.contiguous();
  at::Tensor out = at::empty({seed.size(0), num_columns}, seed.options());
  const char* err = cuda::launch_philox_words(seed.device().index(), s.data_ptr<int64_t>(), o.data_ptr<int64_t>(),
                                              seed.size(0), num_columns, out.data_ptr<int64_t>(),
                                              reinterpret_cast<void*>(stream));
  if (err) throw std::runtime_error(std::string("philox_words_cuda: CUDA error: ") + err);
  return out;
}

}  // namespace rast_kernels
