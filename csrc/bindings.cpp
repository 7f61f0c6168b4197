// The Python module rast_kernels._C.
#include <torch/csrc/utils/pybind.h>  // at::Tensor <-> torch.Tensor casters

#include "ops.h"

#ifndef RAST_TORCH_VERSION
#define RAST_TORCH_VERSION "unknown"
#endif

namespace py = pybind11;

PYBIND11_MODULE(_C, m) {
  m.doc() = "rast_kernels compiled kernels (CPU; CUDA when built with it)";
  py::register_exception<rast_kernels::ArgTypeError>(m, "ArgTypeError", PyExc_TypeError);

  m.def("rast_sample_cpu", &rast_kernels::rast_sample_cpu,
        "RAST sampling step on CPU tensors, written into out (and logprobs when given).\n"
        "base, expert, expert_base: [B, V_*] float32/bfloat16/float16, last dim contiguous;\n"
        "alpha, temperature, top_p, min_p: float32 [B]; top_k, seed, offset: int64 [B];\n"
        "vocab_size: columns drawn from; out: int64 [B]; logprobs: float32 [B] or None.\n"
        "Semantics: rast_kernels.ops.rast_sample (bad rows give -1 and NaN).",
        py::arg("base"), py::arg("expert"), py::arg("expert_base"), py::arg("alpha"), py::arg("temperature"),
        py::arg("top_k"), py::arg("top_p"), py::arg("min_p"), py::arg("seed"), py::arg("offset"),
        py::arg("vocab_size"), py::arg("out"), py::arg("logprobs") = py::none(),
        py::call_guard<py::gil_scoped_release>());

  m.def("rast_sample_pairs_cpu", &rast_kernels::rast_sample_pairs_cpu,
        "RAST sampling step on CPU tensors with K >= 1 expert pairs and base plausibility, into out.\n"
        "base: [B, V_b]; experts, expert_bases: lists of K [B, V_*] float32/bfloat16/float16 tensors;\n"
        "alpha: float32 [B, K]; base_plausibility, log_base_plausibility (its fp32 torch.log): float32 [B];\n"
        "the rest as rast_sample_cpu. Semantics: rast_kernels.ops.rast_sample.",
        py::arg("base"), py::arg("experts"), py::arg("expert_bases"), py::arg("alpha"), py::arg("temperature"),
        py::arg("top_k"), py::arg("top_p"), py::arg("min_p"), py::arg("base_plausibility"),
        py::arg("log_base_plausibility"), py::arg("seed"), py::arg("offset"), py::arg("vocab_size"),
        py::arg("out"), py::arg("logprobs") = py::none(), py::call_guard<py::gil_scoped_release>());

  m.def("linear_rows_cpu", &rast_kernels::linear_rows_cpu,
        "x @ weight^T (+ bias) for 1 to 8 rows of x on CPU, every weight row read once.\n"
        "x: contiguous float32 [M, K]; weight: float32 [N, K], contiguous rows; bias: float32 [N] or None.\n"
        "Semantics: rast_kernels.ops.linear_rows.",
        py::arg("x"), py::arg("weight"), py::arg("bias") = py::none(), py::call_guard<py::gil_scoped_release>());

  m.def("philox_words_cpu", &rast_kernels::philox_words_cpu,
        "Philox4x32-10 words (int64 in [0, 2^32)) [B, num_columns] for CPU int64 seed[B], offset[B],\n"
        "same layout as rast_kernels.ops.philox.random_words.",
        py::arg("seed"), py::arg("offset"), py::arg("num_columns"), py::call_guard<py::gil_scoped_release>());

#ifdef WITH_CUDA
  m.def(
      "philox_words_cuda",
      [](const at::Tensor& seed, const at::Tensor& offset, int64_t num_columns) {
        // torch's current stream of seed's device, so the kernel is ordered like torch's own work
        std::intptr_t stream = 0;
        if (seed.is_cuda()) {
          py::object cur = py::module_::import("torch.cuda").attr("current_stream")(seed.device().index());
          stream = cur.attr("cuda_stream").cast<std::intptr_t>();
        }
        return rast_kernels::philox_words_cuda(seed, offset, num_columns, stream);
      },
      "Philox4x32-10 words (int64 in [0, 2^32)) [B, num_columns] for CUDA int64 seed[B], offset[B],\n"
      "same layout as rast_kernels.ops.philox.random_words.",
      py::arg("seed"), py::arg("offset"), py::arg("num_columns"));
  constexpr bool with_cuda = true;
  const std::string cuda = "CUDA on (archs " RAST_CUDA_ARCHS ")";
#else
  constexpr bool with_cuda = false;
  const std::string cuda = "CUDA off";
#endif
  m.attr("WITH_CUDA") = py::bool_(with_cuda);
  m.attr("__build_info__") =
      std::string("built against torch " RAST_TORCH_VERSION "; ") + cuda + "; CPU parallelism: " + rast_kernels::parallel_backend();
}
