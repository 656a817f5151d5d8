"""MovieLens latest-small (``ratings.csv`` and ``movies.csv``, comma-separated, header rows).

A rating is an explicit judgement, never an impression (MovieLens logs no shown-but-unrated
movies, so ``has_impressions`` is false and impression sequences stay empty):

- rating >= 4 -> REPIN (strong positive), rating <= 2 -> HIDE (negative),
  2.5..3.5 -> CLICK (weak engagement); ratings must be half stars in 0.5..5;
- ``ts_ms = timestamp * 1000``; ``request_id`` = one chunk per (user, UTC day), the unit of
  HIT@K evaluation for this source;
- ``topic_id`` = 1-based rank of the movie's first genre in the sorted genre vocabulary of
  ``movies.csv``; 0 = unknown (``(no genres listed)`` or a movie missing from ``movies.csv``);
- media image, surface ``other`` (ratings are not a feed), dwell 0, author 0.

``movies.csv`` titles contain commas and quotes, so its lines are read as
``movieId,<title>,genres`` (genres never contain commas); unreadable lines are quarantined with
reasons prefixed ``movies.csv:`` and their movies get topic 0.

Example::

    parsed = parse(Path("../shared/data/movielens-latest-small"))
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from lifelong.core.errors import DataError
from lifelong.data.ingest.common import (
    ItemCatalog,
    Parsed,
    RowChecks,
    TextRows,
    dense_ids,
    events_table,
    lookup,
    read_lines,
    read_rows,
    seconds_to_ms,
    vocabulary_codes,
)
from lifelong.data.protocol import DAY_MS
from lifelong.data.schema import EXPLICIT_BITS, SURFACE_CODES, Action

RATINGS = "ratings.csv"
MOVIES = "movies.csv"
NO_GENRE = "(no genres listed)"
MAPPING = {
    "action_mask": "rating >= 4: REPIN, rating <= 2: HIDE, 2.5..3.5: CLICK; no impression bit",
    "ts_ms": "timestamp * 1000",
    "request_id": "one per (user, UTC day)",
    "surface": "other",
    "topic_id": "1 + index of the first genre in the sorted genre vocabulary of movies.csv, 0 = unknown",
    "media_type": "image",
    "author_id": "0 (not in the data)",
}


def parse(src: Path) -> Parsed:
    """Read and validate ``ratings.csv`` and ``movies.csv`` of ``src``.

    Args:
        src: the ``movielens-latest-small`` folder.

    Raises:
        DataError: a file or a required header column is missing.

    Example::

        events = parse(src).events
    """
    src = Path(src)
    movie_ids, movie_topics, movie_checks = _movie_topics(src / MOVIES)
    path = src / RATINGS
    rows = read_rows(path, ",", header=True, required=("userId", "movieId", "rating", "timestamp"))
    checks = RowChecks(rows)
    movie = checks.ints("movieId")
    item_ok = checks.ok
    user = checks.ints("userId")
    rating = checks.floats("rating")
    checks.flag((rating < 0.5) | (rating > 5.0), "rating out of range")
    checks.flag(rating * 2 != np.round(rating * 2), "rating not a half-star step")
    ts = seconds_to_ms(checks, checks.ints("timestamp", nonnegative=False))

    mask = np.where(rating >= 4, int(Action.REPIN), np.where(rating <= 2, int(Action.HIDE), int(Action.CLICK)))
    ok = checks.ok
    events = events_table(user[ok], movie[ok], ts[ok], mask[ok], dense_ids(user[ok], ts[ok] // DAY_MS),
                          SURFACE_CODES["other"])
    items = ItemCatalog.from_rows(movie[item_ok], "image", topic_ids=lookup(movie_ids, movie_topics, movie[item_ok]))
    return Parsed(len(rows), events, items, [checks, movie_checks], has_impressions=False,
                  embedding_bits=EXPLICIT_BITS, mapping=MAPPING, main_file=path)


def _movie_topics(path: Path) -> tuple[np.ndarray, np.ndarray, RowChecks]:
    """Sorted movie ids of ``movies.csv`` with their first-genre topic codes.

    The vocabulary is every genre named anywhere in the file, so a topic code means the same
    genre whether it came first or not.
    """
    lines, line_no = read_lines(path)
    if len(lines) == 0:
        raise DataError(path, "empty file: no header line")
    header = lines[0].as_py().split(",")
    for col, at in (("movieId", 0), ("genres", -1)):
        if header[at].strip() != col:
            raise DataError(path, "missing header column", column=col)
    lines, line_no = lines.slice(1), line_no[1:]
    parts = pc.extract_regex(lines, r"^(?P<movieId>[^,]*),(?P<title>.*),(?P<genres>[^,]*)$")
    well_formed = parts.is_valid().to_numpy(zero_copy_only=False)
    columns = {name: parts.field(name) for name in ("movieId", "title", "genres")}
    checks = RowChecks(TextRows(path, tuple(columns), lines, line_no, columns, well_formed), prefix=f"{MOVIES}: ")
    ids = checks.ints("movieId")
    genres = pc.split_pattern(checks.rows.column("genres"), "|")
    first = pc.utf8_trim_whitespace(pc.list_element(genres, 0))
    checks.flag_duplicates(ids, "duplicate movieId")
    ok = checks.ok
    vocabulary = pc.unique(pc.utf8_trim_whitespace(pc.list_flatten(genres.filter(pa.array(ok))))).to_pylist()
    codes, _ = vocabulary_codes(first.filter(pa.array(ok)), [g for g in vocabulary if g != NO_GENRE])
    order = np.argsort(ids[ok])
    return ids[ok][order], codes[order], checks

