"""The cache's seating (app.seats): plain data, no tensors."""

from __future__ import annotations

from app.seats import Copy, Seats, Tier, cache_columns

D256, D512, P256, P1024 = Tier("decode", 256), Tier("decode", 512), Tier("prefill", 256), Tier("prefill", 1024)


def test_a_sequence_takes_the_smallest_tier_it_fits() -> None:
    assert [cache_columns(n) for n in (0, 1, 256, 257, 4000, 4096, 4097)] == [256, 256, 256, 512, 4096, 4096, 8192]


def test_a_prompt_is_prefilled_in_a_prefill_tier_then_copied_once_into_a_decode_tier() -> None:
    seats = Seats()
    assert seats.plan([], [(5, 0, 200)]) == []
    assert seats.where[5] == (P256, 0) and seats.filled[5] == 200
    assert seats.plan([], [(5, 200, 600)]) == [Copy(P256, 0, P1024, 0, 200)]  # outgrew its row: moved with its 200 columns
    assert seats.move(5, 0) == []  # the prompt is complete and becomes decode row 0: renamed
    assert seats.plan([800], []) == [Copy(P1024, 0, Tier("decode", 1024), 0, 800)]
    assert seats.rows == {Tier("decode", 1024): [0]} and seats.filled[0] == 801


def test_a_row_that_leaves_is_replaced_by_its_tiers_last_row() -> None:
    seats = Seats()
    seats.plan([10, 20, 300, 30], [])
    assert seats.rows == {D256: [0, 1, 3], D512: [2]}
    # row 1 finished: the policy moves the last row (3) into slot 1; slot 1's row is freed and slot 3's row renamed, nothing copied but
    # the tier's last row into the hole
    ops = seats.move(3, 1)
    assert ops == [Copy(D256, 2, D256, 1, 31)] and seats.rows[D256] == [0, 1] and seats.where[1] == (D256, 1)
    assert seats.plan([11, 32, 301], []) == [] and seats.filled == {0: 12, 1: 33, 2: 302}


def test_a_row_past_its_tier_moves_up_and_the_tier_stays_packed() -> None:
    seats = Seats()
    seats.plan([10, 255, 20], [])
    ops = seats.plan([11, 256, 21], [])  # row 1 needs its 257th column
    assert ops == [Copy(D256, 1, D512, 0, 256), Copy(D256, 2, D256, 1, 21)]
    assert seats.rows == {D256: [0, 2], D512: [1]}


def test_stale_rows_are_given_back() -> None:
    seats = Seats()
    seats.plan([10, 20], [(8, 0, 50), (9, 0, 50)])
    # row 1 finished as the last row (no move); prompt 9 was cancelled; prompt 8 waits for its next chunk
    assert seats.plan([11], [], live={8}) == []
    assert set(seats.where) == {0, 8}
    # slot 8 starts a new prompt: its old row is given back first
    seats.plan([12], [(8, 0, 30)], live={8})
    assert seats.filled[8] == 30 and seats.rows[P256] == [8]
