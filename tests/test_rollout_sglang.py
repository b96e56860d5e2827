"""SGLang rollouts (afrl_fast.engines.sglang) against a stand-in server faithful to SGLang's HTTP
semantics as read in its released code (0.5.21, 0.5.23): a list of per-request sampling params;
seeds honoured per request under deterministic inference (and shared by the n copies of one request);
`(success, message)` answers with HTTP 400 on failure, `{"error": {"message"}}` from /generate,
release and resume, `{"error": "..."}` for a /generate body its schema refuses, plain text from a
failed /flush_cache; weight updates refused outside a begin/end session; memory released and resumed
by tags, each resume allocating on the GPU (out of memory when the trainer's cache holds it); the
KV pool sized at start from the free memory (`rest = free_after_weights - free_before * (1 -
mem_fraction_static)`); one payload per TP rank, TP worker r opening the r-th handle of each tensor
(`LocalSerializedTensor.get(tp_rank)`). Where the `sglang` package is importable, the payloads are
also validated by SGLang's own request objects (skipped with a reason otherwise).
"""
import json
import logging
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
import types
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch
import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse
from transformers import Qwen3Config, Qwen3ForCausalLM

import afrl_fast.engines.sglang as RS
import afrl_fast.engines.sglang_server as SS
from afrl_fast.config import ConfigError, SGLangConfig, load_config
from afrl_fast.engines import make_engine

sys.path.insert(0, str(Path(__file__).parent))
from serving import free_port  # noqa: E402

VOCAB, EOS = 64, 7
GiB = 2 ** 30
ALL_TAGS = ["weights", "kv_cache", "cuda_graph"]


class FakeGPU:
    """One GPU's memory as the trainer's caching allocator and SGLang share it (bytes), and the
    torch.cuda calls `gpu_memory` makes, recorded: `empty_cache` hands the trainer's cached blocks
    back; whatever SGLang allocates must fit in what is free then."""

    def __init__(self, total, trainer_live):
        self.total, self.live, self.cached, self.sglang, self.calls = total, trainer_live, 0, {}, []

    def free(self):
        return self.total - self.live - self.cached - sum(self.sglang.values())

    def grow_cache(self, nbytes):               # the trainer's allocator keeps what a step used
        self.cached += min(nbytes, self.free())

    def take(self, tag, nbytes):
        if nbytes > self.free():
            raise MemoryError(f"CUDA out of memory. Tried to allocate {nbytes / GiB:.2f} GiB. GPU 0 has a total "
                              f"capacity of {self.total / GiB:.2f} GiB of which {self.free() / GiB:.2f} GiB is free.")
        self.sglang[tag] = nbytes

    def synchronize(self):
        self.calls.append("synchronize")

    def ipc_collect(self):
        self.calls.append("ipc_collect")

    def empty_cache(self):
        self.calls.append("empty_cache")
        self.cached = 0

    def mem_get_info(self):
        self.calls.append("mem_get_info")
        return self.free(), self.total

    def install(self, monkeypatch):
        """torch.cuda as this GPU (only the calls gpu_memory makes)."""
        for name in ("synchronize", "ipc_collect", "empty_cache", "mem_get_info"):
            monkeypatch.setattr(torch.cuda, name, getattr(self, name))
        monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
        monkeypatch.setattr(torch.cuda, "is_initialized", lambda: True)
        monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)


class StandInSGLang:
    """An SGLang server's HTTP surface with its real rules, in a thread; records every call.
    `tp_size`: the TP workers the payloads are for; `gpu` (a FakeGPU) and `sizes` (bytes per memory
    tag): release and resume account for memory there."""

    def __init__(self, refuse_updates: bool = False, tp_size: int = 1, base_gpu_id: int = 0, port=None,
                 gpu: FakeGPU | None = None, calls: list | None = None):
        self.calls, self.session, self.released = ([] if calls is None else calls), False, set()
        self.refuse_updates, self.fail_flush = refuse_updates, None
        self.tp_size, self.base_gpu_id, self.gpu, self.sizes = tp_size, base_gpu_id, gpu, {}
        self.loaded = {r: [] for r in range(tp_size)}      # TP worker r: (name, handle) it opened
        app = FastAPI()

        def fail(message):
            return JSONResponse({"success": False, "message": message}, status_code=400)

        def error(message):                    # http_server._create_error_response
            return JSONResponse({"error": {"message": message}}, status_code=400)

        @app.get("/health")
        async def health():
            return {}

        @app.post("/generate")
        async def generate(request: Request):
            body = await request.json()
            self.calls.append(("generate", body))
            ids, params = body["input_ids"], body["sampling_params"]
            if not all(isinstance(t, int) for p in ids for t in p):      # the schema gate, before anything
                return JSONResponse({"error": "input_ids: expected an array of token ids (int64)"}, status_code=400)
            params = params if isinstance(params, list) else [params] * len(ids)
            for p in params:                   # SamplingParams.verify raises ValueError -> 400
                if not 0.0 < p.get("top_p", 1.0) <= 1.0:
                    return error(f"top_p must be in (0, 1], got {p['top_p']}.")
            out = []
            for prompt, p in zip(ids, params):
                if "token_ids_logprob" in body:
                    p = {**p, "token_ids_logprob": body["token_ids_logprob"]}
                for _ in range(p.get("n", 1)):        # the n copies share the request's seed
                    out.append(self.sample(prompt, p))
            return out

        @app.post("/begin_weight_update")
        async def begin(request: Request):
            self.calls.append(("begin", None))
            if self.session:
                return fail("a weight-update session is already open; call end_weight_update() first")
            self.session = True
            return {"success": True, "message": "Success"}

        @app.post("/end_weight_update")
        async def end(request: Request):
            self.calls.append(("end", None))
            if not self.session:
                return fail("no weight-update session is open; call begin_weight_update() first")
            self.session = False
            return {"success": True, "message": "Success"}

        @app.post("/update_weights_from_tensor")
        async def update(request: Request):
            body = await request.json()
            self.calls.append(("update", body))
            if not self.session:
                return fail("update_weights_from_tensor must run between begin_weight_update() and "
                            "end_weight_update()")
            if "weights" in self.released:
                return fail("weights are released")
            if self.refuse_updates:
                return fail("Failed to update weights: shape mismatch")
            payloads = body["serialized_named_tensors"]
            if len(payloads) != self.tp_size:
                return fail(f"list index out of range: {len(payloads)} payloads for tp_size={self.tp_size}")
            for r in range(self.tp_size):      # TP worker r: its own payload, then values[r] of each tensor
                for name, values in json.loads(payloads[r]):
                    self.loaded[r].append((name, values[r]))
            return {"success": True, "message": "Success"}

        @app.post("/flush_cache")
        async def flush():
            self.calls.append(("flush", None))
            if self.fail_flush:
                return PlainTextResponse(self.fail_flush, status_code=400)
            return PlainTextResponse("Cache flushed.\n")

        @app.post("/release_memory_occupation")
        async def release(request: Request):
            tags = (await request.json()).get("tags") or ALL_TAGS
            self.calls.append(("release", tags))
            if self.gpu is not None:
                for tag in tags:
                    self.gpu.sglang.pop(tag, None)
            self.released |= set(tags)
            return None

        @app.post("/resume_memory_occupation")
        async def resume(request: Request):
            tags = (await request.json()).get("tags") or ALL_TAGS
            self.calls.append(("resume", tags))
            if self.gpu is not None:
                try:
                    for tag in tags:
                        self.gpu.take(tag, self.sizes[tag])
                except MemoryError as e:
                    return error(str(e))
            self.released -= set(tags)
            return None

        self.port = port or free_port()
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="error"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        while not self.server.started:
            time.sleep(0.05)

    def launch(self, weights, cuda_graph):
        """A server factory that starts like SGLang on `gpu`: weights first, then the KV pool from
        what was free before loading (kv_cache_configurator._profile_available_bytes)."""
        def factory(cmd, url, log_path, timeout_s):
            self.calls.append(("launch", cmd))
            fraction = float(cmd[cmd.index("--mem-fraction-static") + 1])
            before = self.gpu.free()
            self.gpu.take("weights", weights)
            kv = int(self.gpu.free() - before * (1 - fraction))
            if kv <= 0:
                self.gpu.sglang.clear()
                raise RS.SGLangError("the SGLang server exited with code 1 at start-up: ValueError: Loaded weights "
                                     "leave no GPU memory for the KV cache")
            self.gpu.take("kv_cache", kv)
            self.gpu.take("cuda_graph", cuda_graph)
            self.sizes = {"weights": weights, "kv_cache": kv, "cuda_graph": cuda_graph}
            return NoServer(cmd)
        return factory

    @staticmethod
    def sample(prompt, p):
        if "token_ids_logprob" in p:           # the first position's log-probs at the asked ids
            rng = np.random.default_rng(list(prompt))
            entries = [[float(-5 * rng.random()), t, None] for t in p["token_ids_logprob"]]
            return {"meta_info": {"output_token_logprobs": [[-0.1, 1, None]], "output_token_ids_logprobs": [entries],
                                  "finish_reason": {"type": "length"}}}
        """Deterministic inference: the tokens are a function of (prompt, seed); EOS may end them."""
        if p["max_new_tokens"] == 0:
            return {"text": "", "meta_info": {"output_token_logprobs": [], "finish_reason": {"type": "length"}}}
        rng = np.random.default_rng([p.get("sampling_seed", 42), *prompt])
        tokens, triples = [], []
        for _ in range(p["max_new_tokens"]):
            t = int(rng.integers(VOCAB))
            triples.append([float(-rng.random()), t, None])
            tokens.append(t)
            if t in p["stop_token_ids"]:
                return {"meta_info": {"output_token_logprobs": triples, "finish_reason": {"type": "stop", "matched": t}}}
        return {"meta_info": {"output_token_logprobs": triples, "finish_reason": {"type": "length", "length": len(tokens)}}}

    def stop(self):
        self.server.should_exit = True
        self.thread.join(timeout=10)


class NoServer:
    def __init__(self, *args):
        self.args = args
        self.stopped = False

    def shutdown(self):
        self.stopped = True


class JsonCodec:
    """Stands in for SGLang's serializer (JSON instead of pickled CUDA-IPC handles): a handle names
    the trainer rank and the GPU whose copy of the tensor it points to."""

    def __init__(self, rank=0, gpu=0, on_handle=None):
        self.rank, self.gpu, self.on_handle = rank, gpu, on_handle

    def handle(self, tensor):
        if self.on_handle:
            self.on_handle(tensor)
        return {"rank": self.rank, "gpu": self.gpu, "numel": tensor.numel()}

    def pack(self, named_handles, tp_size):
        return [json.dumps(named_handles)] * tp_size


class ThreadGroup:
    """n ranks as threads: a barrier, an all-gather, and the engine group's gather/broadcast (rank 0
    of the threads is the leader)."""

    def __init__(self, n):
        self.n, self.wall, self.slots = n, threading.Barrier(n, timeout=20), [None] * n

    def barrier(self):
        self.wall.wait()

    def all_gather(self, i, obj):
        self.wall.wait()
        self.slots[i] = obj
        self.wall.wait()
        out = list(self.slots)
        self.wall.wait()
        return out

    def comm(self, i):
        group = self
        return types.SimpleNamespace(gather=lambda obj: (lambda out: out if i == 0 else None)(group.all_gather(i, obj)),
                                     broadcast=lambda obj: group.all_gather(i, obj)[0])

    def run(self, fns):
        """fns[i]() on thread i; the results, or the exceptions they raised."""
        out = [None] * self.n

        def go(i):
            try:
                out[i] = fns[i]()
            except BaseException as e:   # noqa: BLE001  (reported to the test; a thread left waiting
                out[i] = e               # breaks the barrier by its timeout)
        threads = [threading.Thread(target=go, args=(i,)) for i in range(self.n)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=60)
        return out


@pytest.fixture
def standin(monkeypatch):
    monkeypatch.setattr(RS, "check_sglang_version", lambda installed=None: "0.5.23")
    srv = StandInSGLang()
    yield srv
    srv.stop()


@pytest.fixture
def model_dir(tmp_path):
    """What rank 0 exports for the servers (the leader checks that config.json is there)."""
    path = tmp_path / "engine_init"
    path.mkdir()
    (path / "config.json").write_text("{}")
    return path


def engine_for(srv, model_dir, **kw):
    settings = SGLangConfig(port=srv.port, **kw.pop("settings", {}))
    kw.setdefault("server_factory", NoServer)
    kw.setdefault("codec", JsonCodec())
    return make_engine("sglang", model_path=str(model_dir), settings=settings, eos_ids=[EOS], **kw)


def tiny_model():
    torch.manual_seed(0)
    return Qwen3ForCausalLM(Qwen3Config(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                        num_attention_heads=2, num_key_value_heads=1, head_dim=16,
                                        tie_word_embeddings=True))


# ----------------------------------------------------------------------------------------------

def test_groups_get_distinct_seeds_and_share_a_prefilled_prompt(standin, model_dir):
    eng = engine_for(standin, model_dir)
    prompts = [[1, 2, 3], [4, 5]]
    groups = eng.generate_groups(prompts, group_size=4, temperature=1.0, max_new_tokens=12, seeds=[11, 12])
    prefill, sample = [b for kind, b in standin.calls if kind == "generate"]
    assert prefill["input_ids"] == prompts and prefill["sampling_params"]["max_new_tokens"] == 0
    assert sample["input_ids"] == [p for p in prompts for _ in range(4)]            # prompt-major
    params = sample["sampling_params"]
    assert all(p["n"] == 1 and p["stop_token_ids"] == [EOS] for p in params)
    seeds = [p["sampling_seed"] for p in params]
    assert len(set(seeds)) == 8 and all(0 <= s < 2 ** 31 - 1 for s in seeds)
    assert seeds[:4] == RS.sample_seeds(11, 4) and seeds[4:] == RS.sample_seeds(12, 4)
    for g, prompt in zip(groups, prompts):
        assert g.prompt_ids == prompt and len(g.token_ids) == 4
        assert len({tuple(t) for t in g.token_ids}) > 1                            # not four copies of one
        for ids, lps, done in zip(g.token_ids, g.logprobs, g.finished):
            assert len(ids) == len(lps) and done == (ids[-1] == EOS)
    again = eng.generate_groups(prompts, group_size=4, temperature=1.0, max_new_tokens=12, seeds=[11, 12])
    assert [g.token_ids for g in again] == [g.token_ids for g in groups]           # reproducible
    # what the old request shape (one request with n = G) gets back from SGLang: G identical copies
    old = {"input_ids": [[1, 2, 3]], "sampling_params": [{"n": 4, "max_new_tokens": 12, "stop_token_ids": [EOS],
                                                          "sampling_seed": 11}]}
    copies = eng.post("/generate", old)
    assert len({tuple(t[1] for t in o["meta_info"]["output_token_logprobs"]) for o in copies}) == 1


def test_evaluation_scores_the_first_token_on_the_server(standin, model_dir):
    from afrl_fast.data import synthesize
    from afrl_fast.prompt_encoding import PromptEncoder
    from afrl_fast.scoring import EngineFirstTokenScorer
    from afrl_fast.format import label_token_ids, load_tokenizer
    from afrl_fast.rulebook import load_rulebook

    tok, rb = load_tokenizer(), load_rulebook()
    eng = engine_for(standin, model_dir)
    table = synthesize(5, seed=4, split="industry")
    scorer = EngineFirstTokenScorer(eng, tok, rb, instructions="x", batch_size=2)
    probs = scorer.score_pairs(table)
    ids = PromptEncoder(tok, rb, "x").prompt_ids(table.column("query").to_pylist(),
                                                 table.column("document").to_pylist())
    labels = label_token_ids(tok)
    for row, prompt in zip(probs, ids):        # softmax of the server's five log-probs, in label order
        logp = -5 * np.random.default_rng(prompt).random(5)
        np.testing.assert_allclose(row, np.exp(logp) / np.exp(logp).sum(), rtol=1e-12)
    bodies = [b for k, b in standin.calls if k == "generate"]
    assert len(bodies) == 3 and all(b["token_ids_logprob"] == labels and b["logprob_start_len"] == -1 for b in bodies)


def test_abort_is_an_error_not_a_length_cut():
    out = {"meta_info": {"output_token_logprobs": [[-0.1, 3, None]], "finish_reason": {"type": "abort",
                                                                                      "message": "out of memory"}}}
    with pytest.raises(RS.SGLangError, match="out of memory"):
        RS.parse_output(out)
    assert RS.parse_output({"meta_info": {"output_token_logprobs": [[-0.5, 9, None]],
                                          "finish_reason": {"type": "length"}}}) == ([9], [-0.5], False)


def test_sync_follows_the_session_protocol_in_the_low_peak_order(standin, model_dir):
    eng = engine_for(standin, model_dir, settings={"bucket_bytes": 1 << 20},
                     memory=lambda stage, empty=True: standin.calls.append(("mem", (stage, empty))))
    assert standin.calls[:2] == [("mem", ("launch", True)), ("mem", ("started", False))]
    model = tiny_model()
    eng.generate_groups([[1, 2]], group_size=2, max_new_tokens=4, seeds=[3])
    eng.release_memory()
    assert standin.calls[-2:] == [("release", ALL_TAGS), ("mem", ("released", False))]
    standin.calls.clear()
    eng.sync_weights(model)
    kinds = [k for k, _ in standin.calls]
    n_updates = kinds.count("update")
    assert kinds == ["mem", "resume", "begin"] + ["update"] * n_updates + ["flush", "end", "mem", "resume", "mem"]
    # the trainer's cache is emptied right before each resume: weights first, then the KV cache and graphs
    assert standin.calls[0][1] == ("resume weights", True) and standin.calls[1][1] == ["weights"]
    assert standin.calls[-3][1] == ("resume kv_cache", True) and standin.calls[-2][1] == ["kv_cache", "cuda_graph"]
    assert standin.calls[-1][1] == ("resumed", False)
    sent = [name for name, _ in standin.loaded[0]]
    assert sent == [n for n, _ in model.named_parameters()]                         # every weight, once, in order
    sizes = [p.numel() * p.element_size() for _, p in model.named_parameters()]
    assert n_updates == expected_buckets(sizes, 1 << 20)
    assert all(not body["flush_cache"] for k, body in standin.calls if k == "update")
    assert not standin.session and not standin.released
    standin.calls.clear()                      # not released: no resume, nothing to free
    eng.sync_weights(model)
    assert "mem" not in [k for k, _ in standin.calls] and "resume" not in [k for k, _ in standin.calls]


def expected_buckets(sizes, limit):
    count, size = 0, 0
    for s in sizes:
        if count == 0 or size + s > limit:
            count, size = count + 1, 0
        size += s
    return count


def test_a_refused_update_raises_with_sglangs_message(standin, model_dir):
    eng = engine_for(standin, model_dir)
    standin.refuse_updates = True
    with pytest.raises(RS.SGLangError, match="shape mismatch"):
        eng.sync_weights(tiny_model())
    # outside a session SGLang refuses too, and the engine reports it instead of training on stale weights
    standin.refuse_updates, standin.session = False, False
    with pytest.raises(RS.SGLangError, match="between begin_weight_update"):
        eng.post("/update_weights_from_tensor", {"serialized_named_tensors": ["[]"], "flush_cache": False})


# ----------------------------------------------------------------------------------------------
# Issue 25: GPU memory around the server, per-rank handles, error bodies, seeds, shared run folder
# ----------------------------------------------------------------------------------------------

def run_on_fake_gpu(monkeypatch, model_dir, model, memory):
    """One engine through launch, rollouts, release, a training step and a weight sync on a FakeGPU
    shared like a real colocated one: 80 GiB; the trainer's live state 20 GiB, and SFT left 30 GiB in
    its cache; the model 16 GiB; --mem-fraction-static 0.75; the step's peak refills the cache (50
    GiB); the sync's gathered full tensors (16 GiB in all) stay in the cache. torch.cuda is this
    GPU. (gpu, the KV pool the server sized, the error the sync raised or None)."""
    gpu = FakeGPU(80 * GiB, trainer_live=20 * GiB)
    gpu.install(monkeypatch)
    gpu.grow_cache(30 * GiB)
    numel = sum(p.numel() for p in model.parameters())
    srv = StandInSGLang(gpu=gpu)
    try:
        kw = {} if memory is None else {"memory": memory}
        eng = engine_for(srv, model_dir, settings={"mem_fraction_static": 0.75, "bucket_bytes": 1 << 20},
                         server_factory=srv.launch(weights=16 * GiB, cuda_graph=1 * GiB),
                         codec=JsonCodec(on_handle=lambda t: gpu.grow_cache(16 * GiB * t.numel() // numel)), **kw)
        kv = srv.sizes["kv_cache"]
        eng.generate_groups([[1, 2]], group_size=2, max_new_tokens=4, seeds=[3])
        eng.release_memory()
        gpu.grow_cache(50 * GiB)
        try:
            eng.sync_weights(model)
        except RS.SGLangError as e:
            return gpu, kv, e
        return gpu, kv, None
    finally:
        srv.stop()


def test_the_trainers_cache_is_freed_before_sglang_sizes_or_resumes_memory(monkeypatch, model_dir, caplog):
    """With the default memory hook (gpu_memory) the KV pool is sized from the 60 GiB free once the
    cache is emptied (29 GiB, not 6.5), and after the training step both resumes fit: the weights
    (16 GiB) after the first emptying, the KV cache and graphs (30 GiB) after the second one, which
    returns the gathered full tensors. The control without freeing gets SGLang's own out-of-memory
    message in the raised error."""
    monkeypatch.setattr(RS, "check_sglang_version", lambda installed=None: "0.5.23")
    model = tiny_model()                       # before torch.cuda is replaced
    with caplog.at_level(logging.INFO, logger="afrl_fast"):
        gpu, kv, err = run_on_fake_gpu(monkeypatch, model_dir, model, None)
    assert err is None and kv == int(0.75 * 60 * GiB - 16 * GiB)
    assert gpu.sglang == {"weights": 16 * GiB, "kv_cache": kv, "cuda_graph": GiB} and gpu.cached == 0
    # each freeing: synchronize, collect CUDA-IPC blocks, empty the cache, then read what is free
    assert gpu.calls[:4] == ["synchronize", "ipc_collect", "empty_cache", "mem_get_info"]
    assert gpu.calls.count("empty_cache") == 3                 # at launch, before each resume
    logged = [r.getMessage() for r in caplog.records if r.getMessage().startswith("SGLang ")]
    assert logged[0] == "SGLang launch: cuda:0 has 60.00 GiB free of 80.00 GiB"
    assert [m.split(":")[0] for m in logged] == ["SGLang launch", "SGLang started", "SGLang released",
                                                 "SGLang resume weights", "SGLang resume kv_cache", "SGLang resumed"]
    # the control: nothing freed -> a smaller pool at start, then SGLang's OOM text in the raised error
    _, small_kv, err = run_on_fake_gpu(monkeypatch, model_dir, model, lambda stage, empty=True: None)
    assert small_kv == int(0.75 * 30 * GiB - 16 * GiB)
    assert isinstance(err, RS.SGLangError) and "/resume_memory_occupation failed (400): CUDA out of memory" in str(err)


def test_gpu_memory_frees_in_order_and_is_a_no_op_without_cuda(monkeypatch):
    calls = []
    for name in ("synchronize", "ipc_collect", "empty_cache", "mem_get_info", "current_device"):
        monkeypatch.setattr(torch.cuda, name, lambda *a, _n=name: calls.append(_n) or ((3 * GiB, 8 * GiB)
                                                                                  if _n == "mem_get_info" else 0))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: False)     # CUDA never used: nothing to free
    assert RS.gpu_memory("launch") is None and calls == []
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: True)
    assert RS.gpu_memory("launch") == (3 * GiB, 8 * GiB)
    assert calls == ["synchronize", "ipc_collect", "empty_cache", "mem_get_info", "current_device"]
    calls.clear()
    assert RS.gpu_memory("started", empty=False) == (3 * GiB, 8 * GiB) and "empty_cache" not in calls
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    calls.clear()
    assert RS.gpu_memory("launch") is None and calls == []


def two_rank_group(standin, model_dir, group, log, follower_delay=0.3):
    """A leader (rank 4, GPU 0) and a follower (rank 5, GPU 1) of one tp_size=2 server, as threads.
    Memory stages go into the stand-in's call log; the follower's freeing is slow, so a leader that
    does not wait for it shows up in the order."""
    def memory_for(rank):
        def memory(stage, empty=True):
            if empty and rank == 5:
                time.sleep(follower_delay)
            log.append(("mem", (rank, stage)))
        return memory

    def make(i):
        rank = 4 + i
        return lambda: engine_for(standin, model_dir, rank=rank, local_rank=i, local_world=2, settings={"tp_size": 2},
                                  barrier=group.barrier, comm=group.comm(i), codec=JsonCodec(rank=rank, gpu=i),
                                  memory=memory_for(rank),
                                  server_factory=lambda *a: log.append(("launch", a[0])) or NoServer(*a))
    return make


def test_each_tp_worker_opens_the_handle_of_its_own_gpu(monkeypatch, model_dir):
    monkeypatch.setattr(RS, "check_sglang_version", lambda installed=None: "0.5.23")
    log = []
    srv = StandInSGLang(tp_size=2, calls=log)
    try:
        group = ThreadGroup(2)
        make = two_rank_group(srv, model_dir, group, log)
        leader, follower = group.run([make(0), make(1)])
        assert leader.place.is_leader and leader.server is not None and follower.server is None
        cmd = leader.server.args[0]
        assert cmd[cmd.index("--tp-size") + 1] == "2" and cmd[cmd.index("--base-gpu-id") + 1] == "0"
        assert "--enable-deterministic-inference" in cmd and "--enable-memory-saver" in cmd
        # every rank of the group freed its cache before the server sized its pool
        assert log.index(("mem", (5, "launch"))) < log.index(("launch", cmd))
        models = [tiny_model(), tiny_model()]
        follower.generate_groups([[1]], group_size=2, max_new_tokens=3, seeds=[1])
        group.run([leader.release_memory, follower.release_memory])
        log.clear()
        assert group.run([lambda: leader.sync_weights(models[0]), lambda: follower.sync_weights(models[1])]) == [None, None]
        names = [n for n, _ in models[0].named_parameters()]
        for r in (0, 1):                       # worker r got rank 4+r's copy, on GPU r, of every weight
            assert [n for n, _ in srv.loaded[r]] == names
            assert {(h["rank"], h["gpu"]) for _, h in srv.loaded[r]} == {(4 + r, r)}
        kinds = [k for k, _ in log]
        assert kinds.count("resume") == 2 and kinds.count("begin") == 1      # the follower sends no admin call
        for stage, tags in (("resume weights", ["weights"]), ("resume kv_cache", ["kv_cache", "cuda_graph"])):
            assert log.index(("mem", (5, stage))) < log.index(("resume", tags))   # the slow follower first
        # a refusal reaches the follower too (it would otherwise walk on into the next collective)
        srv.refuse_updates = True
        out = group.run([lambda: leader.sync_weights(models[0]), lambda: follower.sync_weights(models[1])])
        assert all(isinstance(e, RS.SGLangError) and "shape mismatch" in str(e) for e in out), out
    finally:
        srv.stop()


def test_handles_are_grouped_per_tensor_in_tp_rank_order():
    gathered = [[("a", "a0"), ("b", "b0")], [("a", "a1"), ("b", "b1")], [("a", "a2"), ("b", "b2")]]
    assert RS.per_tensor_handles(gathered) == [("a", ["a0", "a1", "a2"]), ("b", ["b0", "b1", "b2"])]
    with pytest.raises(RS.SGLangError, match="rank 1"):
        RS.per_tensor_handles([[("a", 0), ("b", 0)], [("b", 1), ("a", 1)]])


def fake_sglang(monkeypatch, log):
    """The three SGLang names SGLangCodec uses, recording their use."""
    class Serializer:
        @staticmethod
        def serialize(obj, output_str=False):
            log.append(("serialize", output_str))
            return f"b64:{obj!r}" if output_str else b"ipc"

    class LocalSerializedTensor:
        def __init__(self, values):
            self.values = values

        def __repr__(self):
            return f"LST{self.values}"

    modules = {"sglang": {}, "sglang.srt": {}, "sglang.srt.utils": {"MultiprocessingSerializer": Serializer},
               "sglang.srt.utils.patch_torch": {"monkey_patch_torch_reductions": lambda: log.append("patch")},
               "sglang.srt.model_executor": {}, "sglang.srt.model_executor.model_runner_components": {},
               "sglang.srt.model_executor.model_runner_components.weight_updater":
                   {"LocalSerializedTensor": LocalSerializedTensor}}
    for name, attrs in modules.items():
        mod = types.ModuleType(name)
        mod.__dict__.update(attrs)
        monkeypatch.setitem(sys.modules, name, mod)


def test_sglang_codec_patches_reductions_first_and_wraps_handles_like_sglang(monkeypatch):
    log = []
    fake_sglang(monkeypatch, log)
    codec = RS.SGLangCodec()
    assert log == ["patch"]                    # device UUIDs before any handle is made
    assert codec.handle(torch.zeros(2)) == b"ipc"
    payloads = codec.pack([("w", ["h0", "h1"]), ("b", ["g0", "g1"])], 2)
    assert payloads == ["b64:[('w', LST['h0', 'h1']), ('b', LST['g0', 'g1'])]"] * 2
    assert log == ["patch", ("serialize", False), ("serialize", True)]


def test_tp_groups_over_torch_distributed_route_handles_and_check_the_run_folder(tmp_path):
    """Four trainer processes (gloo), two engine groups of tp_size=2 on one node, each with its
    stand-in server: the default group comm gathers to each group's leader, and TP worker r of each
    server gets its group's rank r handles. Then the run-folder check over the same process group:
    one shared folder passes; ranks 2-3 on a "second node" that sees another folder fail, every rank
    with the same one line."""
    ports = consecutive_free_ports()
    servers = [StandInSGLang(tp_size=2, base_gpu_id=2 * g, port=ports + g) for g in range(2)]
    worker = tmp_path / "worker.py"
    worker.write_text(textwrap.dedent(f"""
        import json, os, sys
        import torch, torch.distributed as dist
        import afrl_fast.engines.sglang as RS
        import afrl_fast.engines.sglang_server as SS
        from afrl_fast.config import ConfigError, SGLangConfig

        class JsonCodec:                       # as in the test module (not imported: it pulls in FastAPI)
            def __init__(self, rank, gpu):
                self.rank, self.gpu = rank, gpu
            def handle(self, tensor):
                return {{"rank": self.rank, "gpu": self.gpu, "numel": tensor.numel()}}
            def pack(self, named_handles, tp_size):
                return [json.dumps(named_handles)] * tp_size

        class NoServer:
            def __init__(self, *args):
                self.args = args
            def shutdown(self):
                pass

        rank, local = int(os.environ["RANK"]), int(os.environ["LOCAL_RANK"])
        dist.init_process_group("gloo")
        RS.check_sglang_version = lambda installed=None: "0.5.23"
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Linear(3, 2))
        eng = RS.SGLangEngine({str(tmp_path / 'run' / 'engine_init')!r}, settings=SGLangConfig(tp_size=2, port={ports}),
                              rank=rank, local_rank=local, local_world=4, eos_ids=[7], barrier=dist.barrier,
                              server_factory=NoServer, codec=JsonCodec(rank, local))
        eng.release_memory()
        eng.sync_weights(model)
        out = {{"leader": eng.place.is_leader}}
        SS.check_shared_run_dir({str(tmp_path / 'run')!r}, host=f"node{{rank // 2}}")
        folder = {str(tmp_path)!r} + ("/run" if rank < 2 else "/node1_run")
        try:
            SS.check_shared_run_dir(folder, host=f"node{{rank // 2}}", wait_s=1)
        except ConfigError as e:
            out["error"] = str(e)
        json.dump(out, open({str(tmp_path)!r} + f"/out{{rank}}.json", "w"))
        dist.destroy_process_group()
    """))
    (tmp_path / "run" / "engine_init").mkdir(parents=True)
    (tmp_path / "run" / "engine_init" / "config.json").write_text("{}")
    (tmp_path / "node1_run").mkdir()
    master = free_port()
    procs = []
    try:
        for rank in range(4):
            env = {**os.environ, "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": "4", "LOCAL_WORLD_SIZE": "4",
                   "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(master), "OMP_NUM_THREADS": "1",
                   "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
            procs.append(subprocess.Popen([sys.executable, str(worker)], env=env, stdout=subprocess.PIPE,
                                          stderr=subprocess.STDOUT, text=True))
        logs = [p.communicate(timeout=180)[0] for p in procs]
        assert all(p.returncode == 0 for p in procs), "\n".join(logs)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
        for srv in servers:
            srv.stop()
    outs = [json.loads((tmp_path / f"out{r}.json").read_text()) for r in range(4)]
    assert [o["leader"] for o in outs] == [True, False, True, False]
    torch.manual_seed(0)
    names = [n for n, _ in torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Linear(3, 2)).named_parameters()]
    for g, srv in enumerate(servers):
        assert [k for k, _ in srv.calls].count("update") == 1
        for r in (0, 1):
            assert [n for n, _ in srv.loaded[r]] == names
            assert {(h["rank"], h["gpu"]) for _, h in srv.loaded[r]} == {(2 * g + r, 2 * g + r)}
    errors = {o.get("error") for o in outs}
    assert len(errors) == 1 and None not in errors                      # the same line on every rank
    (error,) = errors
    assert "rank 2 on node1" in error and "rank 3 on node1" in error and "rank 1 " not in error
    assert "shared filesystem" in error
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == ["engine_init"]   # the token is cleaned up


def consecutive_free_ports() -> int:
    import socket

    for _ in range(50):
        base = free_port()
        try:
            with socket.socket() as s:
                s.bind(("127.0.0.1", base + 1))
            return base
        except OSError:
            continue
    raise RuntimeError("no two consecutive free ports")


def test_sglangs_error_text_is_kept_whatever_the_shape(standin, model_dir):
    eng = engine_for(standin, model_dir)
    with pytest.raises(RS.SGLangError, match=r"/generate failed \(400\): top_p must be in \(0, 1\], got 0.0\.$"):
        eng.generate_groups([[1, 2]], group_size=2, top_p=0.0, max_new_tokens=3, seeds=[1])
    with pytest.raises(RS.SGLangError, match=r"\(400\): input_ids: expected an array of token ids"):
        eng.post("/generate", {"input_ids": [["a"]], "sampling_params": {"max_new_tokens": 1}})
    standin.fail_flush = "Flush cache failed: there are running requests.\n"
    with pytest.raises(RS.SGLangError, match=r"/flush_cache failed \(400\): Flush cache failed: there are running"):
        eng.sync_weights(tiny_model())


@pytest.mark.parametrize("body, headers, want", [
    ({"success": False, "message": "no session"}, None, "no session"),
    ({"error": {"message": "CUDA out of memory.\n Tried"}}, None, "CUDA out of memory. Tried"),
    ({"error": "input_ids: bad"}, None, "input_ids: bad"),
    ({"detail": [{"loc": ["body", "tags"], "msg": "Input should be a valid list"}]}, None, "Input should be a valid list"),
    ({"object": "error"}, None, '{"object": "error"}'),
    ("Internal Server Error", {"content-type": "text/plain"}, "Internal Server Error"),
    (None, {"content-type": "text/plain"}, "Bad Request"),
])
def test_error_text_reads_every_answer_shape(body, headers, want):
    if isinstance(body, dict):
        resp = httpx.Response(400, json=body)
    else:
        resp = httpx.Response(400, content=(body or "").encode(), headers=headers)
    assert want in RS.error_text(resp) and "\n" not in RS.error_text(resp)


def test_serving_backend_says_whether_seeds_reproduce(monkeypatch, tmp_path, caplog):
    """SGLangBackend starts SGLang's engine without deterministic inference unless asked: seeded
    completions then do not reproduce, and start-up says so; asked, the engine gets the flag."""
    from afrl_fast.serve.cli import parse_engine_args
    from afrl_fast.serve.backends import SGLangBackend

    # the vocabulary of the Qwen3 tokenizer the backend falls back to (it refuses a smaller model)
    Qwen3Config(vocab_size=151936, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                num_key_value_heads=1, head_dim=16).save_pretrained(tmp_path)
    engines = []
    fake = types.ModuleType("sglang")
    fake.Engine = lambda **kw: engines.append(kw) or types.SimpleNamespace(shutdown=lambda: None)
    monkeypatch.setitem(sys.modules, "sglang", fake)
    monkeypatch.setattr("afrl_fast.serve.backends.check_sglang_version", lambda installed=None: "0.5.23")
    with caplog.at_level(logging.WARNING, logger="afrl_fast.serve"):
        fast = SGLangBackend(str(tmp_path), None, engine_kwargs={"tp_size": 1})
    assert not fast.seeds_reproduce and engines[-1] == {"model_path": str(tmp_path), "tp_size": 1}
    assert any("seeded completions do not reproduce" in r.getMessage() for r in caplog.records)
    caplog.clear()
    asked = parse_engine_args(["enable-deterministic-inference=true"])     # --sglang-arg, as the service parses it
    with caplog.at_level(logging.WARNING, logger="afrl_fast.serve"):
        seeded = SGLangBackend(str(tmp_path), None, engine_kwargs=asked)
    assert seeded.seeds_reproduce and engines[-1] == {"model_path": str(tmp_path), "enable_deterministic_inference": True}
    assert not any("do not reproduce" in r.getMessage() for r in caplog.records)


def test_the_rollout_server_starts_with_deterministic_inference(standin, model_dir):
    """The trainer's server honours the per-sample seeds: deterministic inference is on its command
    line, and SGLang's ServerArgs knows the flag (where SGLang is importable)."""
    eng = engine_for(standin, model_dir)
    assert "--enable-deterministic-inference" in eng.server.args[0]
    try:
        from sglang.srt.server_args import ServerArgs
    except Exception as e:
        pytest.skip(f"sglang's ServerArgs is not importable here: {type(e).__name__}: {e}")
    assert "enable_deterministic_inference" in ServerArgs.__dataclass_fields__


def test_a_leader_that_cannot_see_the_exported_model_says_so_in_one_line(standin, tmp_path, monkeypatch):
    with pytest.raises(RS.SGLangError, match=r"no exported model here on host .*every node shares$"):
        engine_for(standin, tmp_path / "elsewhere" / "engine_init")
    # a relative run folder reaches the server (its own process) as an absolute path
    monkeypatch.chdir(tmp_path)
    (tmp_path / "run" / "engine_init").mkdir(parents=True)
    (tmp_path / "run" / "engine_init" / "config.json").write_text("{}")
    eng = engine_for(standin, "run/engine_init")
    cmd = eng.server.args[0]
    assert cmd[cmd.index("--model-path") + 1] == str(tmp_path / "run" / "engine_init")


def test_the_run_folder_check_sees_a_node_local_folder(tmp_path):
    shared, local = tmp_path / "shared", tmp_path / "node1"
    shared.mkdir()
    local.mkdir()
    group = ThreadGroup(2)

    def check(i, folder):
        return lambda: SS.check_shared_run_dir(folder, all_gather=lambda obj: group.all_gather(i, obj), rank=i,
                                               host=f"node{i}", wait_s=0.6)
    assert group.run([check(0, shared), check(1, shared)]) == [None, None]
    assert list(shared.iterdir()) == []
    (local / SS.SHARED_MARK).write_text("a token of another run")      # a stale token does not pass
    out = group.run([check(0, shared), check(1, local)])
    assert all(isinstance(e, ConfigError) for e in out) and str(out[0]) == str(out[1])
    assert "rank 1 on node1" in str(out[0]) and "rank 0 on node0" in str(out[0])
    assert f"run.out_dir={shared}" in str(out[0])
    assert SS.check_shared_run_dir(shared) is None                       # one process: nothing to check

    def late_copy():                           # a filesystem that shows rank 0's file a moment later
        for _ in range(100):
            if (shared / SS.SHARED_MARK).exists():
                time.sleep(0.3)
                (local / SS.SHARED_MARK).write_text((shared / SS.SHARED_MARK).read_text())
                return
            time.sleep(0.02)
    copier = threading.Thread(target=late_copy)
    copier.start()
    assert group.run([check(0, shared), lambda: SS.check_shared_run_dir(
        local, all_gather=lambda obj: group.all_gather(1, obj), rank=1, host="node1", wait_s=5)]) == [None, None]
    copier.join()


def test_train_checks_the_run_folder_first_when_the_engine_is_sglang(monkeypatch, tmp_path, capsys):
    from afrl_fast import train

    seen = []

    def refuse(run_dir, **kw):
        seen.append(Path(run_dir))
        raise ConfigError("run.out_dir=x is not one folder every node shares")
    monkeypatch.setattr(train, "check_shared_run_dir", refuse)
    assert train.main([f"run.out_dir={tmp_path / 'run'}", "run.engine=sglang"]) == 2
    assert seen == [tmp_path / "run"]
    assert capsys.readouterr().err.strip() == "error: run.out_dir=x is not one folder every node shares"


@pytest.mark.parametrize("rank, local_rank, local_world, tp, want", [
    (0, 0, 8, 4, (0, 0, True, 0)), (3, 3, 8, 4, (0, 0, False, 0)), (6, 6, 8, 4, (1, 4, False, 4)), (4, 4, 8, 4, (1, 4, True, 4)),
    (13, 5, 8, 2, (2, 12, False, 4)), (9, 1, 8, 8, (0, 8, False, 0)),
])
def test_placement_groups_consecutive_ranks_of_a_node(rank, local_rank, local_world, tp, want):
    p = RS.placement(rank, local_rank, local_world, tp, 30000)
    assert (p.group, p.leader, p.is_leader, p.base_gpu_id) == want and p.port == 30000 + p.group


def test_placement_rejects_a_tp_size_that_does_not_divide_the_node():
    with pytest.raises(RS.SGLangError, match="tp_size=3"):
        RS.placement(0, 0, 8, 3, 30000)


@pytest.mark.parametrize("version, ok", [("0.5.21", True), ("0.5.23", True), ("0.5.23.post1", True),
                                         ("0.5.20", False), ("0.5.24", False), ("0.4.0", False),
                                         ("0.5.6", False), ("banana", False)])
def test_version_guard(version, ok):
    if ok:
        assert RS.check_sglang_version(version) == version
    else:
        with pytest.raises(RS.SGLangError, match="not supported"):
            RS.check_sglang_version(version)


def test_missing_sglang_is_one_clear_line(monkeypatch):
    import importlib.metadata as md

    def missing(name):
        raise md.PackageNotFoundError(name)
    monkeypatch.setattr(md, "version", missing)
    with pytest.raises(RS.SGLangError, match=r"pip install 'afrl-fast\[sglang\]'"):
        RS.check_sglang_version()


def test_server_shutdown_ends_its_process_group_only(tmp_path):
    """A stand-in `launch_server` that forks a worker, like SGLang's scheduler processes; shutting it
    down ends both, and a process the trainer started itself lives on."""
    port = free_port()
    script = tmp_path / "fake_server.py"
    script.write_text(textwrap.dedent(f"""
        import http.server, subprocess, sys
        worker = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
        open({str(tmp_path / 'worker.pid')!r}, "w").write(str(worker.pid))
        class H(http.server.BaseHTTPRequestHandler):
            def do_GET(self):
                self.send_response(200); self.end_headers()
            def log_message(self, *a): pass
        http.server.HTTPServer(("127.0.0.1", {port}), H).serve_forever()
    """))
    bystander = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
    try:
        server = RS.SGLangServer([sys.executable, str(script)], f"http://127.0.0.1:{port}", tmp_path / "log",
                                 timeout_s=60)
        worker = int((tmp_path / "worker.pid").read_text())
        server.shutdown(grace_s=10)
        assert server.proc.poll() is not None
        for _ in range(100):
            if not alive(worker):
                break
            time.sleep(0.05)
        assert not alive(worker)
        assert bystander.poll() is None
    finally:
        bystander.kill()
        bystander.wait()


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    with open(f"/proc/{pid}/stat") as f:       # a zombie is not running
        return f.read().split(")")[-1].split()[0] != "Z"


def test_a_server_that_dies_at_startup_is_one_line(tmp_path):
    with pytest.raises(RS.SGLangError, match="exited with code 3"):
        RS.SGLangServer([sys.executable, "-c", "raise SystemExit(3)"], f"http://127.0.0.1:{free_port()}",
                        tmp_path / "log", timeout_s=30)


@pytest.mark.parametrize("override, key", [("rl.sglang.tp_size=0", "rl.sglang.tp_size"),
                                           ("rl.sglang.mem_fraction_static=1.5", "mem_fraction_static"),
                                           ("rl.sglang.dtype=int4", "rl.sglang.dtype")])
def test_config_section_is_checked(override, key):
    with pytest.raises(ConfigError, match=key):
        load_config(None, [override])


def test_gpu_recipe_holds_the_model_once_per_tensor_parallel_group():
    cfg = load_config(str(Path(__file__).resolve().parents[1] / "configs" / "gpu_qwen3.yaml"), [])
    assert cfg.run.engine == "sglang" and cfg.rl.sglang.tp_size >= 4 and cfg.rl.sglang.enable_memory_saver


# ----------------------------------------------------------------------------------------------
# SGLang's own request objects (only where the package is importable)
# ----------------------------------------------------------------------------------------------

def _sglang_objects():
    try:
        from sglang.srt.managers.io_struct import GenerateReqInput
        from sglang.srt.sampling.sampling_params import SamplingParams
    except Exception as e:     # not installed here (a GPU extra), or its imports need a GPU stack
        pytest.skip(f"sglang's request objects are not importable here: {type(e).__name__}: {e}")
    return GenerateReqInput, SamplingParams


def test_payloads_pass_sglangs_own_validation():
    GenerateReqInput, SamplingParams = _sglang_objects()
    payload = RS.generate_payload([[1, 2, 3], [4]], 3, 1.0, 0.9, 16, [EOS], [5, 6])
    req = GenerateReqInput(**payload)
    req.normalize_batch_and_arguments()
    assert req.batch_size == 6
    for p in payload["sampling_params"]:
        sp = SamplingParams(**p)
        sp.normalize(None)
        sp.verify(VOCAB)
    pre = GenerateReqInput(**RS.prefill_payload([[1, 2, 3], [4]]))
    pre.normalize_batch_and_arguments()
