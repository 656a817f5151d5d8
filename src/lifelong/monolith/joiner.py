"""The online joiner: impressions joined with the actions that follow them, emitted as labelled examples.

Monolith trains from a stream of joined examples (docs/design.md, "Monolith:
training"): an impression waits a while for the user's reaction, then becomes a training
example, positive for every head whose action came in time and negative otherwise.
:class:`OnlineJoiner` does this over a stream of events (:data:`~lifelong.store.stream.EVENT_DTYPE`
records, in time order), one batch at a time, with numpy sorts and scans, no loop per event:
per batch, a pass over the open windows plus a sort of the batch's actions together with the
windows that share their (user, item).

The rules (the tests restate them as a brute-force loop over a whole table):

- Every event has an *effective time*: the watermark on its arrival, i.e. the largest
  ``ts_ms`` seen so far, its own included. In a stream in time order that is its ``ts_ms``; a
  late event is handled as if it had happened at the watermark.
- An event with the IMPRESSION bit opens a window ``[t, t + window_ms)`` at its effective time
  ``t``, for the key (user_id, item_id, request_id). Its own explicit bits are its first labels:
  simulated worlds record an engaged impression as one event, ``IMPRESSION | CLICK | ...``.
- An event without the IMPRESSION bit but with explicit bits is an *action*. It is attributed
  to one earlier impression (in stream order) of the same user and item whose window is still
  open at the action's effective time: the latest one with the same request_id if any is open,
  else the latest one of any request. Its bits are OR-ed into that impression's action mask.
  An action with no open impression is counted (``stats.unattributed``) and dropped.
- Once the watermark reaches a window's end the impression is emitted, with its labels; an
  impression never engaged is a negative (every head 0).
- Examples come out in order of (window end, stream position), so every split of the stream
  into batches, with a checkpoint and restart between any two, emits the same sequence.

A restart resumes exactly: store :meth:`OnlineJoiner.state_dict` (open windows, watermark,
counters) together with the stream offset of the next event, then load it and read on from that
offset.

Example::

    joiner = OnlineJoiner(JoinerConfig(window_ms=30 * 60_000))
    for records, offset in stream.batches(offset, 4096):
        examples = joiner.push(records)   # EXAMPLE_DTYPE; examples["labels"] is (n, len(HEADS))
        train(examples)
        save_checkpoint(model, joiner.state_dict(), offset)
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields

import numpy as np

from lifelong.core.errors import ConfigError
from lifelong.data.schema import EXPLICIT_BITS, HEAD_BITS, HEADS, Action

__all__ = ["DEFAULT_WINDOW_MS", "EXAMPLE_DTYPE", "JoinStats", "JoinerConfig", "OnlineJoiner"]

DEFAULT_WINDOW_MS = 30 * 60_000

EXAMPLE_DTYPE = np.dtype([
    ("user_id", "<i8"), ("item_id", "<i8"), ("request_id", "<i8"), ("ts_ms", "<i8"), ("surface", "i1"),
    ("action_mask", "<u2"), ("labels", "u1", (len(HEADS),)),
])
"""One joined example: the impression (``ts_ms`` is its own time), every bit attributed to it,
and one 0/1 label per head of :data:`~lifelong.data.schema.HEADS`, in that order."""

_WINDOW_DTYPE = np.dtype([
    ("user_id", "<i8"), ("item_id", "<i8"), ("request_id", "<i8"), ("ts_ms", "<i8"), ("surface", "i1"),
    ("action_mask", "<u2"), ("end_ms", "<i8"), ("position", "<i8"),
])
_IMPRESSION_FIELDS = ("user_id", "item_id", "request_id", "ts_ms", "surface", "action_mask")
_HEAD_BITS = np.array([HEAD_BITS[h] for h in HEADS], dtype=np.uint16)
_NO_TIME = np.iinfo(np.int64).min  # the watermark before any event
_H1, _H2, _H3 = np.uint64(0x9E3779B97F4A7C15), np.uint64(0xC2B2AE3D27D4EB4F), np.uint64(0xBF58476D1CE4E5B9)


@dataclass(frozen=True)
class JoinerConfig:
    """How the joiner waits for actions.

    Args:
        window_ms: how long after an impression its actions count (the window is half-open).

    Example::

        >>> JoinerConfig(window_ms=0)
        Traceback (most recent call last):
        ...
        lifelong.core.errors.ConfigError: window_ms must be in (0, 2**62), got 0
    """

    window_ms: int = DEFAULT_WINDOW_MS

    def __post_init__(self) -> None:
        if not 0 < self.window_ms < 2**62:
            raise ConfigError(f"window_ms must be in (0, 2**62), got {self.window_ms}")


@dataclass
class JoinStats:
    """Counts since the joiner started (restored with its state).

    Args:
        events: events pushed.
        impressions: events with the IMPRESSION bit.
        actions: events without it but with explicit bits.
        attributed: actions OR-ed into an open impression.
        emitted: examples emitted.
    """

    events: int = 0
    impressions: int = 0
    actions: int = 0
    attributed: int = 0
    emitted: int = 0

    @property
    def unattributed(self) -> int:
        """Actions with no open impression of their user and item, dropped."""
        return self.actions - self.attributed


def _latest_before(w_keys: tuple[np.ndarray, ...], w_pos: np.ndarray, a_keys: tuple[np.ndarray, ...],
                   a_pos: np.ndarray) -> np.ndarray:
    """For each action, the index of the window with equal keys and the largest position below
    the action's, or -1 when there is none.

    One sort of windows and actions together by (keys, position); a running maximum then carries
    the last window seen forward onto the actions after it.
    """
    n_w = len(w_pos)
    keys = [np.concatenate([w, a]) for w, a in zip(w_keys, a_keys)]
    order = np.lexsort((np.concatenate([w_pos, a_pos]), *keys[::-1]))
    is_window = order < n_w
    last = np.maximum.accumulate(np.where(is_window, np.arange(order.size), -1))
    acts = np.flatnonzero(~is_window)
    prev = last[acts]
    found = prev >= 0
    prev = np.maximum(prev, 0)
    for k in keys:
        ks = k[order]
        found &= ks[prev] == ks[acts]
    out = np.empty(len(a_pos), dtype=np.int64)
    out[order[acts] - n_w] = np.where(found, order[prev], -1)
    return out


def _pair_slots(users: np.ndarray, items: np.ndarray, bits: int) -> np.ndarray:
    """A ``bits``-bit multiply-shift hash of each (user, item) pair."""
    h = (users.astype(np.uint64) * _H1) ^ (items.astype(np.uint64) * _H2)
    return ((h * _H3) >> np.uint64(64 - bits)).astype(np.intp)


def _near(windows: np.ndarray, acts: np.ndarray) -> np.ndarray:
    """Indices of the windows that may share (user, item) with an action: all that do, and a few
    that only share a hash slot (the exact comparison comes later). It keeps the sort of
    :func:`_latest_before` to about the batch's size however many windows are open."""
    bits = max(10, len(acts).bit_length() + 6)  # >= 64 slots per action: ~1.5% false positives
    marked = np.zeros(1 << bits, dtype=bool)
    marked[_pair_slots(acts["user_id"], acts["item_id"], bits)] = True
    return np.flatnonzero(marked[_pair_slots(windows["user_id"], windows["item_id"], bits)])


def _latest_open(windows: np.ndarray, names: tuple[str, ...], acts: np.ndarray, a_pos: np.ndarray,
                 a_wm: np.ndarray) -> np.ndarray:
    """Like :func:`_latest_before` on the fields ``names``, keeping only windows still open at
    each action's effective time. Window ends grow with position, so when the latest window of
    a key is closed, all earlier ones are too."""
    target = _latest_before(tuple(windows[n] for n in names), windows["position"],
                            tuple(acts[n] for n in names), a_pos)
    found = target >= 0
    found[found] = windows["end_ms"][target[found]] > a_wm[found]
    return np.where(found, target, -1)


def _examples(windows: np.ndarray) -> np.ndarray:
    out = np.empty(len(windows), EXAMPLE_DTYPE)
    for name in _IMPRESSION_FIELDS:
        out[name] = windows[name]
    out["labels"] = (windows["action_mask"][:, None] & _HEAD_BITS) != 0
    return out


class OnlineJoiner:
    """Joins a stream of events into labelled examples; see the module docstring for the rules.

    Args:
        cfg: the window length.

    Example::

        >>> from lifelong.store.stream import EVENT_DTYPE
        >>> ev = np.zeros(3, EVENT_DTYPE)
        >>> ev["user_id"], ev["request_id"], ev["item_id"] = 1, 5, [7, 8, 7]
        >>> ev["ts_ms"] = [0, 0, 60_000]
        >>> ev["action_mask"] = [Action.IMPRESSION, Action.IMPRESSION | Action.CLICK, Action.REPIN]
        >>> joiner = OnlineJoiner(JoinerConfig(window_ms=120_000))
        >>> len(joiner.push(ev))  # at t = 60 s both windows are still open
        0
        >>> tick = np.zeros(1, EVENT_DTYPE)
        >>> tick["ts_ms"] = 120_000  # any event moves the watermark
        >>> out = joiner.push(tick)
        >>> out["item_id"].tolist(), out["labels"].tolist()  # heads: click, repin, long_view, hide
        ([7, 8], [[0, 1, 0, 0], [1, 0, 0, 0]])
    """

    def __init__(self, cfg: JoinerConfig | None = None):
        self.cfg = cfg or JoinerConfig()
        self.stats = JoinStats()
        self._open = np.empty(0, _WINDOW_DTYPE)  # in stream order, hence in order of end_ms
        self._watermark = int(_NO_TIME)
        self._position = 0

    @property
    def watermark(self) -> int | None:
        """The largest ``ts_ms`` seen (None before any event)."""
        return None if self._watermark == _NO_TIME else self._watermark

    @property
    def position(self) -> int:
        """Events pushed so far, restarts included."""
        return self._position

    @property
    def n_open(self) -> int:
        """Impressions waiting for their window to close."""
        return len(self._open)

    def push(self, events: np.ndarray) -> np.ndarray:
        """Consume the next events of the stream; return the examples whose window closed.

        Args:
            events: a structured array with the fields of
                :data:`~lifelong.store.stream.EVENT_DTYPE` (``dwell_ms`` is not used).

        Returns:
            :data:`EXAMPLE_DTYPE` examples, in order of (window end, stream position).
        """
        n = len(events)
        if not n:
            return np.empty(0, EXAMPLE_DTYPE)
        mask = np.asarray(events["action_mask"]).astype(np.uint16)
        wm = np.maximum.accumulate(np.maximum(np.asarray(events["ts_ms"], dtype=np.int64), self._watermark))
        pos = self._position + np.arange(n, dtype=np.int64)
        is_imp = (mask & int(Action.IMPRESSION)) != 0
        is_act = ~is_imp & ((mask & EXPLICIT_BITS) != 0)

        new = np.empty(int(is_imp.sum()), _WINDOW_DTYPE)
        for name in _IMPRESSION_FIELDS:
            new[name] = events[name][is_imp]
        new["end_ms"] = wm[is_imp] + self.cfg.window_ms
        new["position"] = pos[is_imp]
        windows = np.concatenate([self._open, new])

        attributed = 0
        if is_act.any():
            acts, a_pos, a_wm = events[is_act], pos[is_act], wm[is_act]
            near = _near(windows, acts)
            candidates = windows[near]
            target = _latest_open(candidates, ("user_id", "item_id", "request_id"), acts, a_pos, a_wm)
            rest = np.flatnonzero(target < 0)
            if rest.size:
                target[rest] = _latest_open(candidates, ("user_id", "item_id"), acts[rest], a_pos[rest], a_wm[rest])
            hit = target >= 0
            np.bitwise_or.at(windows["action_mask"], near[target[hit]], mask[is_act][hit])
            attributed = int(hit.sum())

        self._watermark, self._position = int(wm[-1]), self._position + n
        closed = windows["end_ms"] <= self._watermark
        self._open = windows[~closed]
        out = _examples(windows[closed])
        s = self.stats
        s.events, s.impressions, s.actions = s.events + n, s.impressions + len(new), s.actions + int(is_act.sum())
        s.attributed, s.emitted = s.attributed + attributed, s.emitted + len(out)
        return out

    def flush(self) -> np.ndarray:
        """Emit every open impression now, with the labels it has: only at the end of a finite
        stream (later actions can no longer reach these impressions)."""
        out = _examples(self._open)
        self._open = np.empty(0, _WINDOW_DTYPE)
        self.stats.emitted += len(out)
        return out

    def state_dict(self) -> dict[str, np.ndarray]:
        """Everything that defines the joiner, as plain numpy arrays (copies): save it with the
        stream offset of the next event."""
        state = {f"open.{name}": self._open[name].copy() for name in _WINDOW_DTYPE.names}
        state["window_ms"] = np.array(self.cfg.window_ms, dtype=np.int64)
        state["watermark"] = np.array(self._watermark, dtype=np.int64)
        state["position"] = np.array(self._position, dtype=np.int64)
        state.update({f"stats.{k}": np.array(v, dtype=np.int64) for k, v in asdict(self.stats).items()})
        return state

    def load_state_dict(self, state: dict[str, np.ndarray]) -> None:
        """Restore :meth:`state_dict` output.

        Raises:
            ValueError: an entry is missing or malformed, or the state was saved with another
                window length (its open windows would close at the wrong time).
        """
        names = [f"open.{n}" for n in _WINDOW_DTYPE.names]
        scalars = ["window_ms", "watermark", "position"] + [f"stats.{f.name}" for f in fields(JoinStats)]
        missing = [k for k in names + scalars if k not in state]
        if missing:
            raise ValueError(f"joiner state lacks {', '.join(missing)}")
        if any(np.shape(state[k]) != () for k in scalars) or len({np.shape(state[k]) for k in names}) != 1 \
                or np.ndim(state[names[0]]) != 1:
            raise ValueError("joiner state: scalars must be 0-d and the open.* arrays 1-d of one length")
        if int(state["window_ms"]) != self.cfg.window_ms:
            raise ValueError(f"joiner state was saved with window_ms={int(state['window_ms'])}, "
                             f"this joiner has {self.cfg.window_ms}")
        opened = np.empty(len(state[names[0]]), _WINDOW_DTYPE)
        for name in _WINDOW_DTYPE.names:
            opened[name] = state[f"open.{name}"]
        self._open = opened
        self._watermark, self._position = int(state["watermark"]), int(state["position"])
        self.stats = JoinStats(**{f.name: int(state[f"stats.{f.name}"]) for f in fields(JoinStats)})
