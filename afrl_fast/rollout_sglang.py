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
bf16, not once per rank. Every rank sends its own prompts to its group's server. The server is
started after SFT (the trainer builds the engine lazily) and holds no memory during SFT.

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
  gathers each with `full_tensor()` (an FSDP2 collective); the leader resumes the weights only,
  opens a weight-update session, streams the tensors in buckets (`/update_weights_from_tensor`,
  CUDA IPC handles serialised by SGLang's own serializer, one payload per TP rank), flushes the
  radix cache, closes the session, then resumes the KV cache and CUDA graphs — the order that keeps
  the peak low. Every answer is checked: SGLang answers `{"success": false, "message": ...}` (HTTP
  400) to an update outside a session, and such an answer used to be ignored, so RL trained on the
  initial weights without an error.
- `shutdown()` at the end.

Supported SGLang: SGLANG_SPEC below, the releases whose code this module was checked against (the
weight-update session exists from 0.5.21; both pin transformers ≥ 5 like this project). The version
is checked at start-up with a one-line error.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from .rollout import RolloutGroup, resolve_eos_ids

SGLANG_SPEC = ">=0.5.21,<0.5.24"
SEED_LIMIT = 2 ** 31 - 1
RESUME_FIRST = ["weights"]                 # before loading new weights
RESUME_AFTER = ["kv_cache", "cuda_graph"]  # after the update: the peak never holds all three twice


class SGLangError(RuntimeError):
    """SGLang refused or failed an operation; one line with its message."""


# ----------------------------------------------------------------------------------------------
# Version guard
# ----------------------------------------------------------------------------------------------

def check_sglang_version(installed: str | None = None) -> str:
    """The installed SGLang version, or a one-line error when it is missing or outside SGLANG_SPEC."""
    from packaging.specifiers import SpecifierSet
    from packaging.version import InvalidVersion, Version

    if installed is None:
        from importlib.metadata import PackageNotFoundError, version
        try:
            installed = version("sglang")
        except PackageNotFoundError:
            raise SGLangError("SGLang is not installed: pip install 'afrl-fast[sglang]' on a GPU machine; "
                              "the embedded engine runs everywhere") from None
    try:
        ok = Version(installed) in SpecifierSet(SGLANG_SPEC)
    except InvalidVersion:
        ok = False
    if not ok:
        raise SGLangError(f"SGLang {installed} is not supported: this trainer is checked against sglang{SGLANG_SPEC} "
                          "(weight-update sessions, per-request seeds, transformers >= 5); "
                          "pip install 'afrl-fast[sglang]'")
    return installed


# ----------------------------------------------------------------------------------------------
# Placement
# ----------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Placement:
    group: int           # engine group index on this node
    leader: int          # global rank that owns the server
    is_leader: bool
    base_gpu_id: int     # first GPU of the group on this node
    port: int


def placement(rank: int, local_rank: int, local_world: int, tp_size: int, base_port: int) -> Placement:
    """Engine groups are `tp_size` consecutive ranks of one node."""
    if tp_size < 1 or local_world % tp_size:
        raise SGLangError(f"rl.sglang.tp_size={tp_size} must divide the {local_world} ranks (GPUs) per node")
    group = local_rank // tp_size
    leader_local = group * tp_size
    return Placement(group=group, leader=rank - (local_rank - leader_local), is_leader=local_rank == leader_local,
                     base_gpu_id=leader_local, port=base_port + group)


def launch_command(model_path: str, settings, place: Placement, seed: int) -> list[str]:
    """`python -m sglang.launch_server ...` for one engine group."""
    cmd = [sys.executable, "-m", "sglang.launch_server", "--model-path", str(model_path), "--host", "127.0.0.1",
           "--port", str(place.port), "--tp-size", str(settings.tp_size), "--base-gpu-id", str(place.base_gpu_id),
           "--mem-fraction-static", str(settings.mem_fraction_static), "--dtype", settings.dtype,
           "--random-seed", str(seed), "--enable-deterministic-inference", "--skip-tokenizer-init"]
    if settings.enable_memory_saver:
        cmd.append("--enable-memory-saver")
    return cmd + list(settings.extra_args)


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


def serialize_for_tp(named: list, tp_size: int) -> list[str]:
    """One base64 payload per TP rank, in SGLang's own serialisation (CUDA IPC handles)."""
    from sglang.srt.utils import MultiprocessingSerializer

    return [MultiprocessingSerializer.serialize(named, output_str=True) for _ in range(tp_size)]


# ----------------------------------------------------------------------------------------------
# The server and the engine
# ----------------------------------------------------------------------------------------------

class SGLangServer:
    """`python -m sglang.launch_server` in its own session (so ending it ends only its processes)."""

    def __init__(self, cmd: list[str], url: str, log_path, timeout_s: float):
        import httpx

        self.url = url
        self.log = open(log_path, "ab")
        self.proc = subprocess.Popen(cmd, stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise SGLangError(f"the SGLang server exited with code {self.proc.returncode} at start-up; "
                                  f"see {log_path}")
            try:
                if httpx.get(f"{url}/health", timeout=5).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(1.0)
        self.shutdown()
        raise SGLangError(f"the SGLang server at {url} did not answer /health within {timeout_s:.0f} s; see {log_path}")

    def shutdown(self, grace_s: float = 30.0) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=grace_s)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        self.log.close()


class SGLangEngine:
    """The trainer's rollout engine over an SGLang server (see the module docstring)."""

    def __init__(self, model_path: str, tokenizer=None, *, settings, seed: int = 0, rank: int = 0,
                 local_rank: int = 0, local_world: int = 1, log_dir=".", eos_ids=None, barrier=None,
                 client=None, server_factory=SGLangServer, serializer=serialize_for_tp):
        import httpx

        check_sglang_version()
        self.settings, self.eos_ids = settings, resolve_eos_ids(tokenizer, None, eos_ids)
        self.place = placement(rank, local_rank, local_world, settings.tp_size, settings.port)
        self.barrier = barrier or (lambda: None)
        self.serializer = serializer
        url = f"http://127.0.0.1:{self.place.port}"
        self.server = None
        if self.place.is_leader:
            self.server = server_factory(launch_command(model_path, settings, self.place, seed), url,
                                         os.path.join(str(log_dir), f"sglang_{self.place.group}.log"),
                                         settings.start_timeout_s)
        self.barrier()                         # the other ranks of the group wait for their server
        self.client = client or httpx.Client(base_url=url, timeout=settings.request_timeout_s)
        self.released = False

    # -- HTTP ----------------------------------------------------------------------------------

    def post(self, path: str, body: dict | None = None):
        resp = self.client.post(path, json=body if body is not None else {})
        data = None
        if resp.headers.get("content-type", "").startswith("application/json"):
            data = resp.json()
        if resp.status_code != 200 or (isinstance(data, Mapping) and data.get("success") is False):
            message = data.get("message") if isinstance(data, Mapping) else resp.text
            raise SGLangError(f"SGLang {path} failed ({resp.status_code}): {' '.join(str(message).split())[:300]}")
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

    def sync_weights(self, module: torch.nn.Module) -> None:
        leader = self.place.is_leader
        if leader:
            if self.released:
                self.post("/resume_memory_occupation", {"tags": RESUME_FIRST})
            self.post("/begin_weight_update", {})
        for bucket in named_parameters_in_buckets(module, self.settings.bucket_bytes):
            if leader:
                self.post("/update_weights_from_tensor",
                          {"serialized_named_tensors": self.serializer(bucket, self.settings.tp_size),
                           "flush_cache": False})
        if leader:
            self.post("/flush_cache")
            self.post("/end_weight_update", {})
            if self.released:
                self.post("/resume_memory_occupation", {"tags": RESUME_AFTER})
        self.released = False
        self.barrier()

    def shutdown(self) -> None:
        self.client.close()
        if self.server is not None:
            self.server.shutdown()
