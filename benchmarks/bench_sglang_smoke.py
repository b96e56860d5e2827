"""GPU smoke test of the SGLang rollout path — minutes on one H100 (never run on the CPU machine).

    pip install -e ".[dev,sglang]"            # on the GPU machine, with its CUDA torch
    AFRL_SGLANG_MODEL=/models/Qwen3-0.6B pytest benchmarks/bench_sglang_smoke.py --benchmark

It drives `afrl_fast.engines.sglang.SGLangEngine` exactly as the trainer does (one rank, tp 1) and
checks, printing what it measured:
1. rollouts: G samples of one prompt are not all identical (per-sample seeds), and the same seeds
   give the same tokens again (deterministic inference);
2. the engine's log-probs agree with the HF model's teacher-forced log-probs of the same tokens;
3. weight sync lands: zeroing the LM head in the trainer's copy and syncing changes the greedy
   output; syncing the original weights back restores it exactly;
4. memory: free GPU memory rises after `release_memory()` and the next sync resumes it.
Skipped without CUDA, without SGLang or without AFRL_SGLANG_MODEL.
"""
import os
import time

import pytest
import torch

from afrl_fast.config import SGLangConfig

MODEL = os.environ.get("AFRL_SGLANG_MODEL")


@pytest.mark.benchmark
def test_sglang_rollouts_seeds_sync_and_memory(tmp_path):
    if not torch.cuda.is_available() or MODEL is None:
        pytest.skip("needs a CUDA GPU and AFRL_SGLANG_MODEL=<a Hugging Face Qwen3 folder>")
    pytest.importorskip("sglang")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from afrl_fast.engines import make_engine

    tok = AutoTokenizer.from_pretrained(MODEL)
    hf = AutoModelForCausalLM.from_pretrained(MODEL, dtype=torch.bfloat16).cuda()
    settings = SGLangConfig(mem_fraction_static=0.4)
    t0 = time.time()
    eng = make_engine("sglang", model_path=MODEL, tokenizer=tok, settings=settings, log_dir=str(tmp_path))
    print(f"\nserver up in {time.time() - t0:.0f} s")
    prompt = tok.apply_chat_template([{"role": "user", "content": "Grade 0-4: is a cat a mammal?"}],
                                     add_generation_prompt=True, tokenize=True)
    try:
        t0 = time.time()
        groups = eng.generate_groups([prompt], group_size=8, temperature=1.0, max_new_tokens=64, seeds=[123])
        again = eng.generate_groups([prompt], group_size=8, temperature=1.0, max_new_tokens=64, seeds=[123])
        distinct = len({tuple(t) for t in groups[0].token_ids})
        print(f"8 samples in {time.time() - t0:.1f} s (two calls): {distinct} distinct, "
              f"reproducible: {again[0].token_ids == groups[0].token_ids}")
        assert distinct > 1 and again[0].token_ids == groups[0].token_ids

        ids = groups[0].token_ids[0]
        with torch.no_grad():
            logits = hf(torch.tensor([prompt + ids], device="cuda")).logits[0, len(prompt) - 1:-1].float()
        ref = torch.log_softmax(logits, -1).gather(1, torch.tensor(ids, device="cuda")[:, None])[:, 0]
        gap = (ref.cpu() - torch.tensor(groups[0].logprobs[0])).abs().max().item()
        print(f"max |engine log p - HF log p| over {len(ids)} tokens: {gap:.3f}")
        assert gap < 0.5          # bf16 engines differ in the second decimal, not in the first

        greedy = lambda: eng.generate_groups([prompt], group_size=1, temperature=0.0, max_new_tokens=16,  # noqa: E731
                                             seeds=[1])[0].token_ids[0]
        before = greedy()
        free0 = torch.cuda.mem_get_info()[0]
        eng.release_memory()
        free1 = torch.cuda.mem_get_info()[0]
        saved = hf.lm_head.weight.detach().clone()
        with torch.no_grad():
            hf.lm_head.weight.zero_()
        eng.sync_weights(hf)
        broken = greedy()
        with torch.no_grad():
            hf.lm_head.weight.copy_(saved)
        eng.sync_weights(hf)
        restored = greedy()
        print(f"free GPU memory: {free0 / 2**30:.1f} GiB -> {free1 / 2**30:.1f} GiB after release; "
              f"greedy output changed by the zeroed head: {broken != before}; restored: {restored == before}")
        assert free1 > free0 and broken != before and restored == before
    finally:
        eng.shutdown()
