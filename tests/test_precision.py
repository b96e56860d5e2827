"""Mixed precision: model.dtype=bfloat16 computes in bf16 but keeps fp32 master weights, so AdamW's
updates at the paper's learning rate (1e-6) change the weights as an fp32 run does, instead of being
rounded away by bf16's 8-bit mantissa.

The same holds on two gloo ranks under FSDP2: this file is also a torchrun script (`__main__` below),
which checks the sharded parameters and optimizer state, that the sharded policy starts from the
one-process initial weights (buffers included), and that building it — the policy and the frozen
reference — never puts the full model on a rank other than 0."""
import json
import sys
from pathlib import Path

import pytest
import torch

if __package__ in (None, ""):  # run as a file by torchrun: make the package importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from afrl_fast import dist as D
from afrl_fast.config import DEMO_CONFIG, load_config
from afrl_fast.dist import DistInfo
from afrl_fast.optim import make_optimizer, optimizer_step
from afrl_fast.sft import sft_loss_backward

INFO = DistInfo(rank=0, world=1, local_rank=0, device=torch.device("cpu"))
TINY = ["model.hidden_size=32", "model.num_layers=1", "model.num_heads=2", "model.num_kv_heads=1",
        "model.head_dim=16", "model.intermediate_size=64", "run.loss_backend=torch"]
# big enough that a full copy (242 MB fp32, almost all of it in the layers) stands far above the
# noise of a process's resident memory (~10 MB here), small enough to build in seconds
LAYERED = ["model.hidden_size=512", "model.num_layers=16", "model.num_heads=4", "model.num_kv_heads=2",
           "model.head_dim=128", "model.intermediate_size=2048", "run.loss_backend=torch"]


def local(p: torch.Tensor) -> torch.Tensor:
    """This rank's shard of a parameter (the parameter itself on one process)."""
    return p.to_local() if hasattr(p, "to_local") else p


def changed_fraction(dtype: str, steps: int = 5, lr: float = 1e-6, master: bool = True, info: DistInfo = INFO):
    """The fraction of all weights (every rank's shard) that `steps` SFT steps at `lr` changed;
    also returns the policy and its optimizer."""
    from afrl_fast.run_policy import build_policy

    cfg = load_config(DEMO_CONFIG, TINY + [f"model.dtype={dtype}"])
    torch.manual_seed(0)
    policy = build_policy(cfg, 512, info)
    if not master:                                   # what the trainer did before: bf16 parameters
        policy.lm.to(torch.bfloat16)
    before = {n: local(p).detach().clone() for n, p in policy.named_parameters()}
    opt = make_optimizer(policy, lr, 0.0)
    g = torch.Generator().manual_seed(1)
    examples = [(torch.randint(0, 512, (6,), generator=g).tolist(), torch.randint(0, 512, (5,), generator=g).tolist())
                for _ in range(4)]
    for _ in range(steps):
        sft_loss_backward(policy, D.rank_slice(examples, info), pad_id=0, info=info)
        optimizer_step(policy, opt, 1.0)
    n = sum(p.numel() for p in before.values())
    moved = sum(int((local(p).detach() != before[k]).sum()) for k, p in policy.named_parameters())
    n, moved = D.all_reduce_sum([float(n), float(moved)], info.device)
    return moved / n, policy, opt


def test_bf16_keeps_fp32_master_weights_and_moves_like_fp32_at_lr_1e6():
    fp32, _, _ = changed_fraction("float32")
    bf16, policy, _ = changed_fraction("bfloat16")
    assert all(p.dtype == torch.float32 for p in policy.parameters())
    assert policy.compute_dtype == torch.bfloat16
    assert fp32 > 0.9 and bf16 > 0.9, (fp32, bf16)
    pure_bf16, _, _ = changed_fraction("bfloat16", master=False)
    assert pure_bf16 < 0.5 * bf16, pure_bf16          # the failure mode the master weights remove


def test_bf16_forward_computes_in_bf16():
    from afrl_fast.policy import pack_sequences

    _, policy, _ = changed_fraction("bfloat16", steps=0)
    batch = pack_sequences([[1, 2, 3, 7, 9, 11]], [[4, 5, 6, 8]], pad_id=0)
    with torch.no_grad():
        logp_bf16, _ = policy(batch, mode="logprobs")
        policy.compute_dtype = None                      # the same fp32 weights, computed in fp32
        logp_fp32, _ = policy(batch, mode="logprobs")
    assert logp_bf16.dtype == torch.float32 and torch.isfinite(logp_bf16).all()
    diff = (logp_bf16 - logp_fp32).abs().max().item()
    assert 1e-5 < diff < 0.1, diff                        # bf16 rounding, nothing worse


# ------------------------------------------------------------------ two gloo ranks (torchrun)

def sharded_precision(dtype: str, info: DistInfo) -> dict:
    frac, policy, opt = changed_fraction(dtype, info=info)
    return {"changed": frac,
            "sharded": all(hasattr(p, "to_local") and local(p).numel() < p.numel() for p in policy.parameters()),
            "param_dtypes": sorted({str(local(p).dtype) for p in policy.parameters()}),
            "optimizer_dtypes": sorted({str(local(s[k]).dtype) for s in opt.state.values()
                                        for k in ("exp_avg", "exp_avg_sq")})}


def same_init_as_one_process(info: DistInfo) -> dict:
    """The sharded policy's weights (on rank 0) and buffers (on every rank) against a one-process
    build from the same seed."""
    from afrl_fast.policy import build_lm
    from afrl_fast.run_policy import build_policy

    cfg = load_config(DEMO_CONFIG, TINY)
    torch.manual_seed(0)
    one = build_lm(cfg.model, 512)
    torch.manual_seed(0)
    policy = build_policy(cfg, 512, info)
    full = D.full_model_state(policy, rank0_only=True)
    weights = all(torch.equal(full[f"lm.{k}"], v) for k, v in one.state_dict().items()) if info.is_main else True
    want = dict(one.named_buffers())
    return {"weights": weights and (len(full) == len(one.state_dict()) or not info.is_main),
            "buffers": all(torch.equal(b.cpu(), want[n]) for n, b in policy.lm.named_buffers()),
            "tied": policy.lm.lm_head.weight is policy.lm.model.embed_tokens.weight}


def vm_kib(field: str) -> int:
    line = next(x for x in Path("/proc/self/status").read_text().splitlines() if x.startswith(field + ":"))
    return int(line.split()[1])


def peak_growth(build):
    """build()'s result and how far the resident memory's high-water mark rose above the resident
    memory before it (bytes; Linux: writing 5 to clear_refs resets the mark)."""
    Path("/proc/self/clear_refs").write_text("5")
    base = vm_kib("VmRSS")
    out = build()
    return out, (vm_kib("VmHWM") - base) * 1024


def shard_memory(info: DistInfo) -> dict:
    """Peak memory growth while building the policy and, from its rank-0 state, the frozen
    reference, against the size of one full fp32 copy."""
    from afrl_fast.run_policy import build_policy

    cfg = load_config(DEMO_CONFIG, LAYERED)
    torch.manual_seed(0)
    policy, grew_policy = peak_growth(lambda: build_policy(cfg, 512, info))
    full_bytes = 4 * sum(p.numel() for p in policy.parameters())
    state = {k[3:]: v for k, v in D.full_model_state(policy, rank0_only=True).items()}
    _, grew_ref = peak_growth(lambda: build_policy(cfg, 512, info, state, trainable=False))
    return {"full_bytes": full_bytes, "policy": grew_policy, "ref": grew_ref, "state_keys": len(state)}


def two_rank_checks(out: Path) -> None:
    info = D.init_distributed("cpu")
    mine = {"init": same_init_as_one_process(info),
            **{dtype: sharded_precision(dtype, info) for dtype in ("float32", "bfloat16")},
            "memory": shard_memory(info)}   # last: the others import and warm up what building needs
    ranks = D.all_gather_objects(mine)
    if info.is_main:
        out.write_text(json.dumps(ranks))
    D.cleanup()


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory) -> list[dict]:
    from test_train import torchrun_script

    out = tmp_path_factory.mktemp("fsdp") / "ranks.json"
    torchrun_script(Path(__file__), [str(out)], nproc=2)
    return json.loads(out.read_text())


def test_two_gloo_ranks_bf16_keeps_sharded_fp32_master_weights_and_moves_like_fp32(two_ranks):
    for rank in two_ranks:
        fp32, bf16 = rank["float32"], rank["bfloat16"]
        assert bf16["sharded"] and fp32["sharded"]
        assert bf16["param_dtypes"] == ["torch.float32"] and bf16["optimizer_dtypes"] == ["torch.float32"], bf16
        assert fp32["changed"] > 0.9 and bf16["changed"] > 0.9, (fp32, bf16)


def test_two_gloo_ranks_start_from_the_one_process_init(two_ranks):
    for rank in two_ranks:
        assert rank["init"] == {"weights": True, "buffers": True, "tied": True}, rank["init"]


def test_only_rank_0_ever_holds_the_full_model(two_ranks):
    rank0, rank1 = two_ranks
    assert rank0["memory"]["state_keys"] > 0 and rank1["memory"]["state_keys"] == 0   # the reference's source
    full = rank1["memory"]["full_bytes"]
    # rank 1 holds its half plus one tensor in flight; a full copy (the old path: the whole model
    # built, then sharded) would add at least `full`
    assert rank1["memory"]["policy"] < 0.75 * full, rank1["memory"]
    assert rank1["memory"]["ref"] < 0.75 * full, rank1["memory"]


if __name__ == "__main__":
    two_rank_checks(Path(sys.argv[1]))
