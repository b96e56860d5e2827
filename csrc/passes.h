// The entry points of the native extension; module.cpp binds them to Python.
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <optional>
#include <tuple>

// csrc/vocab_pass.cpp: the GRPO/SFT vocabulary pass (afrl_fast.loss.fused_loss).
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> vocab_pass(
    at::Tensor logits, const at::Tensor& targets, const at::Tensor& is_sft,
    const at::Tensor& advantages, const std::optional<at::Tensor>& old_logp,
    const std::optional<at::Tensor>& ref_logp, const at::Tensor& scale, double beta,
    double eps_low, double eps_high, double inv_temp, bool with_grad);
at::Tensor fast_exp(const at::Tensor& x);

// csrc/distill_pass.cpp: the teacher–student distillation pass (afrl_fast.loss.fused_distill_loss).
std::tuple<at::Tensor, at::Tensor> distill_pass(at::Tensor student_logits,
                                                const at::Tensor& teacher_logits,
                                                const at::Tensor& targets, const at::Tensor& coef,
                                                double ce_coef, int64_t kind, double beta,
                                                double inv_temp, bool with_grad);
at::Tensor fast_log(const at::Tensor& x);
