"""Mixed precision: model.dtype=bfloat16 computes in bf16 but keeps fp32 master weights, so AdamW's
updates at the paper's learning rate (1e-6) change the weights as an fp32 run does, instead of being
rounded away by bf16's 8-bit mantissa."""
import torch

from afrl_fast.config import DEMO_CONFIG, load_config
from afrl_fast.dist import DistInfo
from afrl_fast.optim import make_optimizer, optimizer_step
from afrl_fast.sft import sft_loss_backward

INFO = DistInfo(rank=0, world=1, local_rank=0, device=torch.device("cpu"))
TINY = ["model.hidden_size=32", "model.num_layers=1", "model.num_heads=2", "model.num_kv_heads=1",
        "model.head_dim=16", "model.intermediate_size=64", "run.loss_backend=torch"]


def changed_fraction(dtype: str, steps: int = 5, lr: float = 1e-6, master: bool = True) -> tuple[float, object]:
    from afrl_fast.train import build_policy

    cfg = load_config(DEMO_CONFIG, TINY + [f"model.dtype={dtype}"])
    torch.manual_seed(0)
    policy = build_policy(cfg, 512, INFO)
    if not master:                                   # what the trainer did before: bf16 parameters
        policy.lm.to(torch.bfloat16)
    before = {n: p.detach().clone() for n, p in policy.named_parameters()}
    opt = make_optimizer(policy, lr, 0.0)
    g = torch.Generator().manual_seed(1)
    examples = [(torch.randint(0, 512, (6,), generator=g).tolist(), torch.randint(0, 512, (5,), generator=g).tolist())
                for _ in range(4)]
    for _ in range(steps):
        sft_loss_backward(policy, examples, pad_id=0, info=INFO)
        optimizer_step(policy, opt, 1.0)
    n = sum(p.numel() for p in before.values())
    moved = sum(int((p.detach() != before[k]).sum()) for k, p in policy.named_parameters())
    return moved / n, policy


def test_bf16_keeps_fp32_master_weights_and_moves_like_fp32_at_lr_1e6():
    fp32, _ = changed_fraction("float32")
    bf16, policy = changed_fraction("bfloat16")
    assert all(p.dtype == torch.float32 for p in policy.parameters())
    assert policy.compute_dtype == torch.bfloat16
    assert fp32 > 0.9 and bf16 > 0.9, (fp32, bf16)
    pure_bf16, _ = changed_fraction("bfloat16", master=False)
    assert pure_bf16 < 0.5 * bf16, pure_bf16          # the failure mode the master weights remove


def test_bf16_forward_computes_in_bf16():
    from afrl_fast.policy import pack_sequences

    _, policy = changed_fraction("bfloat16", steps=0)
    batch = pack_sequences([[1, 2, 3, 7, 9, 11]], [[4, 5, 6, 8]], pad_id=0)
    with torch.no_grad():
        logp_bf16, _ = policy(batch, mode="logprobs")
        policy.compute_dtype = None                      # the same fp32 weights, computed in fp32
        logp_fp32, _ = policy(batch, mode="logprobs")
    assert logp_bf16.dtype == torch.float32 and torch.isfinite(logp_bf16).all()
    diff = (logp_bf16 - logp_fp32).abs().max().item()
    assert 1e-5 < diff < 0.1, diff                        # bf16 rounding, nothing worse
