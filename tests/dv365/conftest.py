"""Fixtures of the DV365 tests."""

from __future__ import annotations

import pytest

from lifelong.store.feature_store import open_store


@pytest.fixture(params=["lmdb", "redis"])
def store_url(request, tmp_path):
    """An empty store of each backend."""
    if request.param == "lmdb":
        return f"lmdb://{tmp_path / 'emb'}"
    url = request.getfixturevalue("redis_url")
    with open_store(url) as store:  # the server lives for the whole session
        store.clear()
    return url
