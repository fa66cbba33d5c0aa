"""One growth rule's windows over all of a run's series, as arrays: one rule_state row per
(run, rule) instead of one JSON list per series, updated for a whole batch in a few numpy calls
(and a second row with the series' keys, written only when an entry is added).

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
import math
from typing import Any

import numpy as np

from logitwatch.service.rules.model import Growth

__all__ = [
    "FLOAT",
    "INT",
    "KEYS_PREFIX",
    "PREFIX",
    "GrowthWindows",
    "block_key",
    "from_b64",
    "keys_key",
    "to_b64",
]

#: rule_state keys of the blocks: a series key starts with a metric name ([a-z]), never "#".
PREFIX = "#"
_PLAIN = frozenset(("ws", "w", "from", "settled"))
_INT, _FLOAT = frozenset((int,)), frozenset((float,))
#: The most cells (entries x points) ``many`` lays out at a time.
_CELLS = 1 << 17
#: Steps before and after every real one: what pads a row of ``_many``'s layout.
_BEFORE, _AFTER = np.iinfo(np.int64).min, np.iinfo(np.int64).max
INT = np.dtype("<i8")
FLOAT = np.dtype("<f8")


#: rule_state keys of the blocks' series keys, a row of their own: entries are only added,
#: so the keys (a third of a fleet block) are written when an entry comes, not every step.
#: A rule's name is [a-z0-9_.-]: "##" + name is never a block's key.
KEYS_PREFIX = PREFIX * 2


def block_key(rule: str) -> str:
    return PREFIX + rule


def keys_key(rule: str) -> str:
    return KEYS_PREFIX + rule


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
        "keys_stored",
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
        #: How many keys the keys row holds (-1: there is none yet).
        self.keys_stored = -1

    # --- entries ----------------------------------------------------------------------

    def slots(self, keys: list[str], m: np.ndarray, segment: int, owner: Any) -> np.ndarray:
        """Positions of ``keys[m]``, adding empty entries for the ones not here yet. The
        answer is kept for the next batch with the same ``owner`` (a layout) and ``m``:
        entries are only ever added."""
        if self.memo is not None:
            was, wm, pos = self.memo
            if was is owner and (wm is m or np.array_equal(wm, m)):
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
            or (ws and not set(map(type, ws)) <= _INT)
            or (w and not set(map(type, w)) <= _FLOAT)
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

    def one(
        self, c: Growth, pos: np.ndarray, steps: np.ndarray, v: np.ndarray, settle: bool, seg: int
    ) -> np.ndarray:
        """One point per entry (finite |values| ``v`` at ``steps``, from the rule's start on):
        ``conditions._growth``'s verdict on each, the series still settling (``settle``: the
        rule settles and the run has no warmup) included. The entries whose verdict is not
        active move as ``_growth`` moves them (window, ``from``, ``settled``); the others are
        left as they were, to go one by one. Returns which moved."""
        n = len(pos)
        whole = n == len(self.cnt) and bool((pos == np.arange(n)).all())
        W, C = (self.w, self.cnt) if whole else (self.w[pos], self.cnt[pos])
        S = self.ws if whole else self.ws[pos]
        valid = np.arange(W.shape[1]) < C[:, None]
        a = (((steps - c.over_steps)[:, None] > S) & valid).sum(axis=1)  # cut at the front
        has = a < C
        rise = c.ratio > 1
        settling = ~self.settled[pos] if settle else None
        if settling is not None and not settling.any():
            settling = None  # every entry settled: the verdicts are the plain ones
        if rise and settling is None and c.min_value > 0 and (v < c.ratio * c.min_value).all():
            # A rise fires only from ratio x min_value: no verdict here can be active.
            self._move(c, pos, whole, S, W, C, valid, a, steps, v, seg)
            return np.ones(n, bool)
        base = W[np.arange(n), np.minimum(a, W.shape[1] - 1)]  # the window's front
        if rise:
            limit = c.ratio * np.maximum(base, c.min_value)
            active = has & (limit > 0) & (v >= limit)
        else:
            active = has & (base >= c.min_value) & (v <= c.ratio * base)
        if settling is not None:
            was = self.frm[pos]
            frm = np.where(settling & (was < 0), steps, was)
            half = math.sqrt(c.ratio) * base
            moving = (v >= half) if rise else (v <= half)
            settles = settling & has & ~moving & (steps - frm >= c.over_steps)
            active &= ~settling | settles
            ok = ~active
            self.frm[pos[ok]] = np.where(settles, -1, frm)[ok]
            self.settled[pos[ok]] |= settles[ok]
        ok = ~active
        if ok.all():
            self._move(c, pos, whole, S, W, C, valid, a, steps, v, seg)
        else:
            self.push(c, pos[ok], steps[ok], v[ok], seg)
        return ok

    def many(
        self,
        c: Growth,
        pos: np.ndarray,
        k: np.ndarray,
        steps: np.ndarray,
        v: np.ndarray,
        settle: bool,
        seg: int,
        last: np.ndarray,
    ) -> np.ndarray:
        """``one`` for ``k[i]`` >= 1 points per entry ``pos[i]``, given entry after entry in
        ``steps``/``v`` (ascending steps); ``last``: each series' last step (the entry's
        ``last`` after, as ``put`` sets it). Returns which moved."""
        width = self.cnt[pos] + k
        if len(pos) * int(width.max()) <= _CELLS:
            return self._many(c, pos, k, steps, v, settle, seg, last)
        ok = np.zeros(len(pos), bool)
        starts = np.cumsum(k) - k
        i = 0
        while i < len(pos):  # as many entries at a time as _CELLS allow, at least one
            widest = np.maximum.accumulate(width[i:])
            j = i + max(1, int((np.arange(1, len(widest) + 1) * widest <= _CELLS).sum()))
            at = slice(starts[i], starts[j - 1] + k[j - 1])
            ok[i:j] = self._many(c, pos[i:j], k[i:j], steps[at], v[at], settle, seg, last[i:j])
            i = j
        return ok

    def _many(
        self,
        c: Growth,
        pos: np.ndarray,
        k: np.ndarray,
        steps: np.ndarray,
        v: np.ndarray,
        settle: bool,
        seg: int,
        last: np.ndarray,
    ) -> np.ndarray:
        """``many`` over a few entries, laid out one row each: the old window ending at
        column ``old``, then the new points. Every point's verdict is found at once: the
        window's front when a point comes is the minimum (a drop: maximum) of the points
        within ``over_steps`` before it, old window included (a sparse table answers each);
        an entry moves only if none of its verdicts is active."""
        n, rise = len(pos), c.ratio > 1
        pad = np.inf if rise else -np.inf
        C = self.cnt[pos]
        old, kmax = int(C.max()), int(k.max())
        width = old + kmax
        col = np.arange(width)
        S2 = np.empty((n, width), np.int64)
        V2 = np.empty((n, width))
        if old:
            shift = col[:old] - (old - C)[:, None]  # column in the entry; < 0: before it
            inside = shift >= 0
            src = np.maximum(shift, 0)
            S2[:, :old] = np.where(inside, self.ws[pos[:, None], src], _BEFORE)
            V2[:, :old] = np.where(inside, self.w[pos[:, None], src], pad)
        starts = np.cumsum(k) - k
        rows = np.arange(n)
        ragged = int(k.min()) != kmax
        if ragged:
            S2[:, old:], V2[:, old:] = _AFTER, pad
            at = np.arange(len(steps)) + np.repeat(rows * width + old - starts, k)
            S2.ravel()[at], V2.ravel()[at] = steps, v
        else:
            S2[:, old:], V2[:, old:] = steps.reshape(n, kmax), v.reshape(n, kmax)
        # The window after every point (conditions._growth_window): the points within
        # over_steps of the last, each smaller (a drop: larger) than every later one. Steps
        # ascend one at least apart: only the last over_steps + 1 columns of a row can be in.
        c0 = max(0, old + int(k.min()) - 1 - c.over_steps)
        S, V = S2[:, c0:], V2[:, c0:]
        after = (np.minimum if rise else np.maximum).accumulate(V[:, ::-1], axis=1)[:, ::-1]
        keep = np.ones(V.shape, bool)
        (np.less if rise else np.greater)(V[:, :-1], after[:, 1:], out=keep[:, :-1])
        keep &= (S2[rows, old + k - 1] - c.over_steps)[:, None] <= S
        if ragged:
            keep &= col[c0:] < (old + k)[:, None]
        # Entries no verdict can hold without a look at each point (conditions._growth_quiet).
        top = np.maximum.reduceat(v, starts)
        settling = ~self.settled[pos] if settle else np.zeros(n, bool)
        if rise:
            quiet = (top < c.ratio * c.min_value) if c.min_value > 0 else np.zeros(n, bool)
        else:
            quiet = (np.maximum(top, V2[:, :old].max(axis=1)) if old else top) < c.min_value
        quiet &= ~settling
        ok = np.ones(n, bool)
        settles = np.zeros(n, bool)
        look = np.flatnonzero(~quiet)
        frm = self.frm[pos]
        if len(look):
            sel = np.zeros(n, bool)
            sel[look] = True
            sel = np.repeat(sel, k)
            r = np.repeat(rows, k)[sel]
            j = (old + np.arange(len(steps)) - np.repeat(starts, k))[sel]
            held, settles[look] = _verdicts(c, S2, V2, r, j, settling, frm, old)
            ok[look] = ~held
            if not ok.any():
                return ok
        if settle:
            frm = np.where(settling & (frm < 0), S2[:, old], frm)  # the first point sets it
            self.frm[pos[ok]] = np.where(settles, -1, frm)[ok]
            self.settled[pos[ok]] |= settles[ok]
        kept = keep if ok.all() else keep & ok[:, None]
        cnt = kept.sum(axis=1)
        self._grow(len(self.cnt), int(cnt.max()))
        rr, cc = np.nonzero(kept)
        dest = np.arange(len(rr)) - np.repeat(np.cumsum(cnt) - cnt, cnt)
        self.ws[pos[rr], dest], self.w[pos[rr], dest] = S[rr, cc], V[rr, cc]
        self.cnt[pos[ok]] = cnt[ok]
        self.seg[pos[ok]], self.last[pos[ok]] = seg, last[ok]
        self.dirty = True
        return ok

    def touch(self, pos: np.ndarray, seg: int, last: np.ndarray) -> None:
        """Series whose new points change nothing (none finite, or before the rule's start):
        their non-empty entries take the series' segment and last step, as ``put`` does."""
        used = (self.cnt[pos] > 0) | (self.frm[pos] >= 0) | self.settled[pos]
        if used.any():
            self.seg[pos[used]], self.last[pos[used]] = seg, last[used]
            self.dirty = True

    def push(self, c: Growth, pos: np.ndarray, steps: np.ndarray, v: np.ndarray, seg: int) -> None:
        """One point per entry, none of which can hold: ``_growth``'s window moves, in one go."""
        if not len(pos):
            return
        n = len(pos)
        # Every entry in order (a run's one layout): no gather, no scatter.
        whole = n == len(self.cnt) and bool((pos == np.arange(n)).all())
        S, W, C = (
            (self.ws, self.w, self.cnt) if whole else (self.ws[pos], self.w[pos], self.cnt[pos])
        )
        valid = np.arange(S.shape[1]) < C[:, None]
        a = (((steps - c.over_steps)[:, None] > S) & valid).sum(axis=1)
        self._move(c, pos, whole, S, W, C, valid, a, steps, v, seg)

    def _move(self, c, pos, whole, S, W, C, valid, a, steps, v, seg) -> None:
        """``push`` given the entries' windows ``S``/``W``/``C`` (all of them, in order, when
        ``whole``), which points are ``valid`` and how many leave at the front (``a``).

        The deque is monotonic (rising: each point smaller than every later one), so the
        points that leave it, too old at the front and no smaller than ``v`` at the back,
        leave the slice [a, b) of each entry."""
        n, width = len(pos), S.shape[1]
        back = (v[:, None] <= W) if c.ratio > 1 else (v[:, None] >= W)
        b = C - (back & valid).sum(axis=1)
        keep = np.maximum(b - a, 0)
        need = int(keep.max()) + 1
        col = np.arange(width)
        if need > width:
            self._grow(len(self.cnt), need)
            S, W = (self.ws, self.w) if whole else (self.ws[pos], self.w[pos])
            width, col = need, np.arange(need)
        # The entries whose front leaves (a few a step) shift left; the others keep their
        # columns: the new point goes at ``keep`` in every entry, in place.
        shift = np.flatnonzero(a)
        if len(shift):
            take = np.minimum(a[shift, None] + col, width - 1)
            S[shift] = np.take_along_axis(S[shift], take, 1)
            W[shift] = np.take_along_axis(W[shift], take, 1)
        rows = np.arange(n)
        S[rows, keep], W[rows, keep] = steps, v
        if whole:
            self.cnt = keep + 1
            self.seg[:], self.last[:] = seg, steps
        else:
            self.ws[pos], self.w[pos], self.cnt[pos] = S, W, keep + 1
            self.seg[pos], self.last[pos] = seg, steps
        self.dirty = True

    # --- storage ----------------------------------------------------------------------

    def encode(self) -> str:
        """The block's JSON: its number of entries, and each array as base64 (points packed
        entry after entry) or one number (_packed). The keys go in a row of their own
        (keys_row). The points are stored as small as they come back exactly (_points)."""
        valid = np.arange(self.ws.shape[1]) < self.cnt[:, None]
        arrays = (
            ("seg", _packed(self.seg, INT)),
            ("last", _packed(self.last, INT)),
            _counts(self.cnt),
            ("from", _packed(self.frm, INT)),
            ("settled", _packed(self.settled, np.dtype("u1"))),
            *_points(self.ws[valid], self.w[valid], np.repeat(self.last, self.cnt)),
        )
        # base64 needs no JSON escaping
        return "".join([f'{{"n":{len(self.keys)}', *[f',"{k}":{v}' for k, v in arrays], "}"])

    def keys_row(self) -> str | None:
        """The keys row's JSON when it lacks entries added since it was stored, else None."""
        if len(self.keys) == self.keys_stored:
            return None
        return json.dumps(self.keys)

    @classmethod
    def decode(cls, state: Any, keys: Any = None) -> GrowthWindows:
        """The block stored as ``state``, with its keys row ``keys`` (a block stored before
        the keys had a row of their own holds them; its next save writes the row)."""
        d = json.loads(state) if isinstance(state, str) else state
        out = cls()
        if "keys" in d:
            out.keys = list(d["keys"])
        else:
            if keys is None:
                raise ValueError("a growth block without its keys row")
            out.keys = list(json.loads(keys) if isinstance(keys, str) else keys)
            if len(out.keys) < d["n"]:
                raise ValueError(f"a growth block of {d['n']} entries with {len(out.keys)} keys")
            out.keys_stored = len(out.keys)
            del out.keys[d["n"] :]
        out.index = {k: i for i, k in enumerate(out.keys)}
        n = len(out.keys)
        out.seg, out.last = _unpacked(d["seg"], INT, n), _unpacked(d["last"], INT, n)
        out.frm = _unpacked(d["from"], INT, n)
        out.cnt = _unpacked(d["cnt"], INT, n) if "cnt" in d else _unpacked(d["cnt1"], _U1, n)
        out.cnt = out.cnt.astype(np.int64, copy=False)
        out.settled = _unpacked(d["settled"], np.dtype("u1"), n).astype(bool)
        width = max(int(out.cnt.max()) if len(out.cnt) else 0, 4)
        out.ws = np.zeros((len(out.keys), width), np.int64)
        out.w = np.zeros((len(out.keys), width), np.float64)
        valid = np.arange(width) < out.cnt[:, None]
        out.ws[valid], out.w[valid] = _unpoints(d, np.repeat(out.last, out.cnt))
        out.new = False
        return out


def _packed(a: np.ndarray, dtype: np.dtype) -> str:
    """A per-entry array as JSON: one number when every entry holds it (a fleet's entries
    mostly share their segment, last step, count and settledness: 6 of a 144-entry block's
    14 KB), else a base64 string."""
    if len(a) and (a == a[0]).all():
        return str(int(a[0]))
    return f'"{to_b64(a, dtype)}"'


#: The window points' steps, stored as how far each is behind its entry's last step when
#: that fits one of these (a window spans over_steps at most): "ws1" for bytes, ...; else
#: "ws", the steps themselves.
_BACK = ((1, np.dtype("u1")), (2, np.dtype("<u2")), (4, np.dtype("<u4")))
_F4 = np.dtype("<f4")
_U1 = np.dtype("u1")


def _counts(cnt: np.ndarray) -> tuple[str, str]:
    """The entries' point counts: "cnt1" (bytes) when they differ and each is under 256."""
    if len(cnt) and not (cnt == cnt[0]).all() and cnt.max() <= 255:
        return "cnt1", f'"{to_b64(cnt, _U1)}"'
    return "cnt", _packed(cnt, INT)


def _points(ws: np.ndarray, w: np.ndarray, last: np.ndarray) -> list[tuple[str, str]]:
    """The window points (steps ``ws``, |values| ``w``, each point's entry's ``last`` step)
    as JSON fields: steps as distances back from ``last`` in the fewest bytes that hold them,
    values as float32 when every one is a float32 (an agent's device metrics are), else
    float64. A noisy fleet block is 3.3 KB so (11.3 KB stored whole, counts as bytes too), and
    the rows of the two growth rules were most of the pages a report wrote, measured."""
    out = []
    back = last - ws
    if len(back) and back.min() >= 0:
        top = int(back.max())
        for size, dtype in _BACK:
            if top <= np.iinfo(dtype).max:
                out.append((f"ws{size}", f'"{to_b64(back, dtype)}"'))
                break
    if not out:
        out.append(("ws", f'"{to_b64(ws, INT)}"'))
    with np.errstate(over="ignore"):  # beyond float32: inf, so not exact
        narrow = w.astype(_F4)
    if (narrow.astype(FLOAT) == w).all():  # exact (a NaN is never stored in a window)
        out.append(("w4", f'"{to_b64(narrow, _F4)}"'))
    else:
        out.append(("w", f'"{to_b64(w, FLOAT)}"'))
    return out


def _unpoints(d: dict[str, Any], last: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """What _points stored (or a block of an earlier version: "ws" and "w" only): the
    points' steps and |values|, given each point's entry's ``last`` step."""
    if "ws" in d:
        ws = from_b64(d["ws"], INT)
    else:
        size, dtype = next((n, t) for n, t in _BACK if f"ws{n}" in d)
        ws = last - from_b64(d[f"ws{size}"], dtype).astype(INT)
    w = from_b64(d["w"], FLOAT) if "w" in d else from_b64(d["w4"], _F4).astype(FLOAT)
    return ws, w


def _unpacked(v: int | str, dtype: np.dtype, n: int) -> np.ndarray:
    """What _packed stored, as an array of ``n`` entries."""
    if isinstance(v, int):
        return np.full(n, v, dtype=dtype.newbyteorder("="))
    return from_b64(v, dtype)


def _verdicts(
    c: Growth,
    S2: np.ndarray,
    V2: np.ndarray,
    r: np.ndarray,
    j: np.ndarray,
    settling: np.ndarray,
    frm: np.ndarray,
    old: int,
) -> tuple[np.ndarray, np.ndarray]:
    """``GrowthWindows._many``'s look at each point (rows ``r``, columns ``j``, row after
    row) of some of its entries: for each of those entries, whether a verdict is active at
    any of its points, and whether it settles."""
    rise = c.ratio > 1
    step = S2[r, j]
    # lo: the first column within over_steps of the point (steps ascend along a row)
    t = step - c.over_steps
    lo, hi = np.zeros(len(r), np.intp), j.copy()
    while (open_ := lo < hi).any():
        mid = (lo + hi) // 2
        less = (S2[r, mid] < t) & open_
        lo = np.where(less, mid + 1, lo)
        hi = np.where(less | ~open_, hi, mid)
    span = j - lo
    has = span > 0
    # A sparse table: level e holds the minimum (a drop: maximum) of 2**e points from each.
    acc = np.minimum if rise else np.maximum
    levels = [V2]
    while 2 ** len(levels) <= V2.shape[1]:
        prev, h = levels[-1], 2 ** (len(levels) - 1)
        nxt = np.full_like(V2, np.inf if rise else -np.inf)
        nxt[:, :-h] = acc(prev[:, :-h], prev[:, h:])
        levels.append(nxt)
    table = np.stack(levels)
    e = np.frexp(np.maximum(span, 1))[1] - 1  # floor(log2(span))
    base = acc(table[e, r, lo], table[e, r, np.maximum(j - (1 << e), 0)])  # the front
    v = V2[r, j]
    if rise:
        limit = c.ratio * np.maximum(base, c.min_value)
        active = has & (limit > 0) & (v >= limit)
    else:
        active = has & (base >= c.min_value) & (v <= c.ratio * base)
    firsts = np.flatnonzero(np.r_[True, r[1:] != r[:-1]])  # each entry's first point
    rows = r[firsts]
    settles = np.zeros(len(rows), bool)
    if settling[rows].any():
        half = math.sqrt(c.ratio) * base
        moving = (v >= half) if rise else (v <= half)
        began = np.where(frm[r] >= 0, frm[r], S2[r, old])
        can = settling[r] & has & ~moving & (step - began >= c.over_steps)
        never = np.iinfo(np.intp).max
        first = np.minimum.reduceat(np.where(can, j, never), firsts)
        settles = settling[rows] & (first < never)
        # While settling no verdict is active; from the point that settles it on, each is.
        group = np.repeat(np.arange(len(rows)), np.diff(np.r_[firsts, len(r)]))
        active &= ~settling[r] | (j >= first[group])
    return np.logical_or.reduceat(active, firsts), settles
