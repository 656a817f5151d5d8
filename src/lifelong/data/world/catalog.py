"""Topics and items of a simulated world: latent vectors, observed embeddings, popularity.

The catalogue also precomputes what the request loop samples from: items grouped by topic
with one cumulative popularity array (so "an item of topic t by popularity" and "an item by
global popularity" are both a single ``searchsorted``) and, per item, the similarity kernel to
its few nearest topics (the kernel is zero beyond them).

Example::

    >>> import numpy as np
    >>> from lifelong.data.world.config import PRESETS
    >>> cat = make_catalog(PRESETS["tiny"], np.random.default_rng(0))
    >>> cat.table.num_rows, cat.near_topic.shape
    (500, (500, 4))
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pyarrow as pa

from lifelong.data.schema import EMBED_DIM, ITEMS_SCHEMA
from lifelong.data.world.config import WorldConfig


@dataclass
class Catalog:
    """The world's topics and items, plus sampling structures.

    Args:
        centroids: (T, D) unit topic centroids.
        topic_pop: (T,) topic popularity (probabilities).
        topic: (N,) primary topic of each item.
        pop_z: (N,) standardised log popularity.
        is_video: (N,) media type flags.
        duration_ms: (N,) video durations (0 for images).
        near_topic: (N, k) the k topics nearest to each item's latent vector.
        near_kernel: (N, k) the similarity kernel to those topics (0 below the floor).
        by_topic: (N,) item ids grouped by topic.
        cum_pop: (N,) cumulative popularity in ``by_topic`` order.
        topic_lo, topic_hi: (T,) cumulative popularity bounds of each topic's run.
        topic_end: (T,) end index (exclusive) of each topic's run in ``by_topic``.
        table: the items table in :data:`ITEMS_SCHEMA`.
    """

    centroids: np.ndarray
    topic_pop: np.ndarray
    topic: np.ndarray
    pop_z: np.ndarray
    is_video: np.ndarray
    duration_ms: np.ndarray
    near_topic: np.ndarray
    near_kernel: np.ndarray
    by_topic: np.ndarray
    cum_pop: np.ndarray
    topic_lo: np.ndarray
    topic_hi: np.ndarray
    topic_end: np.ndarray
    table: pa.Table

    @property
    def n_items(self) -> int:
        return int(self.topic.size)


def _unit(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def _authors(cfg: WorldConfig, topic: np.ndarray, topic_pop: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Authors specialise in 1..author_topics_max topics; an item's author covers its topic."""
    n_items, n_topics = topic.size, topic_pop.size
    n_authors = max(1, int(round(n_items / cfg.items.items_per_author)))
    k = rng.integers(1, cfg.items.author_topics_max + 1, n_authors)
    pair_author = np.repeat(np.arange(n_authors), k)
    pair_topic = rng.choice(n_topics, pair_author.size, p=topic_pop)
    # The first authors cover every topic once so that no topic lacks a specialist.
    head = min(n_authors, n_topics)
    first = np.r_[0, np.cumsum(k)[:-1]][:head]
    pair_topic[first] = rng.permutation(n_topics)[:head]
    productivity = rng.lognormal(0.0, 1.0, n_authors)
    order = np.lexsort((pair_author, pair_topic))
    pair_author, pair_topic = pair_author[order], pair_topic[order]
    cum = np.cumsum(productivity[pair_author])
    start = np.searchsorted(pair_topic, np.arange(n_topics), side="left")
    end = np.searchsorted(pair_topic, np.arange(n_topics), side="right")
    base = np.where(start > 0, cum[np.maximum(start - 1, 0)], 0.0)
    span = np.where(end > start, cum[np.maximum(end - 1, 0)] - base, 0.0)
    u = rng.random(n_items)
    pos = np.searchsorted(cum, base[topic] + u * span[topic], side="right")
    pos = np.clip(pos, start[topic], np.maximum(end[topic] - 1, start[topic]))
    covered = end[topic] > start[topic]
    author = np.where(covered, pair_author[np.minimum(pos, pair_author.size - 1)], rng.integers(0, n_authors, n_items))
    return author.astype(np.int64)


def _near_topics(latent: np.ndarray, centroids: np.ndarray, floor: float, k: int,
                 block: int = 1 << 16) -> tuple[np.ndarray, np.ndarray]:
    """Per item, the k topics of highest cosine and the kernel ``max(0, cos - floor) / (1 - floor)``."""
    n = latent.shape[0]
    topics = np.empty((n, k), dtype=np.int32)
    kernel = np.empty((n, k), dtype=np.float32)
    for lo in range(0, n, block):  # blocks bound the (items x topics) cosine matrix
        cos = latent[lo:lo + block] @ centroids.T
        top = np.argpartition(-cos, k - 1, axis=1)[:, :k] if k < cos.shape[1] else np.argsort(-cos, axis=1)
        top = np.sort(top, axis=1)  # canonical order: the result must not depend on partition internals
        topics[lo:lo + block] = top
        kernel[lo:lo + block] = np.maximum(np.take_along_axis(cos, top, axis=1) - floor, 0) / (1 - floor)
    return topics, kernel


def make_catalog(cfg: WorldConfig, rng: np.random.Generator) -> Catalog:
    """Draw topics and items.

    Args:
        cfg: the world configuration (sections ``topics``, ``items``, ``affinity``).
        rng: the catalogue's random stream.

    Example::

        >>> import numpy as np
        >>> from lifelong.data.world.config import PRESETS
        >>> cat = make_catalog(PRESETS["tiny"], np.random.default_rng(1))
        >>> sorted(set(cat.topic.tolist())) == list(range(32))  # every topic has items
        True
    """
    n_topics, n_items, d = cfg.topics.n_topics, cfg.items.n_items, EMBED_DIM
    it = cfg.items
    centroids = _unit(rng.standard_normal((n_topics, d))).astype(np.float32)
    topic_pop = 1.0 / np.arange(1, n_topics + 1) ** cfg.topics.zipf_exponent
    topic_pop = rng.permutation(topic_pop / topic_pop.sum())

    # One item per topic first, so every topic can be sampled from.
    topic = np.concatenate([np.arange(n_topics), rng.choice(n_topics, n_items - n_topics, p=topic_pop)])
    topic = rng.permutation(topic).astype(np.int32)
    noise = rng.standard_normal((n_items, d), dtype=np.float32) * np.float32(it.sigma_item / np.sqrt(d))
    latent = _unit(centroids[topic] + noise).astype(np.float32)
    obs_noise = rng.standard_normal((n_items, d), dtype=np.float32) * np.float32(it.sigma_obs / np.sqrt(d))
    embedding = (latent + obs_noise).astype(np.float16)

    log_pop = rng.standard_normal(n_items).astype(np.float32) * np.float32(it.popularity_sigma)
    pop_z = ((log_pop - log_pop.mean()) / max(float(log_pop.std()), 1e-6)).astype(np.float32)
    is_video = rng.random(n_items) < it.video_share
    dur_s = np.clip(it.duration_median_s * np.exp(it.duration_sigma * rng.standard_normal(n_items)),
                    it.duration_min_s, it.duration_max_s)
    duration_ms = np.where(is_video, np.round(dur_s * 1000), 0).astype(np.int32)
    author = _authors(cfg, topic, topic_pop, rng)

    near_topic, near_kernel = _near_topics(latent, centroids, cfg.affinity.kernel_floor, cfg.affinity.kernel_topics)

    by_topic = np.argsort(topic, kind="stable").astype(np.int64)
    cum_pop = np.cumsum(np.exp(log_pop[by_topic].astype(np.float64)))
    topic_end = np.searchsorted(topic[by_topic], np.arange(n_topics), side="right")
    topic_start = np.r_[0, topic_end[:-1]]
    topic_lo = np.where(topic_start > 0, cum_pop[topic_start - 1], 0.0)
    topic_hi = cum_pop[topic_end - 1]

    table = pa.Table.from_arrays(
        [
            pa.array(np.arange(n_items, dtype=np.int64)),
            pa.FixedSizeListArray.from_arrays(pa.array(embedding.ravel()), d),
            pa.array(author),
            pa.array(topic),
            pa.array(is_video.astype(np.int8)),
            pa.array(duration_ms),
        ],
        schema=ITEMS_SCHEMA,
    )
    return Catalog(centroids=centroids, topic_pop=topic_pop, topic=topic, pop_z=pop_z, is_video=is_video,
                   duration_ms=duration_ms, near_topic=near_topic, near_kernel=near_kernel, by_topic=by_topic, cum_pop=cum_pop,
                   topic_lo=topic_lo, topic_hi=topic_hi, topic_end=topic_end.astype(np.int64), table=table)
