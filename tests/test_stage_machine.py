"""Stage machine: replay of every golden `text_stage_runs` trace, plus our budget closing (docs/decisions.md: Think
budget)."""

from __future__ import annotations

import json

import pytest
import torch

from diffgentor.engine.models.hunyuan_image_3.resolution import ResolutionGroup
from diffgentor.engine.models.hunyuan_image_3.stage_machine import StageMachine, StageMachineError, replay
from diffgentor.engine.models.hunyuan_image_3.tokenizer import HunyuanTokenizer

BUDGET_RUNS = ("T1_", "T2_", "T3_", "T4_", "T10_")


@pytest.fixture(scope="module")
def runs(golden_distil):
    return json.loads((golden_distil / "manifest.json").read_text())["files"]["text_stage_runs"]["runs"]


@pytest.fixture(scope="module")
def tok(golden_distil):
    return HunyuanTokenizer.from_pretrained(golden_distil / "checkpoint", require_distil_tokens=True)


def _run(runs, prefix):
    return next(r for r in runs if r["name"].startswith(prefix))


def _machine(tok, run, **kw):
    return StageMachine.for_request(
        tok,
        bot_task=run["bot_task"],
        image_size=run["image_size_arg"],
        base_size=256,
        max_new_tokens=kw.get("max_new_tokens", run["max_new_tokens"]),
    )


def _fed_tokens(tok, run):
    # bot_task "image" with auto size: the official slices the vocabulary, so the "generated id" is the index
    if run["bot_task"] == "image":
        return [tok.special.ratio[i] for i in run["generated_ids"]]
    return run["generated_ids"]


def _expected_forced(run):
    exp = [None] * len(run["generated_ids"])
    for e in run["processor_events"]:
        exp[e["step"]] = e["forced"] if e["proc"] == "StageTransition" else e["forced"][0]
    return exp


def test_setup_matches_official(tok, runs):
    for run in runs:
        sm = _machine(tok, run)
        if run["stage_transitions"] is not None:
            expected = sorted((k, v) for k, v in run["stage_transitions"])
            assert sorted(sm.transitions.items()) == expected, run["name"]
        if run["final_stop_tokens"] is not None:
            assert sorted(sm.stop_ids) == sorted(run["final_stop_tokens"]), run["name"]
        elif run["bot_task"] != "image":
            assert sorted(sm.stop_ids) == sorted(run["eos_token_id_passed"]), run["name"]
        if run["bot_task"] == "image":
            assert sm.prompt_task == "img_ratio" and sm.needs_ratio_pick
        else:
            tail = "<think>" if run["text_prompt_tail"].endswith("<think>") else "<recaption>"
            assert sm.prompt_task == tail[1:-1]


@pytest.mark.parametrize(
    "name",
    ["T1_", "T2_", "T3_", "T4_", "T5_", "T6_", "T7_", "T8_", "T9_", "T10_", "T11_", "T12_"],
)
def test_replay_golden_trace(tok, runs, name):
    run = _run(runs, name)
    sm = _machine(tok, run)
    fed = _fed_tokens(tok, run)
    events = {e["step"]: e for e in run["processor_events"] if e["proc"] == "StageTransition"}
    for step, t in enumerate(fed):
        assert not sm.finished and not sm.needs_close, (name, step)
        if step in events:  # queue state equals the official processor's after it saw the same last token
            assert list(sm.pending) == events[step]["pending_after"], (name, step)
            assert sorted(sm.completed_triggers) == sorted(events[step]["completed"]), (name, step)
        sm.feed(t)
    fresh = _machine(tok, run)
    seen = replay(fresh, fed)
    assert len(seen) == len(fed)
    if run["processor_events"]:
        assert seen == _expected_forced(run)
    elif run["bot_task"] != "image":
        assert seen == [None] * len(fed)  # no transitions: plain sampling
    # stop point
    if name in BUDGET_RUNS:
        assert sm.needs_close and sm.truncated and not sm.finished
    else:
        assert sm.finished and not sm.truncated
    # CoT and image size handed to the image phase
    if run["image_phase"] is not None and not sm.truncated:
        cot = run["cot_text_to_image_phase"]
        assert (tok.decode(sm.cot_ids) if sm.cot_ids else None) == (cot[0] if cot else None)
        k = run["image_phase"]["ratio_index"]
        if run["image_size_arg"] == "auto":
            assert sm.ratio_index == k
            assert list(ResolutionGroup(256).get(k)) == run["image_phase"]["image_size"]
        else:
            assert sm.ratio_index is None


def test_t5_ratio_29_is_464x128(tok, runs):
    run = _run(runs, "T5_")
    sm = _machine(tok, run)
    for t in run["generated_ids"]:
        sm.feed(t)
    assert sm.ratio_index == 29 and ResolutionGroup(256).get(sm.ratio_index) == (464, 128)
    assert tok.decode(sm.cot_ids) == "<think> tesQatlu to</think><recaption> As\ufffd\ufffd</recaption>"


def _close_and_finish(tok, sm):
    closing = sm.close()
    if sm.needs_ratio_pick:
        logits = torch.zeros(512)
        logits[tok.special.ratio[7]] = 5.0
        assert int(sm.constrain(logits).argmax()) == tok.special.ratio[7]
        sm.feed(tok.special.ratio[7])
    assert sm.finished
    return closing


@pytest.mark.parametrize(
    "name, closing, ratio",
    [
        # auto size, budget inside think: close think, force <recaption>, close it, answer prefix, ratio pick
        ("T1_", ["</think>", "<recaption>", "</recaption>", "<answer>", "<boi>", "<img_size_256>"], 7),
        # fixed size: only the end tags; the image prompt adds <answer> and the block
        ("T2_", ["</think>", "<recaption>", "</recaption>"], None),
        ("T3_", ["</recaption>", "<answer>", "<boi>", "<img_size_256>"], 7),
        ("T4_", ["</recaption>"], None),
        # budget ended on the forced <img_size_256>: only the ratio pick is left
        ("T10_", [], 7),
    ],
)
def test_budget_runs_close_and_yield_an_image(tok, runs, name, closing, ratio):
    run = _run(runs, name)
    sm = _machine(tok, run)
    for t in run["generated_ids"]:
        sm.feed(t)
    # the official tokens up to the budget are ours too
    assert sm.tokens == run["generated_ids"] and sm.n_fed == run["max_new_tokens"]
    with pytest.raises(StageMachineError):
        sm.feed(5)  # must close first
    got = _close_and_finish(tok, sm)
    assert tok.convert_ids_to_tokens(got) == closing
    assert sm.closing_tokens == got
    assert sm.ratio_index == ratio
    cot = sm.cot_ids
    assert cot[0] == sm.start_id and cot[-1] == sm.end_id  # the CoT is closed
    n = min(len(cot) - 1, len(run["generated_ids"]))  # T10: END came before the budget, then the prefix
    assert cot[1 : 1 + n] == run["generated_ids"][:n]
    assert sm.close() == []
    with pytest.raises(StageMachineError):
        sm.feed(5)


def test_budget_right_after_think_end_closes_recaption(tok):
    sp = tok.special
    sm = StageMachine.for_request(tok, bot_task="think_recaption", base_size=256, max_new_tokens=3)
    for t in (50, 60, sp.end_think):
        sm.feed(t)
    assert sm.pending == (sp.recaption,) and sm.needs_close
    assert sm.close() == [sp.recaption, sp.end_recaption, sp.answer, sp.boi, 423]
    assert sm.needs_ratio_pick and not sm.finished


def test_constrain_forces_like_the_official_processors(tok, runs):
    sp = tok.special
    run = _run(runs, "T5_")
    sm = _machine(tok, run)
    gen = run["generated_ids"]
    for t in gen[:6]:  # ... </think>
        sm.feed(t)
    assert sm.forced_token == sp.recaption
    logits = torch.randn(512)
    out = sm.constrain(logits)
    assert out is logits
    assert logits[sp.recaption] == 0 and (logits == torch.finfo(torch.float32).min).sum() == 511
    assert torch.softmax(logits / 0.6, -1)[sp.recaption] == 1
    for t in gen[6:15]:  # ... <img_size_256>
        sm.feed(t)
    assert sm.forced_token is None and sm.needs_ratio_pick
    logits = torch.randn(512)
    logits[5] = 100.0  # outside the ratio vocabulary: ignored
    logits[sp.ratio[33]] = 50.0  # a ratio beyond the first contiguous range still counts
    sm.constrain(logits)
    assert int(logits.argmax()) == sp.ratio[33] and logits[sp.ratio[33]] == 0
    free = StageMachine.for_request(tok, bot_task="think_recaption", base_size=256)
    logits = torch.randn(512)
    before = logits.clone()
    free.constrain(logits)
    assert torch.equal(logits, before)


def test_pick_ratio_first_max_wins(tok):
    sm = StageMachine.for_request(tok, bot_task="image", base_size=256)
    logits = torch.zeros(512)
    logits[tok.special.ratio[3]] = 1.0
    logits[tok.special.ratio[30]] = 1.0
    assert int(sm.constrain(logits).argmax()) == tok.special.ratio[3]


def test_limited_ratios_constrain_the_verifier_as_they_do_the_server(tok):
    """`limit_ratios` (auto size, buckets whose image phase fits) shapes `forcing`, which both the serving worker
    (through the scheduler's `SampleSpec`) and `constrain()` (the golden verifier) apply: the ratio pick offers only
    the allowed buckets, and a free step never samples another bucket's ratio token."""
    sp = tok.special
    sm = StageMachine.for_request(tok, bot_task="image", base_size=256)
    sm.limit_ratios((4, 9))
    logits = torch.zeros(512)
    logits[sp.ratio[3]] = 9.0  # the best ratio token overall is not offered
    logits[sp.ratio[9]] = 2.0
    assert sm.forcing.ratio_ids == (sp.ratio[4], sp.ratio[9])
    assert int(sm.constrain(logits).argmax()) == sp.ratio[9]
    think = StageMachine.for_request(tok, bot_task="think", base_size=256)
    think.limit_ratios((4, 9))
    free = torch.zeros(512)
    free[sp.ratio[3]] = 9.0
    think.constrain(free)
    assert free[sp.ratio[3]] == torch.finfo(free.dtype).min and free[sp.ratio[9]] == 0
    assert set(think.forcing.banned_ids) == set(sp.ratio) - {sp.ratio[4], sp.ratio[9]}
    with pytest.raises(ValueError, match="ratio indexes"):
        think.limit_ratios((len(sp.ratio),))


def test_bot_task_variants(tok):
    sp = tok.special
    # image, fixed size: no text phase at all
    sm = StageMachine.for_request(tok, bot_task="image", image_size="256x256", base_size=256)
    assert sm.prompt_task is None and sm.finished and sm.cot_ids == []
    # auto: free text until <|endoftext|>, no forcing, budget just stops
    sm = StageMachine.for_request(tok, bot_task="auto", base_size=256, max_new_tokens=3)
    assert sm.prompt_task == "auto" and sm.stop_ids == {sp.eos}
    for t in (50, sp.end_think, sp.end_recaption):
        assert sm.forced_token is None and not sm.needs_ratio_pick
        sm.feed(t)
    assert sm.needs_close and sm.close() == [] and sm.finished and sm.ratio_index is None
    sm = StageMachine.for_request(tok, bot_task="auto", base_size=256)
    sm.feed(50)
    sm.feed(sp.eos)
    assert sm.finished and not sm.truncated
    # think (no recaption), auto size: </think> is END; </recaption> is neither trigger nor stop
    sm = StageMachine.for_request(tok, bot_task="think", base_size=256)
    assert sm.transitions == {sp.end_think: [sp.answer, sp.boi, 423]}
    sm.feed(sp.end_recaption)
    assert not sm.finished and sm.forced_token is None
    sm.feed(sp.end_think)
    assert sm.forced_token == sp.answer
    # think, fixed size: stops on </think> or </recaption>
    sm = StageMachine.for_request(tok, bot_task="think", image_size="256x256", base_size=256)
    assert sm.stop_ids == {sp.end_think, sp.end_recaption} and sm.transitions == {}
    sm.feed(sp.end_recaption)
    assert sm.finished and tok.convert_ids_to_tokens(sm.cot_ids) == ["<think>", "</recaption>"]
    # pretrain template: no <answer> in the forced prefix
    sm = StageMachine.for_request(tok, bot_task="recaption", base_size=256, template="pretrain")
    assert sm.transitions == {sp.end_recaption: [sp.boi, 423]}
    with pytest.raises(ValueError, match="bot_task"):
        StageMachine.for_request(tok, bot_task="img_ratio", base_size=256)


def test_spontaneous_size_and_ratio_tokens(tok):
    sp = tok.special
    # auto size: a ratio token is an eos anywhere; the CoT is then everything generated (no END)
    sm = StageMachine.for_request(tok, bot_task="think_recaption", base_size=256)
    sm.feed(50)
    sm.feed(sp.ratio[4])
    assert sm.finished and sm.ratio_index == 4 and sm.cot_ids == [sp.think, 50, sp.ratio[4]]
    # a spontaneous <img_size_N> triggers the greedy ratio step
    sm = StageMachine.for_request(tok, bot_task="think_recaption", base_size=256)
    sm.feed(423)
    assert sm.needs_ratio_pick
    # fixed size: neither matters
    sm = StageMachine.for_request(tok, bot_task="think_recaption", image_size="256x256", base_size=256)
    sm.feed(423)
    sm.feed(sp.ratio[4])
    assert not sm.finished and not sm.needs_ratio_pick and sm.ratio_index is None


def test_errors(tok):
    with pytest.raises(ValueError, match="max_new_tokens"):
        StageMachine.for_request(tok, bot_task="think", base_size=256, max_new_tokens=0)
    with pytest.raises(ValueError, match="template"):
        StageMachine.for_request(tok, bot_task="think", base_size=256, template="chat")
    sm = StageMachine.for_request(tok, bot_task="recaption", image_size="256x256", base_size=256)
    sm.feed(tok.special.end_recaption)
    with pytest.raises(StageMachineError):
        sm.feed(1)
    with pytest.raises(StageMachineError):
        sm.constrain(torch.zeros(512))


def test_feed_checks_forced_and_ratio_steps(tok):
    sp = tok.special
    sm = StageMachine.for_request(tok, bot_task="think_recaption", base_size=256)
    sm.feed(sp.end_think)
    with pytest.raises(StageMachineError, match="forced"):
        sm.feed(50)
    sm = StageMachine.for_request(tok, bot_task="image", base_size=256)
    with pytest.raises(StageMachineError, match="ratio pick"):
        sm.feed(50)
    sm.feed(sp.ratio[36])
    assert sm.finished and sm.ratio_index == 36 and sm.cot_ids == []
