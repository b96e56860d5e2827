"""The two handlers bench_serve.py compares the service against, served by the same FastAPI app.

    python benchmarks/_serve_baselines.py naive|reason-first --model DIR --port P [--instructions full]

Both score the same prompts (same PromptEncoder, same pair -> token ids) and answer the same JSON,
/v1/rerank included (a backend without `score_query` gets a rerank's candidates as plain pairs, one at
a time here), so only the inference differs:

* naive: one pair at a time (max batch 1, no waiting), the whole prompt prefilled through the
  causal LM, the last position's full 151,936-wide logits (``logits_to_keep=1``, the way a
  generate() prefill does it; all positions' logits would be ~15x slower still), a softmax over
  the whole vocabulary, then the five label probabilities renormalised.
* reason-first: the judge writes its reasoning before the grade, so a score costs a prefill and
  REASON_TOKENS greedy decode steps (EOS suppressed: a random model's traces have no natural
  length), and the grade is read from the distribution after them. One pair at a time.

Generation (/v1/completions and explain traces: the service hands both to ``backend.generate``) is
not what these handlers are about and not what bench_serve measures; both baselines generate like
the service's embedded backend does (afrl_fast.engines.EmbeddedEngine over the same model), so the
app starts and every endpoint answers.
"""
import argparse
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from afrl_fast.prompt_encoding import PromptEncoder  # noqa: E402
from afrl_fast.scoring import load_model  # noqa: E402
from afrl_fast.format import label_token_ids, load_tokenizer, resolve_prompt_settings  # noqa: E402
from afrl_fast.engines import EmbeddedEngine  # noqa: E402
from afrl_fast.serve.app import create_app  # noqa: E402
from afrl_fast.serve.config import ServeConfig  # noqa: E402


class NaiveBackend:
    kind = "naive"
    prefix_tokens = full_prefill_pairs = 0

    def __init__(self, model, tokenizer):
        self.model, self.tokenizer = model.eval(), tokenizer
        self.label_ids = label_token_ids(tokenizer)
        self.engine = EmbeddedEngine(self.model, tokenizer)     # generation only (see the module docstring)
        self.eos_ids = self.engine.eos_ids
        self.context_tokens = model.config.max_position_embeddings
        self.device = "cpu"

    @torch.inference_mode()
    def last_logits(self, ids: list[int]) -> torch.Tensor:
        return self.model(input_ids=torch.tensor([ids]), logits_to_keep=1).logits[0, -1]

    def score(self, batch):
        out = []
        for ids in batch:
            p = torch.softmax(self.last_logits(ids).double(), -1)[self.label_ids]
            out.append((p / p.sum()).numpy())
        return np.stack(out)

    def generate(self, prompts, *, n, temperature, top_p, max_tokens, seeds, top_logprobs=0):
        """What the service's generation batcher calls: n samples per prompt, as the embedded backend
        makes them (prompt p's samples from a generator seeded with seeds[p])."""
        return self.engine.generate_groups(prompts, group_size=n, temperature=temperature, top_p=top_p,
                                           max_new_tokens=max_tokens, seeds=seeds, top_logprobs=top_logprobs)

    def close(self):
        pass


class ReasonFirstBackend(NaiveBackend):
    kind = "reason-first"

    def __init__(self, model, tokenizer, reason_tokens: int):
        super().__init__(model, tokenizer)
        self.reason_tokens = reason_tokens

    @torch.inference_mode()
    def last_logits(self, ids: list[int]) -> torch.Tensor:
        out = self.model.generate(torch.tensor([ids]), do_sample=False, max_new_tokens=self.reason_tokens + 1,
                                  min_new_tokens=self.reason_tokens + 1, output_logits=True,
                                  return_dict_in_generate=True, pad_token_id=self.tokenizer.pad_token_id)
        return out.logits[-1][0]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("handler", choices=("naive", "reason-first"))
    ap.add_argument("--model", required=True)
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--instructions", default=None)
    ap.add_argument("--reason-tokens", type=int, default=150)
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args()
    import uvicorn

    if args.threads:
        torch.set_num_threads(args.threads)

    prompt = resolve_prompt_settings(args.model, None, args.instructions)
    tokenizer = load_tokenizer(args.model)
    model = load_model(args.model, "auto")
    backend = NaiveBackend(model, tokenizer) if args.handler == "naive" else \
        ReasonFirstBackend(model, tokenizer, args.reason_tokens)
    cfg = ServeConfig(max_batch=1, max_wait_ms=0.0, model_name=args.handler)
    app = create_app(backend, cfg, PromptEncoder(tokenizer, prompt.rulebook, prompt.instructions),
                     ThreadPoolExecutor(1))
    print(f"serving {args.handler} on 127.0.0.1:{args.port}", flush=True)
    uvicorn.run(app, host="127.0.0.1", port=args.port, log_level="warning", access_log=False)


if __name__ == "__main__":
    main()
