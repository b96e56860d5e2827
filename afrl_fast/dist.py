"""torchrun + FSDP2 plumbing: process group, sharding, rank slices, all-reduce, full state dicts.

Works with one process too (no torchrun): then nothing is sharded and the collectives are no-ops.
NCCL on GPU, gloo on CPU; on CPU two ranks reproduce one (tests/test_train.py).
"""
from __future__ import annotations

import gc
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from .errors import ConfigError


@dataclass(frozen=True)
class DistInfo:
    rank: int
    world: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_distributed(device: str = "auto") -> DistInfo:
    """Start the process group when launched by torchrun; pick the device and the CPU thread count."""
    want_cuda = device == "cuda" or (device == "auto" and torch.cuda.is_available())
    if device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("run.device=cuda: no CUDA device is visible on this machine (use run.device=cpu or auto)")
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    if want_cuda:
        torch.cuda.set_device(local_rank)
        dev = torch.device("cuda", local_rank)
    else:
        dev = torch.device("cpu")
        # torchrun pins OMP_NUM_THREADS=1 per process; share the cores among the local ranks instead,
        # unless AFRL_FAST_THREADS says how many this process may use (jobs sharing a machine: spinning
        # OpenMP threads of oversubscribed processes stall each other)
        threads = os.environ.get("AFRL_FAST_THREADS", "")
        torch.set_num_threads(int(threads) if threads.isdigit() and int(threads) > 0
                              else max(1, (os.cpu_count() or 1) // local_world))
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if want_cuda else "gloo")
    return DistInfo(rank, world, local_rank, dev)


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def shard_model(module: torch.nn.Module, layers, info: DistInfo, reshard_after_forward: bool = True,
                param_dtype: torch.dtype | None = None):
    """FSDP2: one unit per decoder layer, then the root (embeddings, final norm, head). With
    `param_dtype` (bf16) the sharded parameters stay in their own dtype (fp32 master weights for the
    optimizer) and are cast to param_dtype when gathered for compute; gradients are reduced in fp32."""
    if not is_distributed():
        return module
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    mesh = init_device_mesh(info.device.type, (info.world,))
    mp = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32) if param_dtype else None
    kwargs = {"mesh": mesh, "reshard_after_forward": reshard_after_forward, **({"mp_policy": mp} if mp else {})}
    for layer in layers:
        fully_shard(layer, **kwargs)
    fully_shard(module, **kwargs)
    return module


def rank_slice(items: list, info: DistInfo) -> list:
    """This rank's share of a global list (strided, so every rank gets the same count ±1)."""
    return items[info.rank::info.world]


def all_reduce_sum(values: list[float], device) -> list[float]:
    """Sum a list of floats over ranks (float64 so token counts stay exact)."""
    if not is_distributed():
        return list(values)
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t.tolist()


def all_gather_objects(obj) -> list:
    if not is_distributed():
        return [obj]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def barrier():
    if is_distributed():
        dist.barrier()


def full_model_state(module, rank0_only: bool = False) -> dict:
    """Unsharded model state dict as CPU tensors; rank0_only gathers to rank 0 alone (checkpoints,
    exports, the frozen reference's initial weights) and the other ranks get {}, so they never hold
    a full copy."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    if not is_distributed():
        return {k: v.detach().cpu().clone() for k, v in module.state_dict().items()}
    return get_model_state_dict(module, options=StateDictOptions(full_state_dict=True, cpu_offload=rank0_only))


def load_full_model_state(module, state: dict) -> None:
    """Load an unsharded state dict into a (possibly sharded) module. With several ranks only rank
    0's `state` is read (the others may pass {}): it is broadcast one tensor at a time and each rank
    keeps its shard, so no rank but 0 ever holds the full model."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    if not is_distributed():
        module.load_state_dict(state)
        return
    set_model_state_dict(module, state if dist.get_rank() == 0 else {},
                         options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True))


def materialize_from_rank0(module, info: DistInfo, full_state: dict | None) -> None:
    """A sharded module whose parameters are on the meta device gets real shards on this rank's
    device, filled from rank 0's full state (`full_state`, read on rank 0 only). The buffers were
    built real (see policy.parameters_on_meta) but to_empty replaces every tensor: they are kept
    aside and copied back."""
    buffers = [(name, b.detach().clone()) for name, b in module.named_buffers(remove_duplicate=False)]
    module.to_empty(device=info.device)
    with torch.no_grad():
        live = dict(module.named_buffers(remove_duplicate=False))
        for name, value in buffers:
            live[name].copy_(value)
    load_full_model_state(module, full_state if info.is_main else {})


@torch.no_grad()
def copy_full_params(src: torch.nn.Module, dst: torch.nn.Module, prefix: str = "lm.") -> None:
    """Copy a (possibly FSDP2-sharded) module's weights into an unsharded replica, one parameter at a
    time: the peak is one full tensor, not a full state dict."""
    targets = dict(dst.named_parameters())
    for name, p in src.named_parameters():
        full = p.full_tensor() if hasattr(p, "full_tensor") else p
        targets[name[len(prefix):] if name.startswith(prefix) else name].copy_(full)


# Optimizer states go through the same DCP functions with one rank or many, so their layout (keyed
# by parameter names) does not depend on the world size a checkpoint was written with.
def full_optimizer_state(module, optimizer) -> dict:
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    return get_optimizer_state_dict(module, optimizer,
                                    options=StateDictOptions(full_state_dict=True, cpu_offload=is_distributed()))


def load_full_optimizer_state(module, optimizer, state: dict) -> None:
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    set_optimizer_state_dict(module, optimizer, state,
                             options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=is_distributed()))


def cleanup():
    if dist.is_available() and dist.is_initialized():
        # Why: sharded modules sit in reference cycles (hooks), so their pending gloo work objects
        # would otherwise be freed at interpreter shutdown, from gloo's own threads, which aborts the
        # process ("terminate called without an active exception") after a run that succeeded.
        # Collect them now, and let every rank pass its last collective before any tears gloo down.
        gc.collect()
        dist.barrier()
        dist.destroy_process_group()
