// Glue of the CPU rast_sample kernel: argument checks, dtype mapping, parallel loop over rows.
// The arithmetic lives in rast_sample_cpu.h (torch-free).
#include "ops.h"
#include "rast_sample_cpu.h"

#include <ATen/Config.h>
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/full.h>
#include <ATen/ops/zeros.h>

#include <limits>
#include <sstream>
#include <vector>

namespace rast_kernels {
namespace {

std::string describe(const at::Tensor& t) {
  std::ostringstream s;
  s << t.scalar_type() << " " << t.sizes() << " on " << t.device();
  return s.str();
}

cpu::DType logits_dtype(const char* name, const at::Tensor& t) {
  switch (t.scalar_type()) {
    case at::kFloat: return cpu::DType::kFloat32;
    case at::kBFloat16: return cpu::DType::kBFloat16;
    case at::kHalf: return cpu::DType::kFloat16;
    default:
      throw ArgTypeError(std::string(name) + ": dtype must be float32, bfloat16 or float16, got " + describe(t));
  }
}

void check_logits(const char* name, const at::Tensor& t, int64_t batch, int64_t vocab_size) {
  if (!t.device().is_cpu()) throw std::invalid_argument(std::string(name) + ": expected a CPU tensor, got " + describe(t));
  if (t.dim() != 2) throw std::invalid_argument(std::string(name) + ": expected a 2-D tensor [B, V], got " + describe(t));
  if (t.size(0) != batch)
    throw std::invalid_argument(std::string(name) + ": batch size " + std::to_string(t.size(0)) + " differs from base's " +
                                std::to_string(batch));
  if (t.size(1) < vocab_size)
    throw std::invalid_argument(std::string(name) + ": has " + std::to_string(t.size(1)) + " columns, fewer than vocab_size " +
                                std::to_string(vocab_size));
  if (t.size(1) > 1 && t.stride(1) != 1)
    throw std::invalid_argument(std::string(name) + ": the last dimension must be contiguous (stride 1), got stride " +
                                std::to_string(t.stride(1)));
  logits_dtype(name, t);
}

void check_vector(const char* name, const at::Tensor& t, int64_t batch, at::ScalarType dtype, bool need_contiguous) {
  if (!t.device().is_cpu()) throw std::invalid_argument(std::string(name) + ": expected a CPU tensor, got " + describe(t));
  if (t.scalar_type() != dtype) {
    std::ostringstream s;
    s << name << ": expected dtype " << dtype << ", got " << describe(t);
    throw ArgTypeError(s.str());
  }
  if (t.dim() != 1 || t.size(0) != batch)
    throw std::invalid_argument(std::string(name) + ": expected shape [" + std::to_string(batch) + "], got " + describe(t));
  if (need_contiguous && batch > 1 && t.stride(0) != 1)
    throw std::invalid_argument(std::string(name) + ": must be contiguous");
}

}  // namespace

void rast_sample_cpu(const at::Tensor& base, const at::Tensor& expert, const at::Tensor& expert_base,
                     const at::Tensor& alpha, const at::Tensor& temperature, const at::Tensor& top_k,
                     const at::Tensor& top_p, const at::Tensor& min_p, const at::Tensor& seed,
                     const at::Tensor& offset, int64_t vocab_size, at::Tensor& out,
                     const std::optional<at::Tensor>& logprobs) {
  // alpha is [B] here, [B, K] there; every other argument is checked by rast_sample_pairs_cpu, with these names
  if (base.dim() != 2) throw std::invalid_argument("base_logits: expected a 2-D tensor [B, V], got " + describe(base));
  const int64_t batch = base.size(0);
  check_vector("alpha", alpha, batch, at::kFloat, true);
  // one pair is the K-pair kernel with K = 1 and base plausibility off: the same arithmetic, bit for bit
  const at::Tensor off = at::zeros({batch}, alpha.options());
  rast_sample_pairs_cpu(base, {expert}, {expert_base}, alpha.view({batch, 1}), temperature, top_k, top_p, min_p,
                        off, at::full({batch}, -std::numeric_limits<float>::infinity(), alpha.options()), seed,
                        offset, vocab_size, out, logprobs);
}

void rast_sample_pairs_cpu(const at::Tensor& base, const std::vector<at::Tensor>& experts,
                           const std::vector<at::Tensor>& expert_bases, const at::Tensor& alpha,
                           const at::Tensor& temperature, const at::Tensor& top_k, const at::Tensor& top_p,
                           const at::Tensor& min_p, const at::Tensor& base_plausibility,
                           const at::Tensor& log_base_plausibility, const at::Tensor& seed, const at::Tensor& offset,
                           int64_t vocab_size, at::Tensor& out, const std::optional<at::Tensor>& logprobs) {
  if (base.dim() != 2) throw std::invalid_argument("base_logits: expected a 2-D tensor [B, V], got " + describe(base));
  const int64_t batch = base.size(0);
  const int64_t num_pairs = static_cast<int64_t>(experts.size());
  if (num_pairs < 1) throw std::invalid_argument("expert_logits: expected at least one tensor");
  if (static_cast<int64_t>(expert_bases.size()) != num_pairs)
    throw std::invalid_argument("expert_base_logits: " + std::to_string(expert_bases.size()) +
                                " tensors, expert_logits has " + std::to_string(num_pairs));
  if (vocab_size < 1) throw std::invalid_argument("vocab_size: must be >= 1, got " + std::to_string(vocab_size));
  check_logits("base_logits", base, batch, vocab_size);
  for (int64_t k = 0; k < num_pairs; ++k) {
    check_logits("expert_logits", experts[k], batch, vocab_size);
    check_logits("expert_base_logits", expert_bases[k], batch, vocab_size);
  }
  if (!alpha.device().is_cpu() || alpha.scalar_type() != at::kFloat || alpha.dim() != 2 || alpha.size(0) != batch ||
      alpha.size(1) != num_pairs || !alpha.is_contiguous())
    throw std::invalid_argument("alpha: expected a contiguous CPU float32 tensor [" + std::to_string(batch) + ", " +
                                std::to_string(num_pairs) + "], got " + describe(alpha));
  check_vector("temperature", temperature, batch, at::kFloat, true);
  check_vector("top_k", top_k, batch, at::kLong, true);
  check_vector("top_p", top_p, batch, at::kFloat, true);
  check_vector("min_p", min_p, batch, at::kFloat, true);
  check_vector("base_plausibility", base_plausibility, batch, at::kFloat, true);
  check_vector("log_base_plausibility", log_base_plausibility, batch, at::kFloat, true);
  check_vector("seed", seed, batch, at::kLong, true);
  check_vector("offset", offset, batch, at::kLong, true);
  check_vector("out", out, batch, at::kLong, false);
  if (logprobs.has_value()) check_vector("logprobs", *logprobs, batch, at::kFloat, false);
  if (batch == 0) return;

  struct Pair {
    const char *e, *eb;
    int64_t se, seb;
    cpu::DType te, teb;
  };
  std::vector<Pair> pairs;
  for (int64_t k = 0; k < num_pairs; ++k) {
    const at::Tensor &e = experts[k], &eb = expert_bases[k];
    pairs.push_back(Pair{static_cast<const char*>(e.data_ptr()), static_cast<const char*>(eb.data_ptr()),
                         e.stride(0) * e.element_size(), eb.stride(0) * eb.element_size(),
                         logits_dtype("expert_logits", e), logits_dtype("expert_base_logits", eb)});
  }
  const cpu::DType tb = logits_dtype("base_logits", base);
  const auto* pb = static_cast<const char*>(base.data_ptr());
  const int64_t sb = base.stride(0) * base.element_size();
  const float* a = alpha.data_ptr<float>();
  const float* t = temperature.data_ptr<float>();
  const float* p = top_p.data_ptr<float>();
  const float* m = min_p.data_ptr<float>();
  const float* bp = base_plausibility.data_ptr<float>();
  const float* lbp = log_base_plausibility.data_ptr<float>();
  const int64_t* k = top_k.data_ptr<int64_t>();
  const int64_t* s = seed.data_ptr<int64_t>();
  const int64_t* o = offset.data_ptr<int64_t>();
  int64_t* tok = out.data_ptr<int64_t>();
  const int64_t tok_stride = out.stride(0);
  float* lp = logprobs.has_value() ? logprobs->data_ptr<float>() : nullptr;
  const int64_t lp_stride = lp ? logprobs->stride(0) : 0;

  at::parallel_for(0, batch, 1, [&](int64_t begin, int64_t end) {
    cpu::Workspace ws;
    std::vector<cpu::PairInput> row_pairs(static_cast<size_t>(num_pairs));
    for (int64_t r = begin; r < end; ++r) {
      for (int64_t j = 0; j < num_pairs; ++j) {
        const Pair& q = pairs[j];
        row_pairs[j] = cpu::PairInput{q.e + r * q.se, q.eb + r * q.seb, q.te, q.teb, a[r * num_pairs + j]};
      }
      const cpu::RowParams prm{t[r], p[r], m[r], k[r], s[r], o[r]};
      const cpu::RowResult res = cpu::sample_row_pairs(pb + r * sb, tb, row_pairs.data(), static_cast<int>(num_pairs),
                                                       vocab_size, prm, bp[r], lbp[r], lp != nullptr, ws);
      tok[r * tok_stride] = res.token;
      if (lp) lp[r * lp_stride] = res.logprob;
    }
  });
}

at::Tensor philox_words_cpu(const at::Tensor& seed, const at::Tensor& offset, int64_t num_columns) {
  if (seed.dim() != 1) throw std::invalid_argument("seed: expected a 1-D tensor [B], got " + describe(seed));
  const int64_t batch = seed.size(0);
  check_vector("seed", seed, batch, at::kLong, false);
  check_vector("offset", offset, batch, at::kLong, false);
  if (num_columns < 0 || num_columns > (int64_t{1} << 34))
    throw std::invalid_argument("num_columns: must be in [0, 2^34], got " + std::to_string(num_columns));
  const at::Tensor s = seed.contiguous(), o = offset.contiguous();
  at::Tensor out = at::empty({batch, num_columns}, seed.options());
  const int64_t* ps = s.data_ptr<int64_t>();
  const int64_t* po = o.data_ptr<int64_t>();
  int64_t* dst = out.data_ptr<int64_t>();
  at::parallel_for(0, batch, 1, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const cpu::PhiloxRow gen(ps[r], po[r]);
      for (int64_t c0 = 0; c0 < num_columns; c0 += 4) {
        uint32_t w[4];
        gen.group_words(static_cast<uint64_t>(c0) >> 2, w);
        for (int64_t c = c0; c < std::min(c0 + 4, num_columns); ++c) dst[r * num_columns + c] = w[c & 3];
      }
    }
  });
  return out;
}

std::string parallel_backend() {
#if AT_PARALLEL_OPENMP
  return "ATen parallel_for (OpenMP)";
#elif AT_PARALLEL_NATIVE
  return "ATen parallel_for (native thread pool)";
#else
  return "ATen parallel_for";
#endif
}

}  // namespace rast_kernels
