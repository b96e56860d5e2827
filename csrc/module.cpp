// Python bindings of the native extension: one module for every native kernel, so there is one
// build (one lock, one cached library, one hash) however many kernels there are.
#include <torch/extension.h>

#include "passes.h"

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("vocab_pass", &vocab_pass, "Fused vocabulary pass (see csrc/vocab_pass.cpp)",
        py::arg("logits"), py::arg("targets"), py::arg("is_sft"), py::arg("advantages"),
        py::arg("old_logp"), py::arg("ref_logp"), py::arg("scale"), py::arg("beta"),
        py::arg("eps_low"), py::arg("eps_high"), py::arg("inv_temp"), py::arg("with_grad"));
  m.def("fast_exp", &fast_exp, "vectorized exp used by the kernels, for tests", py::arg("x"));
  m.def("distill_pass", &distill_pass, "Fused distillation pass (see csrc/distill_pass.cpp)",
        py::arg("student_logits"), py::arg("teacher_logits"), py::arg("targets"), py::arg("coef"),
        py::arg("ce_coef"), py::arg("kind"), py::arg("beta"), py::arg("inv_temp"),
        py::arg("with_grad"));
  m.def("fast_log", &fast_log, "vectorized log used by the kernels, for tests", py::arg("x"));
}
