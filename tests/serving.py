"""Shared by the tests that talk to servers: a real `python -m afrl_fast.serve` in a subprocess on a
free loopback port; a tiny judge that has learnt one pair's trace by heart, so that what it serves
passes the verifier (a random tiny model never writes a valid trace); and a scripted
OpenAI-compatible server for fault paths.
"""
import asyncio
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import torch
import transformers
import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

from afrl_fast.format import build_prompt, instructions_text, load_tokenizer, save_prompt_settings
from afrl_fast.loss import fused_loss
from afrl_fast.rulebook import load_rulebook

MEMORIZER = dict(vocab_size=151936, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2, head_dim=16, tie_word_embeddings=True,
                 max_position_embeddings=2048)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """`python -m afrl_fast.serve` on 127.0.0.1 in a subprocess; output goes to a file."""

    def __init__(self, model_dir, log_path, *flags):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = log_path
        self.log = open(log_path, "w")
        # one torch thread: on a small shared machine two spin-waiting OpenMP threads stall each other
        self.proc = subprocess.Popen([sys.executable, "-m", "afrl_fast.serve", "--model", str(model_dir),
                                      "--port", str(self.port), "--threads", "1", *flags],
                                     stdout=self.log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}:\n{Path(log_path).read_text()}")
            try:
                if httpx.get(self.url + "/health", timeout=1).status_code == 200:
                    return
            except httpx.TransportError:
                time.sleep(0.2)
        self.stop()
        raise RuntimeError(f"server did not come up:\n{Path(log_path).read_text()}")

    def stop(self):
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()


class Scripted:
    """A scripted OpenAI-compatible completions server (fault paths only): uvicorn in a thread; `reply(n, body)` gives (status, completion texts, finish reasons) for the
    n-th request (0-based), or None: that request hangs, never answered while the server runs (it
    is let go, with a 503, when the server stops, and after HANG_LIMIT seconds at the latest, so a
    client that ignored its timeout fails its test instead of hanging it)."""
    HANG_LIMIT = 60.0

    def __init__(self, reply):
        self.reply, self.count, self.lock = reply, 0, threading.Lock()
        self.stopping = False
        app = FastAPI()

        @app.post("/v1/completions")
        async def completions(request: Request):
            body = await request.json()
            with self.lock:
                n, self.count = self.count, self.count + 1
            scripted = self.reply(n, body)
            if scripted is None:
                await self.hang()
                scripted = 503, [], []
            status, texts, finishes = scripted
            if status != 200:
                return JSONResponse({"error": {"message": "scripted", "type": "x"}}, status_code=status,
                                    headers={"retry-after": "0"})
            choices = [{"index": i, "text": t, "logprobs": None, "finish_reason": f}
                       for i, (t, f) in enumerate(zip(texts, finishes))]
            return {"id": "c", "object": "text_completion", "created": 0, "model": body["model"], "choices": choices,
                    "usage": {"prompt_tokens": 10, "completion_tokens": 5 * len(texts), "total_tokens": 10}}

        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="error"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        while not self.server.started:
            time.sleep(0.05)

    async def hang(self):
        deadline = time.monotonic() + self.HANG_LIMIT
        while not self.stopping and time.monotonic() < deadline:
            await asyncio.sleep(0.05)

    def stop(self):
        self.stopping = True
        self.server.should_exit = True
        self.thread.join(timeout=10)


@torch.no_grad()
def greedy_reproduces(model, ids, first: int, targets) -> bool:
    if not torch.equal(model(ids).logits[0, first:first + len(targets)].argmax(-1), targets):
        return False
    prompt = ids[:, :first + 1]
    greedy = model.generate(prompt, max_new_tokens=len(targets), do_sample=False,
                            attention_mask=torch.ones_like(prompt))
    return greedy[0, first + 1:].tolist() == targets.tolist()


def train_memorizing_judge(out: Path, query: str, document: str, trace: str, max_steps: int = 300) -> Path:
    """Export (like the trainer does) a tiny Qwen3 trained on one pair until greedy decoding
    reproduces that pair's trace exactly (~80 steps)."""
    torch.manual_seed(0)
    tokenizer = load_tokenizer()
    rulebook = load_rulebook()
    instructions = instructions_text(rulebook, "short")
    prompt = tokenizer.encode(build_prompt(tokenizer, rulebook, query, document, instructions), add_special_tokens=False)
    response = tokenizer.encode(trace, add_special_tokens=False) + [tokenizer.eos_token_id]
    model = transformers.Qwen3ForCausalLM(transformers.Qwen3Config(**MEMORIZER))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    ids = torch.tensor([prompt + response])
    # only the positions that predict the response enter the loss: the prompt's ~500 others would
    # cost the 151,936-row head for nothing
    first = len(prompt) - 1
    targets = torch.tensor(response)
    n = len(targets)
    for step in range(max_steps):
        hidden = model.model(input_ids=ids).last_hidden_state[0, first:first + n]
        out_loss = fused_loss(hidden, model.lm_head.weight, targets, is_sft=torch.ones(n, dtype=torch.bool),
                              advantages=torch.zeros(n), old_logp=None, ref_logp=None,
                              scale=torch.full((n,), 1.0 / n))
        opt.zero_grad()
        out_loss.loss.backward()
        opt.step()
        # the exact argmax at every teacher-forced position means greedy decoding reproduces the
        # trace (it follows the same prefix): one forward screens, one generation (the cached path
        # the tests use, whose rounding may break a near tie) confirms
        if step >= 20 and step % 5 == 0 and greedy_reproduces(model, ids, first, targets):
            break
    else:
        raise RuntimeError(f"the tiny judge did not learn its trace in {max_steps} steps")
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    save_prompt_settings(out, rulebook, instructions)
    return out


class Faulty:
    """A misbehaving OpenAI-compatible endpoint (fault paths only): a plain `http.server` on
    127.0.0.1 in a thread whose answer depends on the first path segment of the URL, so one server
    serves every fault: `{url}/html` (200, an HTML page), `/notjson` (200, `{not json`), `/foo`
    (200, `{"foo": 1}`), `/zero` (200, no choices), `/fewer` (one choice whatever n asked),
    `/more` (n + 3 choices), `/refuse` (400 for every request, as vLLM answers an unknown model),
    `/garbage` (well-formed completions whose text is no grade, without log-probs). `count` counts
    the requests."""

    def __init__(self):
        import json
        from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

        owner = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers.get("content-length", 0))) or b"{}")
                owner.count += 1
                mode = self.path.strip("/").split("/")[0]
                n = int(body.get("n") or 1)
                status, ctype, data = 200, "application/json", None
                if mode == "html":
                    ctype, data = "text/html", b"<html><body><h1>Welcome to nginx!</h1></body></html>"
                elif mode == "notjson":
                    data = b"{not json"
                elif mode == "foo":
                    data = b'{"foo": 1}'
                elif mode == "refuse":
                    status = 400
                    data = json.dumps({"error": {"message": f"The model `{body.get('model')}` does not exist.",
                                                 "type": "NotFoundError"}}).encode()
                else:
                    k = {"zero": 0, "fewer": 1, "more": n + 3}.get(mode, n)
                    text = "Hello! How can I help you today?" if mode == "garbage" else "0"
                    choices = [{"index": i, "text": text, "logprobs": None, "finish_reason": "stop"} for i in range(k)]
                    data = json.dumps({"id": "x", "object": "text_completion", "created": 0, "model": "m",
                                       "choices": choices, "usage": {"prompt_tokens": 1, "completion_tokens": k,
                                                                     "total_tokens": 1 + k}}).encode()
                self.send_response(status)
                self.send_header("content-type", ctype)
                self.send_header("content-length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args):
                pass

        class Quiet(ThreadingHTTPServer):
            daemon_threads = True

            def handle_error(self, request, client_address):
                pass      # a client that hung up on an answer (its run already ended) is not news

        self.count = 0
        self.server = Quiet(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def stop(self):
        self.server.shutdown()
        self.server.server_close()
