"""Per-request sampling equals HF's warper chain and draw, and batching never changes a row's token."""

from __future__ import annotations

import itertools

import pytest
import torch
from transformers.generation.logits_process import (
    LogitsProcessorList,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from diffgentor.engine.models.hunyuan_image_3.sampling import (
    Forcing,
    SamplingParams,
    constrain_batch,
    make_generator,
    sample_batch,
    sample_row,
    warp_batch,
    warp_logits,
)

VOCAB = 512


def _hf_chain(p: SamplingParams) -> LogitsProcessorList:
    """What HF `generate` builds for do_sample=True with these values (min_tokens_to_keep 1)."""
    procs = LogitsProcessorList()
    if p.temperature != 1.0:
        procs.append(TemperatureLogitsWarper(float(p.temperature)))
    if p.top_k != 0:
        procs.append(TopKLogitsWarper(top_k=p.top_k, min_tokens_to_keep=1))
    if p.top_p < 1.0:
        procs.append(TopPLogitsWarper(top_p=p.top_p, min_tokens_to_keep=1))
    return procs


PARAMS = [
    SamplingParams(temperature=t, top_k=k, top_p=p)
    for t, k, p in itertools.product((0.6, 1.0, 1.7), (0, 1, 7, 1024), (1.0, 0.95, 0.5, 0.0))
]


def _logits(seed: int, rows: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, VOCAB, generator=g) * 3
    x[:, :8] = x[:, :1]  # ties
    return x


@pytest.mark.parametrize("params", PARAMS, ids=lambda p: f"T{p.temperature}-k{p.top_k}-p{p.top_p}")
def test_warp_equals_hf_chain(params):
    for seed in range(3):
        x = _logits(seed)
        ours = warp_logits(x, params)
        ref = _hf_chain(params)(torch.zeros(1, 1, dtype=torch.long), x.clone())
        assert torch.equal(ours, ref)
        assert torch.equal(warp_logits(x[0], params), ref[0])


def test_forced_rows_survive_the_chain():
    x = torch.full((1, VOCAB), torch.finfo(torch.float32).min)
    x[0, 17] = 0
    p = SamplingParams(temperature=0.6, top_k=1024, top_p=0.95)
    probs = torch.softmax(warp_logits(x, p), -1)
    assert probs[0, 17] == 1 and probs.sum() == 1


@pytest.mark.parametrize("params", PARAMS[::5], ids=lambda p: f"T{p.temperature}-k{p.top_k}-p{p.top_p}")
def test_draw_equals_multinomial_with_same_generator(params):
    x = _logits(11)
    ours_gen, ref_gen = make_generator(1234), torch.Generator().manual_seed(1234)
    for _ in range(20):
        ours = sample_row(x[0], params, ours_gen)
        probs = torch.softmax(_hf_chain(params)(None, x.clone()), dim=-1)
        ref = int(torch.multinomial(probs, num_samples=1, generator=ref_gen).item())
        assert ours == ref


def test_matches_hf_global_rng_sampling_loop():
    """HF draws from the global RNG; a request alone with a generator seeded like it gets the same tokens."""
    params = SamplingParams(temperature=0.6, top_k=1024, top_p=0.95)
    steps = [_logits(100 + i) for i in range(15)]
    torch.manual_seed(42)
    ref = []
    for x in steps:
        probs = torch.softmax(_hf_chain(params)(None, x.clone()), dim=-1)
        ref.append(int(torch.multinomial(probs, num_samples=1).squeeze(1).item()))
    gen = make_generator(42)
    assert [sample_row(x, params, gen) for x in steps] == ref


def test_batching_never_changes_a_row():
    params = [
        SamplingParams(temperature=0.6, top_k=1024, top_p=0.95),
        SamplingParams(temperature=1.3, top_k=5),
        SamplingParams(do_sample=False, temperature=0.6),
        SamplingParams(temperature=0.0),
        SamplingParams(temperature=0.9, top_p=0.5),
    ]
    seeds = [7, 8, 9, 10, 11]
    x = _logits(5, rows=len(params))
    alone = []
    for i, (p, s) in enumerate(zip(params, seeds)):
        g = make_generator(s)
        alone.append([sample_row(x[i], p, g) for _ in range(5)])
    for order in ([0, 1, 2, 3, 4], [4, 3, 2, 1, 0], [2, 0, 4]):
        gens = [make_generator(seeds[i]) for i in order]
        rows = x[order]
        got = [sample_batch(rows, [params[i] for i in order], gens).tolist() for _ in range(5)]
        for j, i in enumerate(order):
            assert [step[j] for step in got] == alone[i]


def test_warp_batch_equals_each_row_alone():
    """All the settings in one batch: row i is warp_logits(row i, its settings) bit for bit."""
    x = torch.cat([_logits(20 + i) for i in range(len(PARAMS))])
    got = warp_batch(x, PARAMS)
    for i, p in enumerate(PARAMS):
        assert torch.equal(got[i], warp_logits(x[i], p)), p
    # rows that warp nothing pass through unchanged beside rows that do
    plain = SamplingParams()
    mixed = warp_batch(x[:3], [plain, PARAMS[5], plain])
    assert torch.equal(mixed[0], x[0]) and torch.equal(mixed[2], x[2])


def test_batched_draw_equals_hf_multinomial_per_row():
    """A step of mixed rows (sampled, greedy, forced) draws each sampled row's token exactly as HF's chain plus
    `torch.multinomial` with that row's generator alone would, and leaves every generator in the same state."""
    params = PARAMS[::3] + [SamplingParams(do_sample=False), SamplingParams(temperature=0.0, top_k=5)]
    seeds = list(range(100, 100 + len(params)))
    ours = [make_generator(s) for s in seeds]
    refs = [torch.Generator().manual_seed(s) for s in seeds]
    for step in range(6):
        x = _logits(300 + step, rows=len(params))
        x[step % len(params)] = torch.finfo(torch.float32).min  # a forced row: still drawn
        x[step % len(params), 42] = 0
        got = sample_batch(x, params, ours).tolist()
        for i, p in enumerate(params):
            if p.greedy:
                want = int(x[i].argmax())
            else:
                probs = torch.softmax(_hf_chain(p)(None, x[i : i + 1].clone()), dim=-1)
                want = int(torch.multinomial(probs, num_samples=1, generator=refs[i]).item())
            assert got[i] == want, (step, i, p)
    for a, b in zip(ours, refs):
        assert torch.equal(a.get_state(), b.get_state())


def _constrain_one(logits: torch.Tensor, f: Forcing) -> torch.Tensor:
    """The official processors' forcing on one row, statement by statement (forced > ratio pick > banned)."""
    tok = f.forced_token
    if tok is None and f.ratio_ids is not None:
        tok = f.ratio_ids[int(torch.argmax(logits[list(f.ratio_ids)]))]
    if tok is not None:
        logits.fill_(torch.finfo(logits.dtype).min)
        logits[tok] = 0
    elif f.banned_ids:
        logits[list(f.banned_ids)] = torch.finfo(logits.dtype).min
    return logits


def test_constrain_batch_equals_each_row_alone():
    rows = [Forcing(), Forcing(forced_token=9), Forcing(ratio_ids=(30, 3, 12, 7)), Forcing(banned_ids=(1, 4)),
            Forcing(ratio_ids=(5, 6)), Forcing(forced_token=2, banned_ids=(2,)), Forcing(ratio_ids=(12, 30, 3))]
    x = _logits(77, rows=len(rows))
    x[2, [3, 12]] = x[2].max() + 1  # a tie inside a ratio list: the first listed id wins
    got = constrain_batch(x.clone(), rows)
    for i, f in enumerate(rows):
        assert torch.equal(got[i], _constrain_one(x[i].clone(), f)), f
    assert int(got[2].argmax()) == 3
    assert torch.equal(constrain_batch(x.clone(), [Forcing()] * len(rows)), x)


def test_greedy_draws_nothing():
    x = _logits(3)
    for p in (SamplingParams(do_sample=False), SamplingParams(temperature=0.0, top_p=0.5)):
        g = make_generator(5)
        state = g.get_state()
        assert sample_row(x, p, g) == int(x.argmax())
        assert torch.equal(g.get_state(), state)


def test_forced_token_still_consumes_the_draw():
    """A forced step draws like a free one, so the following free tokens stay aligned with HF."""
    p = SamplingParams(temperature=0.6, top_k=1024, top_p=0.95)
    forced = torch.full((VOCAB,), torch.finfo(torch.float32).min)
    forced[99] = 0
    g1, g2 = make_generator(3), make_generator(3)
    assert sample_row(forced, p, g1) == 99
    sample_row(_logits(1)[0], p, g2)
    assert torch.equal(g1.get_state(), g2.get_state())


def test_validation():
    with pytest.raises(ValueError, match="temperature"):
        SamplingParams(temperature=-1)
    with pytest.raises(ValueError, match="top_k"):
        SamplingParams(top_k=-2)
    with pytest.raises(ValueError, match="top_p"):
        SamplingParams(top_p=1.5)
    with pytest.raises(ValueError, match="batch, vocab"):
        sample_batch(torch.zeros(VOCAB), [SamplingParams()], [None])
    with pytest.raises(ValueError, match="2 rows"):
        sample_batch(torch.zeros(2, VOCAB), [SamplingParams()], [None])
    assert sample_batch(torch.zeros(0, VOCAB), [], []).shape == (0,)


def test_from_generation_defaults(golden_distil):
    from diffgentor.engine.models.hunyuan_image_3.config import GenerationDefaults

    defaults = GenerationDefaults.from_pretrained(golden_distil / "checkpoint")
    p = SamplingParams.from_generation_defaults(defaults)
    assert p == SamplingParams(do_sample=True, temperature=0.6, top_k=1024, top_p=0.95)
