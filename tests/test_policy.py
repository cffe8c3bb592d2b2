"""The scheduler's policy with plain lists: admission, budgets, chunking, stop rules, cancellation. No model, no thread, no timing."""

from __future__ import annotations

import pytest

from app.params import Output, SamplingParams
from app.policy import Choice, Move, Policy, StepPlan
from ops.errors import QueueFullError

EOS = 0
WORDS = {1: "a", 2: "b", 3: "\n", 4: "END", 5: "c"}


def decode(seq: Choice, token: int) -> str:
    return WORDS.get(token, "?")


def seq(prompt_len: int = 3, **params: object) -> Choice:
    p = SamplingParams(**{"max_tokens": 8, **params})  # type: ignore[arg-type]
    return Choice(list(range(10, 10 + prompt_len)), p, budget=p.max_tokens)


def run_step(policy: Policy, tokens: dict[int, int] | int = 1) -> tuple[StepPlan, list[tuple[Choice, Output]]]:
    """Schedule, then answer every sampled row with `tokens` (one for all, or by id() of the sequence)."""
    plan = policy.schedule()
    picked = [tokens if isinstance(tokens, int) else tokens[id(s)] for s in plan.sampled]
    return plan, policy.update(plan, picked, decode).sent


def test_waiting_prompts_are_admitted_up_to_max_batch() -> None:
    policy = Policy(max_batch=2, max_prefill=4)
    a, b, c = seq(), seq(), seq()
    policy.submit([a, b, c])
    plan = policy.schedule()
    assert [ch.seq for ch in plan.chunks] == [a, b] and not plan.rows
    assert list(policy.waiting) == [c]
    policy.update(plan, [1, 1], decode)
    assert policy.running == [a, b] and policy.moves == [Move(2, 0, 3), Move(3, 1, 3)]
    plan = policy.schedule()
    assert plan.rows == (a, b) and not plan.chunks and plan.moves == (Move(2, 0, 3), Move(3, 1, 3))  # c waits: the batch is full
    assert plan.token_ids == [1, 1] and plan.lengths == [3, 3]


def test_sequences_start_only_while_their_kv_columns_fit_beside_the_running_ones() -> None:
    """Each sequence counts at its tier's columns (prompt + budget: 300 -> 512); two fit in 1024, the third waits until one leaves."""
    policy = Policy(max_batch=8, kv_columns=1024)
    a, b, c = seq(100, max_tokens=200), seq(100, max_tokens=200), seq(100, max_tokens=200)
    policy.submit([a, b, c])
    plan, _ = run_step(policy)
    assert [ch.seq for ch in plan.chunks] == [a, b] and list(policy.waiting) == [c] and policy.admitted == 1024
    a.cancelled.set()
    plan, _ = run_step(policy)
    assert plan.dropped == (a,) and [ch.seq for ch in plan.chunks] == [c] and policy.admitted == 1024


def test_a_full_queue_refuses_the_whole_request() -> None:
    policy = Policy(max_batch=4, max_queue=2)
    policy.submit([seq()])
    with pytest.raises(QueueFullError) as caught:
        policy.submit([seq(), seq()])
    assert policy.queued == 1 and caught.value.details() == {"waiting": 1, "limit": 2}


def test_a_long_prompt_is_prefilled_in_chunks_while_rows_decode() -> None:
    policy = Policy(max_batch=4, step_tokens=40)
    short = seq(2)
    policy.submit([short])
    run_step(policy)
    long = seq(100)
    policy.submit([long])
    counts = []
    for _ in range(4):
        plan, _ = run_step(policy)
        assert short in plan.rows  # the running row adds a token every step
        counts += [c.count for c in plan.chunks]
    assert counts == [39, 39, 22]  # the step's budget less one token for the running row
    assert long in policy.running


def test_prompt_chunks_are_scored_only_where_needed() -> None:
    policy = Policy(max_batch=4, step_tokens=64)
    plain, echoed = seq(5), seq(5, prompt_logprobs=True, logprobs=0)
    policy.submit([plain, echoed])
    plan = policy.schedule()
    assert plan.keep == [4, 5, 6, 7, 8, 9]  # the last position of the plain prompt; every position of the echoed one
    assert plan.sampled == [plain, echoed] and plan.sampled_at == [0, 5]
    [(chunk, at)] = plan.scored_at
    assert chunk.seq is echoed and at == 1 and chunk.targets == echoed.prompt[1:]


def test_stop_token_eos_and_budget_end_a_sequence() -> None:
    policy = Policy(max_batch=4, eos=EOS)
    by_eos, by_id, by_len, ignoring = seq(max_tokens=5), seq(stop_token_ids=(5,)), seq(max_tokens=2), seq(max_tokens=2, ignore_eos=True)
    policy.submit([by_eos, by_id, by_len, ignoring])
    run_step(policy, {id(by_eos): 1, id(by_id): 1, id(by_len): 1, id(ignoring): EOS})
    _, sent = run_step(policy, {id(by_eos): EOS, id(by_id): 5, id(by_len): 2, id(ignoring): EOS})
    finish = {id(s): out.finish for s, out in sent}
    assert finish == {id(by_eos): "stop", id(by_id): "stop", id(by_len): "length", id(ignoring): "length"}
    assert policy.idle


def test_a_stop_string_is_cut_and_its_start_held_back() -> None:
    policy = Policy(max_batch=1)
    s = seq(stop=("\nEND",))
    policy.submit([s])
    _, sent = run_step(policy, 1)
    assert [o.text for _, o in sent] == ["a"]
    _, sent = run_step(policy, 3)
    assert sent == [] or [o.text for _, o in sent] == [""]  # "\n" may begin the stop string: held
    _, sent = run_step(policy, 4)
    assert [(o.text, o.finish) for _, o in sent] == [("", "stop")] and s.text == "a"


def test_held_text_is_sent_when_the_stop_string_does_not_follow() -> None:
    policy = Policy(max_batch=1)
    policy.submit([seq(stop=("\nEND",))])
    texts = [o.text for t in (1, 3, 2) for _, o in run_step(policy, t)[1]]
    assert "".join(texts) == "a\nb"


def test_a_cancelled_row_leaves_and_the_last_row_takes_its_slot() -> None:
    policy = Policy(max_batch=3)
    a, b, c = seq(), seq(), seq()
    policy.submit([a, b, c])
    run_step(policy)
    run_step(policy)
    a.cancelled.set()
    plan = policy.schedule()
    assert plan.dropped == (a,) and plan.rows == (c, b) and plan.moves == (Move(2, 0, 4),)  # 3 prompt tokens and the first sampled one are in the cache


def test_a_cancelled_waiting_or_prefilling_sequence_frees_its_place() -> None:
    policy = Policy(max_batch=2, max_prefill=1, step_tokens=32)
    big, small = seq(100), seq()
    policy.submit([big, small])
    policy.update(policy.schedule(), [], decode)  # big takes the only prefill slot
    big.cancelled.set()
    plan = policy.schedule()
    assert plan.dropped == (big,) and [c.seq for c in plan.chunks] == [small]


def test_failing_rows_end_alone_with_an_error() -> None:
    policy = Policy(max_batch=3)
    a, b, c = seq(), seq(), seq()
    policy.submit([a, b, c])
    run_step(policy)
    sent = policy.fail([b], "[generation failed]")
    assert [(s, o.finish) for s, o in sent] == [(b, "error")]
    plan = policy.schedule()
    assert set(plan.rows) == {a, c} and b not in policy.running
