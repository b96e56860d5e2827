// Argument checks shared by the native kernels; every message starts with the kernel's name.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <cstdint>

namespace afrl_checks {

inline void check_row_vector(const char* who, const at::Tensor& t, const char* name,
                             at::ScalarType dtype, int64_t C) {
  TORCH_CHECK(t.device().is_cpu(), who, ": ", name, " must be a CPU tensor, got ", t.device());
  TORCH_CHECK(t.scalar_type() == dtype, who, ": ", name, " must have dtype ", dtype, ", got ",
              t.scalar_type());
  TORCH_CHECK(t.dim() == 1 && t.size(0) == C, who, ": ", name, " must have shape [", C,
              "] (one entry per logits row), got ", t.sizes());
  TORCH_CHECK(t.is_contiguous(), who, ": ", name, " must be contiguous");
}

// A [C, V] logits chunk of float32 (or bfloat16 where the kernel reads it natively).
inline void check_logits(const char* who, const at::Tensor& logits, const char* name,
                         bool allow_bf16) {
  TORCH_CHECK(logits.device().is_cpu(), who, ": ", name, " must be a CPU tensor, got ",
              logits.device());
  TORCH_CHECK(logits.scalar_type() == at::kFloat ||
                  (allow_bf16 && logits.scalar_type() == at::kBFloat16),
              who, ": ", name, allow_bf16 ? " must be float32 or bfloat16, got " : " must be float32, got ",
              logits.scalar_type());
  TORCH_CHECK(logits.dim() == 2, who, ": ", name, " must be 2-D [C, V], got ", logits.sizes());
  TORCH_CHECK(logits.size(1) > 0, who, ": ", name, " must have V > 0 columns");
  TORCH_CHECK(logits.is_contiguous(), who, ": ", name, " must be contiguous (it is processed in place)");
}

inline void check_targets(const char* who, const at::Tensor& targets, int64_t V) {
  const int64_t* y = targets.data_ptr<int64_t>();
  for (int64_t i = 0; i < targets.size(0); ++i)
    TORCH_CHECK(y[i] == -100 || (y[i] >= 0 && y[i] < V), who, ": targets[", i, "] = ", y[i],
                " is outside [0, V=", V, ") and is not the ignore index -100");
}

}  // namespace afrl_checks
