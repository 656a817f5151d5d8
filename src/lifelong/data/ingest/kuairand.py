"""KuaiRand-27K like/hate log (``processed_standard_kcore_15.csv``, tab-separated, header row).

Every row is an explicit action on a video the app showed, so each event carries the
impression bit plus what the user did:

- ``label=1`` (like) -> REPIN | LIKE; ``label=0`` (hate) -> HIDE, the real "hide" analogue;
- ``is_click`` -> CLICK, ``long_view`` -> LONG_VIEW, ``is_follow`` -> FOLLOW,
  ``is_comment`` -> COMMENT, ``is_forward`` -> SHARE (``is_profile_enter`` has no bit);
- ``ts_ms = time_ms``, ``dwell_ms = play_time_ms``; an item's ``duration_ms`` is the largest
  ``duration_ms`` logged for it (rows often log 0);
- surface homefeed; ``request_id`` = one chunk per (user, ``date``, ``hourmin``): KuaiRand logs
  the hour of each interaction, and ``date`` keeps the same hour of different days apart;
- ``author_id`` = 0 and ``topic_id`` = 0 (unknown): the filtered file carries neither the
  author nor a category, and we do not invent them.

Example::

    parsed = parse(Path("../shared/data/kuairand27k-likehate"))
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from lifelong.data.ingest.common import (
    INT32_MAX,
    ItemCatalog,
    Parsed,
    RowChecks,
    check_timestamp_ms,
    dense_ids,
    events_table,
    read_rows,
)
from lifelong.data.schema import EXPLICIT_BITS, SURFACE_CODES, Action

FILE = "processed_standard_kcore_15.csv"
FLAG_BITS = {
    "is_click": Action.CLICK,
    "long_view": Action.LONG_VIEW,
    "is_follow": Action.FOLLOW,
    "is_comment": Action.COMMENT,
    "is_forward": Action.SHARE,
}
REQUIRED = ("user_id", "video_id", "date", "hourmin", "time_ms", "play_time_ms", "duration_ms", "label",
            *FLAG_BITS)
MAPPING = {
    "action_mask": "IMPRESSION | (label=1: REPIN|LIKE, label=0: HIDE) | is_click:CLICK | long_view:LONG_VIEW"
                   " | is_follow:FOLLOW | is_comment:COMMENT | is_forward:SHARE",
    "ts_ms": "time_ms",
    "dwell_ms": "play_time_ms",
    "duration_ms": "max duration_ms logged for the video",
    "request_id": "one per (user, date, hourmin) chunk",
    "surface": "homefeed",
    "author_id": "0 (not in the file)",
    "topic_id": "0 (not in the file)",
    "media_type": "video",
}


def parse(src: Path) -> Parsed:
    """Read and validate the KuaiRand file of ``src``.

    Args:
        src: the ``kuairand27k-likehate`` folder.

    Raises:
        DataError: the file or one of its required header columns is missing.

    Example::

        events = parse(src).events
    """
    path = Path(src) / FILE
    rows = read_rows(path, "\t", header=True, required=REQUIRED)
    checks = RowChecks(rows)
    video = checks.ints("video_id")
    duration = checks.ints("duration_ms")
    checks.flag(duration > INT32_MAX, "duration_ms out of range")
    item_ok = checks.ok
    user = checks.ints("user_id")
    ts = checks.ints("time_ms", nonnegative=False)
    check_timestamp_ms(checks, ts)
    date = checks.ints("date")
    hourmin = checks.ints("hourmin")
    play = checks.ints("play_time_ms")
    checks.flag(play > INT32_MAX, "play_time_ms out of range")
    label = checks.flags01(("label",))["label"]
    flags = checks.flags01(tuple(FLAG_BITS))

    mask = np.where(label, int(Action.REPIN | Action.LIKE), int(Action.HIDE)) | int(Action.IMPRESSION)
    for name, bit in FLAG_BITS.items():
        mask |= np.where(flags[name], int(bit), 0)
    ok = checks.ok
    events = events_table(user[ok], video[ok], ts[ok], mask[ok], dense_ids(user[ok], date[ok], hourmin[ok]),
                          SURFACE_CODES["homefeed"], dwell_ms=play[ok])
    items = ItemCatalog.from_rows(video[item_ok], "video", duration_ms=duration[item_ok])
    return Parsed(len(rows), events, items, [checks], has_impressions=True, embedding_bits=EXPLICIT_BITS,
                  mapping=MAPPING, main_file=path)
