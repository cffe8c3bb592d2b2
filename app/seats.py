"""Where each cache slot's keys and values live: a row of one tier. Plain bookkeeping, no tensors.

A tier is a buffer of rows that all hold the same number of columns (256,
512, 1024, … tokens). A slot sits in the smallest tier its sequence fits, so
a 4 k-token request takes one 4 k row while the short ones stay in 256-column
rows: memory follows each sequence's own length, not the longest one's.
Running rows (kind "decode") and prompts being prefilled (kind "prefill")
have tiers of their own, so every row of a decode tier is a running row: the
decode attention reads each tier's first rows as one plain slice, up to that
tier's longest row, never a gathered copy.

A slot changes rows only when it outgrows its tier (one copy of its
columns, at most log2(length / 256) times in its life) or when a prompt
completes and joins the running rows. When a slot leaves, the tier's last row
takes its place (one copy), so each tier's rows stay packed at [0, n).
The layers (app.kvcache) make the copies this bookkeeping returns.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
from dataclasses import dataclass, field
from typing import Literal

COLUMNS = 256  # the smallest tier; every tier is this times a power of two

TierKind = Literal["decode", "prefill"]


def cache_columns(tokens: int) -> int:
    """The columns of the smallest tier that holds `tokens`: what a sequence of that length takes in the cache."""
    columns = COLUMNS
    while columns < tokens:
        columns *= 2
    return columns


@dataclass(frozen=True, order=True)
class Tier:
    kind: TierKind
    columns: int


@dataclass(frozen=True)
class Copy:
    """Copy the first `length` columns of row `src_row` of `src` into row `dst_row` of `dst`."""

    src: Tier
    src_row: int
    dst: Tier
    dst_row: int
    length: int


@dataclass(frozen=True)
class Span:
    """A prompt chunk's place: `count` tokens into `row` of `tier`, from column `start`."""

    tier: Tier
    row: int
    start: int
    count: int


@dataclass
class Seats:
    where: dict[int, tuple[Tier, int]] = field(default_factory=dict)  # slot -> (its tier, its row there)
    filled: dict[int, int] = field(default_factory=dict)  # slot -> columns holding its keys and values
    rows: dict[Tier, list[int]] = field(default_factory=dict)  # tier -> the slot in each of its rows

    def free(self, slot: int) -> list[Copy]:
        """`slot` leaves its row; the tier's last row moves into it."""
        tier, row = self.where.pop(slot)
        del self.filled[slot]
        slots = self.rows[tier]
        last = slots.pop()
        if not slots:
            del self.rows[tier]
        if last == slot:
            return []
        slots[row] = last
        self.where[last] = (tier, row)
        return [Copy(tier, len(slots), tier, row, self.filled[last])]

    def seat(self, slot: int, tier: Tier, keep: int) -> list[Copy]:
        """Give `slot` a row of `tier`, its first `keep` columns copied from the row it had."""
        rows = self.rows.setdefault(tier, [])
        rows.append(slot)
        ops = []
        if slot in self.where:
            old, old_row = self.where[slot]
            if keep:
                ops.append(Copy(old, old_row, tier, len(rows) - 1, keep))
            ops += self.free(slot)
        self.where[slot], self.filled[slot] = (tier, len(rows) - 1), keep
        return ops

    def move(self, src: int, dst: int) -> list[Copy]:
        """Slot `dst` takes over what slot `src` holds (a row changing slots): its row is renamed, not copied; what `dst` held is gone."""
        ops = self.free(dst) if dst in self.where else []
        if src not in self.where:
            return ops
        tier, row = self.where.pop(src)
        self.where[dst], self.filled[dst] = (tier, row), self.filled.pop(src)
        self.rows[tier][row] = dst
        return ops

    def plan(self, lengths: Sequence[int], chunks: Sequence[tuple[int, int, int]], live: Collection[int] | None = None) -> list[Copy]:
        """Seat the next step: decode rows 0..len(lengths)-1 at their lengths, and chunks (slot, start, count).

        A decode row is in a decode tier with room for the token it adds; a chunk's slot in a prefill tier with room for it. What is
        stale is freed first: a decode row past the running ones, a prefill slot not in `live` (None: every one is kept) or starting over.
        """
        restart = {slot for slot, start, _ in chunks if start == 0}
        kept = set(range(len(lengths))) | {slot for slot, _, _ in chunks}
        ops: list[Copy] = []
        for slot, (tier, _) in list(self.where.items()):
            held = slot in kept or (tier.kind == "prefill" and (live is None or slot in live))
            if slot in restart or not held:
                ops += self.free(slot)
        for slot, length in enumerate(lengths):
            have = self.tier_of(slot)
            if have is None or have.kind != "decode" or have.columns <= length:
                ops += self.seat(slot, Tier("decode", cache_columns(length + 1)), length)
            self.filled[slot] = length + 1
        for slot, start, count in chunks:
            have = self.tier_of(slot)
            if have is None or have.kind != "prefill" or have.columns < start + count:
                ops += self.seat(slot, Tier("prefill", cache_columns(start + count)), start)
            self.filled[slot] = start + count
        return ops

    def tier_of(self, slot: int) -> Tier | None:
        return self.where[slot][0] if slot in self.where else None

    def decode_tiers(self) -> list[tuple[Tier, list[int]]]:
        """Each decode tier and the decode row in each of its rows."""
        return [(tier, slots) for tier, slots in sorted(self.rows.items()) if tier.kind == "decode"]

    def span(self, slot: int, start: int, count: int) -> Span:
        tier, row = self.where[slot]
        return Span(tier, row, start, count)
