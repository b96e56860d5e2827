"""Rollouts through SGLang on GPUs: one SGLang server process per engine group, driven over HTTP.

Why a separate server and not SGLang's in-process `Engine`: the in-process engine changes the
trainer process (multiprocessing start method, NCCL environment, signal handlers), and its
`shutdown()` kills every child process of its host — in a trainer that is the data loaders, the
native-kernel build and anything else the run started. The RL frameworks that drive SGLang at scale
run it as a server for the same reasons. The server lives in its own session; `shutdown()` ends that
process group only.

Placement. Ranks form engine groups of `rl.sglang.tp_size` consecutive ranks on one node; the first
rank of a group (its leader) launches one server with tensor parallelism over the group's GPUs
(`--tp-size`, `--base-gpu-id` = the leader's local rank), so a 32B model is held once per group in
bf16, not once per rank; TP worker r runs on the GPU of the group's r-th rank. Every rank sends its
own prompts to its group's server. The server is started after SFT (the trainer builds the engine
lazily) and holds no memory during SFT. It loads the model rank 0 exported into the run folder
(`engine_init`), so on several nodes `run.out_dir` must be a folder every node sees: the trainer
checks that at start (`check_shared_run_dir`) and each leader checks it again before launching.

GPU memory. The trainer and the server share each GPU, and PyTorch's caching allocator keeps what the
trainer freed; SGLang sizes its KV pool from the memory free when it starts, and its
`resume_memory_occupation` allocates again what it released. So every rank of a group synchronises,
collects its CUDA-IPC leftovers and empties its cache (`gpu_memory`) right before the server starts
and before each resume — weights first, then the KV cache and CUDA graphs, each after a barrier so no
rank is still holding cached blocks when its GPU is asked for memory — and logs its free memory at
each transition (launch, started, released, each resume). On a machine without CUDA these are no-ops.

The protocol the trainer drives (every call on every rank):
- `generate_groups(prompts, group_size, temperature, top_p, max_new_tokens, seeds)`: one prefill
  call per batch (`max_new_tokens=0`) puts the prompts in SGLang's radix cache, then G requests with
  `n=1` per prompt, each with its own seed derived from (prompt seed, g). SGLang honours
  `sampling_seed` only with `--enable-deterministic-inference` (always set here), and `n=G` copies
  would share one seed and come back identical — every GRPO advantage would be zero. Seeds are kept
  below 2^31 (some releases store them as int32).
- `release_memory()` right after the rollouts: every rank of the group has its responses (a
  barrier), then the leader releases SGLang's weights, KV cache and CUDA graphs
  (`--enable-memory-saver`).
- `sync_weights(module)` after the optimizer step: every rank walks the parameters in order and
  gathers each with `full_tensor()` (an FSDP2 collective), so every rank holds each bucket on its own
  GPU. The leader resumes the weights only, opens a weight-update session, and for each bucket
  gathers from the group's ranks a CUDA-IPC handle of the bucket on their own GPUs (serialised by
  SGLang's serializer after `monkey_patch_torch_reductions()`, which names the device by UUID, not by
  an index that means another GPU under a per-process `CUDA_VISIBLE_DEVICES`); TP worker r opens the
  handle of rank r, on its own GPU — the layout of SGLang's `weight_sync.utils.update_weights`
  (`LocalSerializedTensor`). Every rank keeps its bucket until the leader's update has answered (the
  answer is broadcast, so a refusal raises on every rank of the group). Then the leader flushes the
  radix cache, closes the session and resumes the KV cache and CUDA graphs — the order that keeps the
  peak low. Every answer is checked: SGLang answers `{"success": false, "message": ...}` (HTTP 400)
  to an update outside a session, `{"error": {"message": ...}}` to a failed `/generate`, release or
  resume, and plain text to a failed cache flush; the raised error carries SGLang's message.
- `shutdown()` at the end.

Supported SGLang: SGLANG_SPEC below, the releases whose code this module was checked against (the
weight-update session exists from 0.5.21; both pin transformers ≥ 5 like this project). The version
is checked at start-up with a one-line error.
"""
from __future__ import annotations

import logging
import os
from collections.abc import Mapping, Sequence

import numpy as np
import torch
import torch.distributed as dist

from .base import RolloutGroup, resolve_eos_ids
from .sglang_server import (Placement, SGLangError, SGLangServer, check_model_visible,
                            check_sglang_version, error_text, gpu_memory, launch_command, placement)

log = logging.getLogger("afrl_fast")

SEED_LIMIT = 2 ** 31 - 1
RESUME_FIRST = ["weights"]                 # before loading new weights
RESUME_AFTER = ["kv_cache", "cuda_graph"]  # after the update: the peak never holds all three twice


# ----------------------------------------------------------------------------------------------
# Requests and responses
# ----------------------------------------------------------------------------------------------

def sample_seeds(prompt_seed: int, group_size: int) -> list[int]:
    """G distinct per-sample seeds from one prompt seed (reproducible, below 2^31)."""
    state = np.random.SeedSequence([int(prompt_seed) % (2 ** 63), 0x5EED]).generate_state(group_size, np.uint64)
    return [int(s % SEED_LIMIT) for s in state]


def generate_payload(prompts: Sequence[Sequence[int]], group_size: int, temperature: float, top_p: float,
                     max_new_tokens: int, eos_ids: Sequence[int], seeds: Sequence[int]) -> dict:
    """The /generate body: G single-sample requests per prompt, prompt-major, each with its seed."""
    if len(seeds) != len(prompts):
        raise ValueError(f"{len(seeds)} seeds for {len(prompts)} prompts")
    input_ids, params = [], []
    for prompt, seed in zip(prompts, seeds):
        for s in sample_seeds(seed, group_size):
            input_ids.append([int(t) for t in prompt])
            params.append({"n": 1, "temperature": float(temperature), "top_p": float(top_p),
                           "max_new_tokens": int(max_new_tokens), "stop_token_ids": [int(e) for e in eos_ids],
                           "sampling_seed": s})
    return {"input_ids": input_ids, "sampling_params": params, "return_logprob": True}


def prefill_payload(prompts: Sequence[Sequence[int]]) -> dict:
    """Prompts alone, nothing generated: their KV enters the radix cache, which the G samples share."""
    return {"input_ids": [[int(t) for t in p] for p in prompts], "sampling_params": {"max_new_tokens": 0}}


def parse_output(output: Mapping) -> tuple[list[int], list[float], bool]:
    """(token ids, log-probs, finished) of one response. `output_token_logprobs` holds
    (logprob, token id, text) per generated token, the matched stop token included; a stop finishes
    the response, a length limit cuts it, an abort is an error (the response is not a sample)."""
    meta = output["meta_info"]
    reason = meta.get("finish_reason") or {}
    kind = reason.get("type") if isinstance(reason, Mapping) else None
    if kind == "abort":
        raise SGLangError(f"SGLang aborted a rollout request: {reason.get('message', reason)}")
    triples = meta["output_token_logprobs"]
    return [int(t[1]) for t in triples], [float(t[0]) for t in triples], kind == "stop"


def label_probs_from_sglang(output: Mapping, label_ids: Sequence[int]) -> np.ndarray:
    """P(0..4) from one SGLang response that asked ``token_ids_logprob=label_ids``.

    ``meta_info["output_token_ids_logprobs"][0]`` holds ``(logprob, token_id, text)`` for each
    requested id at the first output position, i.e. the next-token distribution after the prompt.
    A softmax over those five log-probs renormalises them over the label tokens (the full
    vocabulary's log-sum-exp cancels), the same quantity the embedded scorer computes."""
    meta = output["meta_info"]
    entries = (meta.get("output_token_ids_logprobs") or [None])[0]
    if not entries:
        raise SGLangError("SGLang returned no label-token log-probs (is return_logprob honoured?)")
    by_id = {int(token_id): float(logprob) for logprob, token_id, *_ in entries}
    missing = [t for t in label_ids if t not in by_id]
    if missing:
        raise SGLangError(f"SGLang returned no log-prob for label token ids {missing}")
    logp = torch.tensor([by_id[t] for t in label_ids], dtype=torch.float64)
    return torch.softmax(logp, dim=0).numpy()


def first_token_payload(prompts: Sequence[Sequence[int]], label_ids: Sequence[int]) -> dict:
    """/generate body whose answer holds each prompt's next-token log-probs at the label ids.
    Temperature 1: the reported log-probs are the model's own distribution; the one sampled token
    is discarded."""
    return {"input_ids": [[int(t) for t in p] for p in prompts],
            "sampling_params": {"max_new_tokens": 1, "temperature": 1.0}, "return_logprob": True,
            "logprob_start_len": -1, "token_ids_logprob": [int(t) for t in label_ids]}


def groups_from_outputs(prompts, outputs, group_size: int) -> list[RolloutGroup]:
    if isinstance(outputs, Mapping):
        outputs = [outputs]
    if len(outputs) != len(prompts) * group_size:
        raise SGLangError(f"SGLang returned {len(outputs)} responses, expected {len(prompts)} prompts × {group_size}")
    groups = []
    for p, prompt in enumerate(prompts):
        parsed = [parse_output(o) for o in outputs[p * group_size:(p + 1) * group_size]]
        groups.append(RolloutGroup(prompt_ids=list(prompt), token_ids=[x[0] for x in parsed],
                                   logprobs=[x[1] for x in parsed], finished=[x[2] for x in parsed]))
    return groups


def named_parameters_in_buckets(module: torch.nn.Module, bucket_bytes: int):
    """(name, full tensor) buckets in parameter order. `full_tensor()` is a collective for FSDP2
    DTensors, so every rank must walk this generator to the end in the same order."""
    bucket, size = [], 0
    for name, param in module.named_parameters():      # skips the tied lm_head duplicate
        tensor = param.detach()
        if hasattr(tensor, "full_tensor"):
            tensor = tensor.full_tensor()
        nbytes = tensor.numel() * tensor.element_size()
        if bucket and size + nbytes > bucket_bytes:
            yield bucket
            bucket, size = [], 0
        bucket.append((name, tensor))
        size += nbytes
    if bucket:
        yield bucket


def per_tensor_handles(gathered: Sequence[Sequence[tuple]]) -> list[tuple[str, list]]:
    """[(name, handle)] per TP rank (rank r's handles are of tensors on rank r's GPU) →
    [(name, [handle of rank 0, ..., handle of rank tp-1])] per tensor: TP worker r opens values[r]."""
    names = [name for name, _ in gathered[0]]
    for r, part in enumerate(gathered):
        if [name for name, _ in part] != names:
            raise SGLangError(f"rank {r} of the engine group gathered other weights than its leader "
                              "(the ranks must walk the parameters in the same order)")
    return [(name, [part[i][1] for part in gathered]) for i, name in enumerate(names)]


class SGLangCodec:
    """SGLang's own CUDA-IPC serialisation of weights, as its `weight_sync.utils.update_weights` does it:
    every rank serialises its tensors (on its own GPU) after `monkey_patch_torch_reductions()` (the
    device travels as its UUID, which the TP worker maps to its own index); the leader wraps each
    tensor's per-rank handles in a `LocalSerializedTensor` and sends one payload per TP rank."""

    def __init__(self):
        from sglang.srt.utils import MultiprocessingSerializer
        from sglang.srt.utils.patch_torch import monkey_patch_torch_reductions

        monkey_patch_torch_reductions()        # before any CUDA tensor of this process is pickled
        self.serializer = MultiprocessingSerializer

    def handle(self, tensor: torch.Tensor) -> bytes:
        return self.serializer.serialize(tensor.detach())

    def pack(self, named_handles: list[tuple[str, list]], tp_size: int) -> list[str]:
        from sglang.srt.model_executor.model_runner_components.weight_updater import LocalSerializedTensor

        payload = self.serializer.serialize([(name, LocalSerializedTensor(values=list(handles)))
                                             for name, handles in named_handles], output_str=True)
        return [payload] * tp_size


# ----------------------------------------------------------------------------------------------
# The engine group's ranks and their GPUs
# ----------------------------------------------------------------------------------------------

class LocalComm:
    """A group of one rank (tp_size 1)."""

    def gather(self, obj) -> list:
        return [obj]

    def broadcast(self, obj):
        return obj


class TorchGroupComm:
    """The engine group's ranks as a torch.distributed group (gloo: the objects are a few bytes of
    handles per tensor, and a gloo group takes no GPU memory). Every rank of the world creates every
    group, in the same order (`new_group` is collective)."""

    def __init__(self, leader: int, tp_size: int):

        world, rank = dist.get_world_size(), dist.get_rank()
        if world % tp_size or leader % tp_size or not leader <= rank < leader + tp_size:
            raise SGLangError(f"engine groups of rl.sglang.tp_size={tp_size} need torchrun's rank order "
                              f"(rank = node * ranks per node + local rank); rank {rank} of {world} has leader {leader}")
        self.dist, self.leader, self.group = dist, leader, None
        for start in range(0, world, tp_size):
            group = dist.new_group(list(range(start, start + tp_size)), backend="gloo")
            if start == leader:
                self.group = group

    def gather(self, obj) -> list | None:
        """obj of every rank of the group, in TP-rank order, on the leader; None elsewhere."""
        is_leader = self.dist.get_rank() == self.leader
        out = [None] * self.dist.get_world_size(self.group) if is_leader else None
        self.dist.gather_object(obj, out, dst=self.leader, group=self.group)
        return out

    def broadcast(self, obj):
        box = [obj]
        self.dist.broadcast_object_list(box, src=self.leader, group=self.group)
        return box[0]


def group_comm(place: Placement, tp_size: int):
    if tp_size == 1:
        return LocalComm()

    if not (dist.is_available() and dist.is_initialized()):
        raise SGLangError(f"rl.sglang.tp_size={tp_size} needs one trainer process per GPU "
                          f"(torchrun --nproc-per-node with a multiple of {tp_size})")
    return TorchGroupComm(place.leader, tp_size)


class SGLangEngine:
    """The trainer's rollout engine over an SGLang server (see the module docstring).

    Injected for tests (defaults in brackets): `server_factory` [SGLangServer], `codec` [SGLangCodec:
    `handle(tensor)` on every rank, `pack([(name, [handle per TP rank])], tp_size)` on the leader],
    `comm` [the group's ranks: `gather(obj)` to the leader, `broadcast(obj)` from it], `memory`
    [gpu_memory(stage, empty=True)], `barrier` [none: one process]."""

    def __init__(self, model_path: str, tokenizer=None, *, settings, seed: int = 0, rank: int = 0,
                 local_rank: int = 0, local_world: int = 1, log_dir=".", eos_ids=None, barrier=None,
                 client=None, server_factory=SGLangServer, codec=None, comm=None, memory=gpu_memory):
        import httpx

        check_sglang_version()
        self.settings, self.eos_ids = settings, resolve_eos_ids(tokenizer, None, eos_ids)
        self.place = placement(rank, local_rank, local_world, settings.tp_size, settings.port)
        self.barrier = barrier or (lambda: None)
        self.comm = comm or group_comm(self.place, settings.tp_size)
        self.memory = memory
        self._codec = codec
        # the server is its own process: a relative run path would mean whatever its working folder is
        model_path = os.path.abspath(str(model_path))
        url = f"http://127.0.0.1:{self.place.port}"
        self.server = None
        self.memory("launch")                  # every rank: SGLang sizes its KV pool from what is free now
        self.barrier()
        if self.place.is_leader:
            check_model_visible(model_path)
            self.server = server_factory(launch_command(model_path, settings, self.place, seed), url,
                                         os.path.join(str(log_dir), f"sglang_{self.place.group}.log"),
                                         settings.start_timeout_s)
        self.barrier()                         # the other ranks of the group wait for their server
        self.memory("started", empty=False)
        self.client = client or httpx.Client(base_url=url, timeout=settings.request_timeout_s)
        self.released = False

    @property
    def codec(self):
        if self._codec is None:
            self._codec = SGLangCodec()
        return self._codec

    # -- HTTP ----------------------------------------------------------------------------------

    def post(self, path: str, body: dict | None = None):
        resp = self.client.post(path, json=body if body is not None else {})
        data = None
        if resp.headers.get("content-type", "").startswith("application/json"):
            data = resp.json()
        if resp.status_code != 200 or (isinstance(data, Mapping) and data.get("success") is False):
            raise SGLangError(f"SGLang {path} failed ({resp.status_code}): {error_text(resp)}")
        return data

    # -- the trainer's interface ---------------------------------------------------------------

    def generate_groups(self, prompts, group_size: int = 8, temperature: float = 1.0, top_p: float = 1.0,
                        max_new_tokens: int = 1024, seeds: Sequence[int] | None = None, seed: int | None = None):
        prompts = [list(p) for p in prompts]
        if not prompts:
            return []
        if seeds is None:
            seeds = [int(seed or 0) + i for i in range(len(prompts))]
        self.post("/generate", prefill_payload(prompts))
        outputs = self.post("/generate", generate_payload(prompts, group_size, temperature, top_p, max_new_tokens,
                                                          self.eos_ids, seeds))
        return groups_from_outputs(prompts, outputs, group_size)

    def score_first_token(self, prompts: Sequence[Sequence[int]], label_ids: Sequence[int]) -> np.ndarray:
        """[n, 5] P(0..4) of each prompt's first answer token, renormalised over the label tokens: the
        trainer's held-out evaluation, computed by the server so no rank needs a replica."""
        if not prompts:
            return np.zeros((0, len(label_ids)))
        outputs = self.post("/generate", first_token_payload(prompts, label_ids))
        outputs = [outputs] if isinstance(outputs, Mapping) else outputs
        return np.stack([label_probs_from_sglang(o, label_ids) for o in outputs])

    def release_memory(self) -> None:
        if not self.settings.enable_memory_saver:
            return
        self.barrier()                         # every rank of the group has its responses
        if self.place.is_leader and not self.released:
            self.post("/release_memory_occupation", {})
        self.released = True
        self.barrier()                         # the server has let go on every GPU of the group
        self.memory("released", empty=False)

    def sync_weights(self, module: torch.nn.Module) -> None:
        leader, released = self.place.is_leader, self.released
        if released:
            self.memory("resume weights")      # every rank: what the trainer cached goes back first
            self.barrier()
            if leader:
                self.post("/resume_memory_occupation", {"tags": RESUME_FIRST})
        if leader:
            self.post("/begin_weight_update", {})
        for bucket in named_parameters_in_buckets(module, self.settings.bucket_bytes):
            self._send(bucket)
        bucket = None                          # noqa: F841  (the last bucket's full tensors, freed below)
        if leader:
            self.post("/flush_cache")
            self.post("/end_weight_update", {})
        if released:
            self.memory("resume kv_cache")     # every rank: the gathered buckets go back
            self.barrier()
            if leader:
                self.post("/resume_memory_occupation", {"tags": RESUME_AFTER})
        self.released = False
        self.barrier()
        if released:
            self.memory("resumed", empty=False)

    def _send(self, bucket: list) -> None:
        """One bucket: every rank's handles (of its own GPU's copy) to the leader, which sends TP
        worker r those of rank r; every rank holds its copy until the server has answered."""
        gathered = self.comm.gather([(name, self.codec.handle(t)) for name, t in bucket])
        error = None
        if self.place.is_leader:
            if len(gathered) != self.settings.tp_size:
                error = f"{len(gathered)} ranks gathered for a server of tp_size={self.settings.tp_size}"
            else:
                try:
                    self.post("/update_weights_from_tensor",
                              {"serialized_named_tensors": self.codec.pack(per_tensor_handles(gathered),
                                                                           self.settings.tp_size),
                               "flush_cache": False})
                except SGLangError as e:
                    error = str(e)
        error = self.comm.broadcast(error)
        if error:
            raise SGLangError(error)

    def shutdown(self) -> None:
        self.client.close()
        if self.server is not None:
            self.server.shutdown()
