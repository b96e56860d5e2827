"""One distillation step: the fused distillation loss of the student against the frozen teacher over a
global batch, backward included, the denominator set so that FSDP's average is the global token mean."""
from __future__ import annotations

import numpy as np
import torch

from . import dist as D
from .policy import micro_batches, pack_sequences


def distill_loss_backward(student, teacher, examples, cfg, info, pad_id: int) -> dict:
    """The fused distillation loss over one global batch, backward included; sums for the log."""
    d = cfg.distill
    n_local = sum(len(e[1]) for e in examples)
    n_global = D.all_reduce_sum([float(n_local)], info.device)[0]
    # FSDP averages gradients over ranks: a denominator of n_global / world makes their sum the
    # global token mean, whatever the number of ranks or micro-batches
    denominator = max(n_global, 1.0) / info.world
    sums = {"loss": 0.0, "divergence": 0.0, "divergence_first": 0.0, "ce": 0.0, "rows": 0, "first_rows": 0}
    student.train()
    for chunk in micro_batches(len(examples), d.micro_batch_size):
        part = examples[chunk]
        if not part:
            continue
        batch = pack_sequences([e[0] for e in part], [e[1] for e in part], pad_id).to(info.device)
        first = torch.zeros(batch.n_rows, dtype=torch.bool, device=info.device)
        first[torch.as_tensor(np.cumsum([0] + [len(e[1]) for e in part[:-1]]), device=info.device)] = True
        row_weight = torch.where(first, torch.full_like(first, d.first_token_weight, dtype=torch.float32),
                                 torch.ones(batch.n_rows, device=info.device)) * d.logit_weight
        with torch.no_grad():
            t_hidden, t_weight = teacher(batch, mode="hidden")
        out = student(batch, mode="distill", teacher=(t_hidden, t_weight), distill=d, row_weight=row_weight,
                      denominator=denominator)
        out.loss.backward()
        per_row, ce = out.per_row.float(), out.ce.float()
        sums["loss"] += float(out.loss.detach())
        sums["divergence"] += float(per_row.sum())
        sums["divergence_first"] += float(per_row[first].sum())
        sums["ce"] += float(ce.sum())
        sums["rows"] += batch.n_rows
        sums["first_rows"] += len(part)
    return sums
