"""One growth rule's windows over all of a run's series, as arrays: one rule_state row per
(run, rule) instead of one JSON list per series, updated for a whole batch in a few numpy calls.

A fleet run posts one step of ~200 series a second, 144 of them attention logit maxima that
two growth rules watch: each step moves every one of their windows. Kept per series, that was
288 Python evaluations and 144 rows re-encoded as JSON and written per step; kept here, it is
a handful of array operations and two rows.

An entry holds what ``conditions._growth`` keeps in a series' state dict (the monotonic deque
``ws``/``w``, ``from``, ``settled``). The dict stays the home of a rule's memory of a series
whenever it holds more (an open alert, a streak): while ``rule.name`` is in the series' state
dict, that dict is authoritative and the entry is empty. ``seg``/``last`` are the series'
segment and last step when the entry last changed, so a process that reads the rows afresh
knows which steps the windows have seen (the series' own row is not rewritten every step).
"""

from __future__ import annotations

import base64
import json
from typing import Any

import numpy as np

from logitwatch.service.rules.model import Growth

__all__ = ["FLOAT", "INT", "PREFIX", "GrowthWindows", "block_key", "from_b64", "to_b64"]

#: rule_state keys of the blocks: a series key starts with a metric name ([a-z]), never "#".
PREFIX = "#"
_PLAIN = frozenset(("ws", "w", "from", "settled"))
INT = np.dtype("<i8")
FLOAT = np.dtype("<f8")


def block_key(rule: str) -> str:
    return PREFIX + rule


def to_b64(a: np.ndarray, dtype: np.dtype) -> str:
    """``a`` as base64 of ``dtype`` (little-endian, whatever the machine)."""
    return base64.b64encode(np.ascontiguousarray(a, dtype=dtype).tobytes()).decode("ascii")


def from_b64(text: str, dtype: np.dtype) -> np.ndarray:
    """The writable array that to_b64 encoded."""
    return np.frombuffer(base64.b64decode(text), dtype=dtype).astype(dtype.newbyteorder("="))


class GrowthWindows:
    """The entries of one (run, growth rule): row i of each array is series ``keys[i]``."""

    __slots__ = (
        "cnt",
        "dirty",
        "frm",
        "index",
        "keys",
        "keys_json",
        "last",
        "memo",
        "new",
        "seg",
        "settled",
        "w",
        "ws",
    )  # fmt: skip

    def __init__(self) -> None:
        self.keys: list[str] = []
        self.index: dict[str, int] = {}
        self.seg = np.zeros(0, np.int64)
        self.last = np.zeros(0, np.int64)
        self.cnt = np.zeros(0, np.int64)
        self.frm = np.zeros(0, np.int64)  # "from", -1: absent
        self.settled = np.zeros(0, bool)
        self.ws = np.zeros((0, 4), np.int64)
        self.w = np.zeros((0, 4), np.float64)
        #: Not stored yet; changed since stored.
        self.new, self.dirty = True, False
        self.memo: Any = None
        self.keys_json: tuple[int, str] | None = None

    # --- entries ----------------------------------------------------------------------

    def slots(self, keys: list[str], m: np.ndarray, segment: int, owner: Any) -> np.ndarray:
        """Positions of ``keys[m]``, adding empty entries for the ones not here yet. The
        answer is kept for the next batch with the same ``owner`` (a layout) and ``m``:
        entries are only ever added."""
        if self.memo is not None:
            was, wm, pos = self.memo
            if was is owner and np.array_equal(wm, m):
                return pos
        pos = self._slots([keys[i] for i in m], segment)
        self.memo = (owner, m, pos)
        return pos

    def _slots(self, keys: list[str], segment: int) -> np.ndarray:
        index = self.index
        found = [index.get(k) for k in keys]
        if None in found:
            old = len(self.keys)
            for k, i in zip(keys, found, strict=True):
                if i is None and k not in index:
                    index[k] = len(self.keys)
                    self.keys.append(k)
            self._grow(len(self.keys), self.ws.shape[1])
            self.seg[old:] = segment
            found = [index[k] for k in keys]
        return np.array(found, dtype=np.intp)

    def _grow(self, n: int, width: int) -> None:
        """Room for ``n`` entries of up to ``width`` points each (new entries empty)."""
        old, oldw = len(self.cnt), self.ws.shape[1]
        if n == old and width <= oldw:
            return
        width = max(width, oldw)
        ws = np.zeros((n, width), np.int64)
        w = np.zeros((n, width), np.float64)
        ws[:old, :oldw], w[:old, :oldw] = self.ws, self.w
        self.ws, self.w = ws, w
        if n > old:
            grow = n - old
            self.seg = np.concatenate([self.seg, np.zeros(grow, np.int64)])
            self.last = np.concatenate([self.last, np.full(grow, -1, np.int64)])
            self.cnt = np.concatenate([self.cnt, np.zeros(grow, np.int64)])
            self.frm = np.concatenate([self.frm, np.full(grow, -1, np.int64)])
            self.settled = np.concatenate([self.settled, np.zeros(grow, bool)])

    def take(self, i: int) -> dict[str, Any]:
        """Entry ``i`` as a state dict (what ``_growth`` reads), leaving the entry empty."""
        st: dict[str, Any] = {}
        c = int(self.cnt[i])
        if c:
            st["ws"], st["w"] = self.ws[i, :c].tolist(), self.w[i, :c].tolist()
        if self.frm[i] >= 0:
            st["from"] = int(self.frm[i])
        if self.settled[i]:
            st["settled"] = True
        if st:
            self.cnt[i], self.frm[i], self.settled[i] = 0, -1, False
            self.dirty = True
        return st

    def put(self, i: int, st: dict[str, Any], segment: int, last: int) -> bool:
        """Keep ``st`` (a rule's state dict of series i) here if it holds only what an entry
        can; False leaves it to the dict."""
        if not st.keys() <= _PLAIN:
            return False
        ws, w = st.get("ws") or [], st.get("w") or []
        frm = st.get("from", -1)
        if (
            len(ws) != len(w)
            or not all(type(s) is int for s in ws)
            or not all(type(v) is float for v in w)
            or type(frm) is not int
            or st.get("settled", True) is not True
        ):
            return False
        self._grow(len(self.cnt), len(ws))
        self.cnt[i] = len(ws)
        self.ws[i, : len(ws)], self.w[i, : len(w)] = ws, w
        self.frm[i], self.settled[i] = frm, "settled" in st
        self.seg[i], self.last[i] = segment, last
        self.dirty = True
        return True

    def renew(self, pos: np.ndarray, segment: int) -> None:
        """Entries of an earlier segment start over: a resume resets the windows (``from``
        and ``settled`` stay), as it does a state dict's (``conditions.reset_windows``)."""
        old = pos[self.seg[pos] < segment]
        if len(old):
            self.cnt[old], self.seg[old], self.last[old] = 0, segment, -1
            self.dirty = True

    # --- a batch ----------------------------------------------------------------------

    def quiet(self, c: Growth, pos: np.ndarray, v: np.ndarray) -> np.ndarray:
        """Which |values| ``v`` no verdict can make active (``conditions._growth_quiet``)."""
        if c.ratio > 1:
            if not c.min_value > 0:
                return np.zeros(len(v), bool)
            return v < c.ratio * c.min_value
        front = np.where(self.cnt[pos] > 0, self.w[pos, 0], 0.0)
        return np.maximum(v, front) < c.min_value

    def push(self, c: Growth, pos: np.ndarray, steps: np.ndarray, v: np.ndarray, seg: int) -> None:
        """One point per entry, none of which can hold: ``_growth``'s window moves, in one go.

        The deque is monotonic (rising: each point smaller than every later one), so the
        points that leave it, too old at the front and no smaller than ``v`` at the back,
        leave the slice [a, b) of each entry."""
        if not len(pos):
            return
        n = len(pos)
        # Every entry in order (a run's one layout): no gather, no scatter.
        whole = n == len(self.cnt) and bool((pos == np.arange(n)).all())
        S, W, C = (
            (self.ws, self.w, self.cnt) if whole else (self.ws[pos], self.w[pos], self.cnt[pos])
        )
        width = S.shape[1]
        col = np.arange(width)
        valid = col < C[:, None]
        a = (((steps - c.over_steps)[:, None] > S) & valid).sum(axis=1)
        back = (v[:, None] <= W) if c.ratio > 1 else (v[:, None] >= W)
        b = C - (back & valid).sum(axis=1)
        keep = np.maximum(b - a, 0)
        need = int(keep.max()) + 1
        if need > width:
            self._grow(len(self.cnt), need)
            S, W = (self.ws, self.w) if whole else (self.ws[pos], self.w[pos])
            width, col = need, np.arange(need)
        rows = np.arange(n)
        take = np.minimum(a[:, None] + col, width - 1)
        S, W = S[rows[:, None], take], W[rows[:, None], take]
        S[rows, keep], W[rows, keep] = steps, v
        if whole:
            self.ws, self.w, self.cnt = S, W, keep + 1
            self.seg[:], self.last[:] = seg, steps
        else:
            self.ws[pos], self.w[pos], self.cnt[pos] = S, W, keep + 1
            self.seg[pos], self.last[pos] = seg, steps
        self.dirty = True

    # --- storage ----------------------------------------------------------------------

    def encode(self) -> str:
        """The JSON stored: keys, and each array as base64 (points packed entry after entry)."""
        valid = np.arange(self.ws.shape[1]) < self.cnt[:, None]
        if self.keys_json is None or self.keys_json[0] != len(self.keys):
            self.keys_json = (len(self.keys), json.dumps(self.keys))  # keys are only added
        arrays = (
            ("seg", to_b64(self.seg, INT)),
            ("last", to_b64(self.last, INT)),
            ("cnt", to_b64(self.cnt, INT)),
            ("from", to_b64(self.frm, INT)),
            ("settled", to_b64(self.settled, np.dtype("u1"))),
            ("ws", to_b64(self.ws[valid], INT)),
            ("w", to_b64(self.w[valid], FLOAT)),
        )
        # base64 needs no JSON escaping
        return "".join(['{"keys":', self.keys_json[1], *[f',"{k}":"{v}"' for k, v in arrays], "}"])

    @classmethod
    def decode(cls, state: Any) -> GrowthWindows:
        d = json.loads(state) if isinstance(state, str) else state
        out = cls()
        out.keys = list(d["keys"])
        out.index = {k: i for i, k in enumerate(out.keys)}
        out.seg, out.last = from_b64(d["seg"], INT), from_b64(d["last"], INT)
        out.cnt, out.frm = from_b64(d["cnt"], INT), from_b64(d["from"], INT)
        out.settled = from_b64(d["settled"], np.dtype("u1")).astype(bool)
        width = max(int(out.cnt.max()) if len(out.cnt) else 0, 4)
        out.ws = np.zeros((len(out.keys), width), np.int64)
        out.w = np.zeros((len(out.keys), width), np.float64)
        valid = np.arange(width) < out.cnt[:, None]
        out.ws[valid], out.w[valid] = from_b64(d["ws"], INT), from_b64(d["w"], FLOAT)
        out.new = False
        return out
