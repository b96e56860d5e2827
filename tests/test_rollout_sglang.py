"""SGLang rollouts (afrl_fast.rollout_sglang) against a stand-in server faithful to SGLang's HTTP
semantics as read in its released code (0.5.21, 0.5.23): a list of per-request sampling params;
seeds honoured per request under deterministic inference (and shared by the n copies of one request);
`(success, message)` answers with HTTP 400 on failure; weight updates refused outside a
begin/end session; memory released and resumed by tags. Where the `sglang` package is importable,
the payloads are also validated by SGLang's own request objects (skipped with a reason otherwise).
"""
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse
from transformers import Qwen3Config, Qwen3ForCausalLM

import afrl_fast.rollout_sglang as RS
from afrl_fast.config import ConfigError, SGLangConfig, load_config
from afrl_fast.rollout import make_engine

sys.path.insert(0, str(Path(__file__).parent))
from serving import free_port  # noqa: E402

VOCAB, EOS = 64, 7


class StandInSGLang:
    """An SGLang server's HTTP surface with its real rules, in a thread; records every call."""

    def __init__(self, refuse_updates: bool = False):
        self.calls, self.session, self.released = [], False, set()
        self.refuse_updates = refuse_updates
        self.loaded = []
        app = FastAPI()

        def fail(message):
            return JSONResponse({"success": False, "message": message}, status_code=400)

        @app.get("/health")
        async def health():
            return {}

        @app.post("/generate")
        async def generate(request: Request):
            body = await request.json()
            self.calls.append(("generate", body))
            ids, params = body["input_ids"], body["sampling_params"]
            params = params if isinstance(params, list) else [params] * len(ids)
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
            self.loaded.append(body["serialized_named_tensors"])
            return {"success": True, "message": "Success"}

        @app.post("/flush_cache")
        async def flush():
            self.calls.append(("flush", None))
            return PlainTextResponse("Cache flushed.\n")

        @app.post("/release_memory_occupation")
        async def release(request: Request):
            tags = (await request.json()).get("tags") or ["weights", "kv_cache", "cuda_graph"]
            self.calls.append(("release", tags))
            self.released |= set(tags)
            return None

        @app.post("/resume_memory_occupation")
        async def resume(request: Request):
            tags = (await request.json()).get("tags") or ["weights", "kv_cache", "cuda_graph"]
            self.calls.append(("resume", tags))
            self.released -= set(tags)
            return None

        self.port = free_port()
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="error"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        while not self.server.started:
            time.sleep(0.05)

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


def names_serializer(bucket, tp_size):
    return [[name for name, _ in bucket]] * tp_size


@pytest.fixture
def standin(monkeypatch):
    monkeypatch.setattr(RS, "check_sglang_version", lambda installed=None: "0.5.23")
    srv = StandInSGLang()
    yield srv
    srv.stop()


def engine_for(srv, **kw):
    settings = SGLangConfig(port=srv.port, **kw.pop("settings", {}))
    return make_engine("sglang", model_path="/models/m", settings=settings, eos_ids=[EOS], server_factory=NoServer,
                       serializer=names_serializer, **kw)


def tiny_model():
    torch.manual_seed(0)
    return Qwen3ForCausalLM(Qwen3Config(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                        num_attention_heads=2, num_key_value_heads=1, head_dim=16,
                                        tie_word_embeddings=True))


# ----------------------------------------------------------------------------------------------

def test_groups_get_distinct_seeds_and_share_a_prefilled_prompt(standin):
    eng = engine_for(standin)
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


def test_evaluation_scores_the_first_token_on_the_server(standin):
    from afrl_fast.data import synthesize
    from afrl_fast.evaluate import EngineFirstTokenScorer, PromptEncoder
    from afrl_fast.format import label_token_ids, load_tokenizer
    from afrl_fast.rulebook import load_rulebook

    tok, rb = load_tokenizer(), load_rulebook()
    eng = engine_for(standin)
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


def test_sync_follows_the_session_protocol_in_the_low_peak_order(standin):
    eng = engine_for(standin, settings={"bucket_bytes": 1 << 20})
    model = tiny_model()
    eng.generate_groups([[1, 2]], group_size=2, max_new_tokens=4, seeds=[3])
    eng.release_memory()
    standin.calls.clear()
    eng.sync_weights(model)
    kinds = [k for k, _ in standin.calls]
    n_updates = kinds.count("update")
    assert kinds == ["resume", "begin"] + ["update"] * n_updates + ["flush", "end", "resume"]
    assert standin.calls[0][1] == ["weights"] and standin.calls[-1][1] == ["kv_cache", "cuda_graph"]
    sent = [name for payload in standin.loaded for name in payload[0]]
    assert sent == [n for n, _ in model.named_parameters()]                         # every weight, once, in order
    sizes = [p.numel() * p.element_size() for _, p in model.named_parameters()]
    assert n_updates == expected_buckets(sizes, 1 << 20)
    assert all(not body["flush_cache"] for k, body in standin.calls if k == "update")
    assert not standin.session and not standin.released


def expected_buckets(sizes, limit):
    count, size = 0, 0
    for s in sizes:
        if count == 0 or size + s > limit:
            count, size = count + 1, 0
        size += s
    return count


def test_a_refused_update_raises_with_sglangs_message(standin):
    eng = engine_for(standin)
    standin.refuse_updates = True
    with pytest.raises(RS.SGLangError, match="shape mismatch"):
        eng.sync_weights(tiny_model())
    # outside a session SGLang refuses too, and the engine reports it instead of training on stale weights
    standin.refuse_updates, standin.session = False, False
    with pytest.raises(RS.SGLangError, match="between begin_weight_update"):
        eng.post("/update_weights_from_tensor", {"serialized_named_tensors": [[]], "flush_cache": False})


def test_followers_send_prompts_but_leave_the_server_to_the_leader(standin):
    eng = engine_for(standin, rank=5, local_rank=1, local_world=2, settings={"tp_size": 2})
    assert eng.server is None and not eng.place.is_leader
    eng.generate_groups([[1]], group_size=2, max_new_tokens=3, seeds=[1])
    eng.release_memory()
    eng.sync_weights(tiny_model())
    assert {k for k, _ in standin.calls} == {"generate"}
    leader = engine_for(standin, rank=4, local_rank=0, local_world=2, settings={"tp_size": 2})
    assert isinstance(leader.server, NoServer)
    cmd = leader.server.args[0]
    assert cmd[cmd.index("--tp-size") + 1] == "2" and cmd[cmd.index("--base-gpu-id") + 1] == "0"
    assert "--enable-deterministic-inference" in cmd and "--enable-memory-saver" in cmd


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
