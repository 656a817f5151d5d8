"""Where ids sit in an ascending array of unique ids: the one binary search every lookup shares."""

from __future__ import annotations

import numpy as np


def positions_in(sorted_ids: np.ndarray, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Position of each of ``ids`` in ``sorted_ids``, and whether it is there.

    Where an id is absent its position is only a valid index (of a neighbour), so a gather
    with it never fails; mask it with the second array.

    Example::

        >>> pos, found = positions_in(np.array([2, 5, 9]), np.array([5, 3, 10]))
        >>> pos.tolist(), found.tolist()
        ([1, 1, 2], [True, False, False])
    """
    ids = np.asarray(ids)
    if not len(sorted_ids):
        return np.zeros(ids.shape, np.int64), np.zeros(ids.shape, bool)
    pos = np.minimum(np.searchsorted(sorted_ids, ids), len(sorted_ids) - 1)
    return pos, sorted_ids[pos] == ids
