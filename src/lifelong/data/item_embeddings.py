"""Item content embeddings learned from co-engagement, for data that ships without any.

Real interaction logs (KuaiRand, MovieLens, MIND, Taobao) have no PinSage-like content vectors,
so we derive 32-d vectors from behaviour in the **training period only** (``ts < cutoff``):
evaluation-period events never influence an item's vector, which keeps offline evaluation
honest.

Method (``METHOD`` below, also written into ``dataset.json``):

1. Keep events before the cutoff whose action mask has an "engaged" bit (explicit actions by
   default), ordered per user by time.
2. Every pair of a user's engaged events at most ``window`` positions apart co-occurs with
   weight ``1 / distance``; counts are symmetrised and summed into a sparse item x item matrix.
3. Positive PMI with context-distribution smoothing (exponent 0.75, Levy et al. 2015) turns the
   counts into association strengths that do not favour popular items.
4. A seeded randomized SVD (range finder + power iterations in float64, signs fixed so the
   largest entry of each component is positive) factorises the PPMI matrix;
   ``U * sqrt(S)`` rows, L2-normalised, are the embeddings.

Items with no training co-occurrence get a fallback that is never NaN: the normalised mean
vector of learned items of the same topic (topic 0 means "unknown" and has no mean), nudged by
a small per-item hashed vector so that such items do not tie exactly in nearest-neighbour
search; items without a usable topic get the hashed unit vector alone. Everything is a
deterministic function of the inputs and ``seed``.

Example::

    >>> import numpy as np
    >>> from lifelong.data.schema import Action
    >>> users = np.array([1, 1, 1, 2, 2]); items = np.array([10, 11, 12, 10, 11])
    >>> ts = np.arange(5) * 1000; mask = np.full(5, int(Action.CLICK))
    >>> emb = learn_item_embeddings(users, items, ts, mask, cutoff_ms=10_000,
    ...                             all_item_ids=np.array([10, 11, 12, 13]))
    >>> emb.shape, emb.dtype, bool(np.isfinite(emb).all())
    ((4, 32), dtype('float32'), True)
"""

from __future__ import annotations

import numpy as np
import torch

from lifelong.data.schema import EMBED_DIM, EXPLICIT_BITS

METHOD = (
    "PPMI-SVD co-engagement: training-period (ts < cutoff) engaged events, pairs within "
    "{window} consecutive events of a user weighted 1/distance, positive PMI with context "
    "smoothing 0.75, seeded randomized SVD (U*sqrt(S)), rows L2-normalised; items without "
    "training co-occurrence: normalised topic mean + 0.1 x hashed unit vector, else the hashed "
    "unit vector"
)
"""Human-readable description of :func:`learn_item_embeddings` (format with ``window``)."""

_CONTEXT_SMOOTHING = 0.75
_OVERSAMPLE = 10
_POWER_ITERATIONS = 4
_FALLBACK_JITTER = 0.1


def learn_item_embeddings(
    user_ids: np.ndarray,
    item_ids: np.ndarray,
    ts_ms: np.ndarray,
    action_mask: np.ndarray,
    cutoff_ms: int,
    all_item_ids: np.ndarray,
    topic_ids: np.ndarray | None = None,
    dim: int = EMBED_DIM,
    seed: int = 0,
    *,
    engaged_bits: int = EXPLICIT_BITS,
    window: int = 5,
) -> np.ndarray:
    """Learn one unit vector per item from training-period co-engagement.

    Args:
        user_ids, item_ids, ts_ms, action_mask: the events, one entry each, in any order.
        cutoff_ms: end of the training period; events at or after it are ignored.
        all_item_ids: the item catalogue (unique ids); the output has one row per entry, in
            this order, and the order does not change the vectors. Every event item must be in it.
        topic_ids: topic of each catalogue item (0 = unknown), used for the fallback.
        dim: embedding width.
        seed: seeds the randomized SVD and the hashed fallback vectors.
        engaged_bits: an event takes part if its mask has any of these bits (default: the
            explicit actions; pass ``EXPLICIT_BITS | Action.IMPRESSION`` where impressions are
            user-initiated views, as Taobao's page views are).
        window: how many following engaged events of the same user count as co-occurring.

    Returns:
        ``(len(all_item_ids), dim)`` float32 array of L2-normalised rows, never NaN.

    Example::

        emb = learn_item_embeddings(ev.user_id, ev.item_id, ev.ts_ms, ev.action_mask,
                                    protocol.cutoff_ms, items.item_id, items.topic_id)
    """
    all_item_ids = np.asarray(all_item_ids, dtype=np.int64)
    n_items = all_item_ids.size
    catalogue_order = np.argsort(all_item_ids, kind="stable")
    sorted_catalogue = all_item_ids[catalogue_order]

    user_ids = np.asarray(user_ids, dtype=np.int64)
    item_ids = np.asarray(item_ids, dtype=np.int64)
    ts_ms = np.asarray(ts_ms, dtype=np.int64)
    action_mask = np.asarray(action_mask).astype(np.int64)
    keep = (ts_ms < cutoff_ms) & ((action_mask & int(engaged_bits)) != 0)
    users, items, ts = user_ids[keep], item_ids[keep], ts_ms[keep]
    if items.size:
        pos = np.minimum(np.searchsorted(sorted_catalogue, items), max(n_items - 1, 0))
        if n_items == 0 or np.any(sorted_catalogue[pos] != items):
            raise ValueError("learn_item_embeddings: an event item is missing from all_item_ids")
        rows = pos  # matrix rows follow item-id order, so the catalogue's order cannot change the result
    else:
        rows = np.empty(0, dtype=np.int64)

    order = np.lexsort((rows, ts, users))  # item id breaks time ties: same input, same pairs
    users, rows = users[order], rows[order]
    emb = np.zeros((n_items, dim), dtype=np.float64)
    learned = np.zeros(n_items, dtype=bool)
    src, dst, weight = _co_occurrences(users, rows, window)
    if src.size:
        active, local = np.unique(np.concatenate([src, dst]), return_inverse=True)
        a, b = local[: src.size], local[src.size:]
        ppmi = _ppmi(a, b, weight, active.size)
        vectors = _randomized_svd_embedding(ppmi, active.size, dim, seed)
        norms = np.linalg.norm(vectors, axis=1)
        good = norms > 1e-12
        emb[active[good]] = vectors[good] / norms[good, None]
        learned[active[good]] = True
    sorted_topics = None if topic_ids is None else np.asarray(topic_ids, dtype=np.int64)[catalogue_order]
    _fill_fallback(emb, learned, sorted_catalogue, sorted_topics, seed)
    out = np.empty((n_items, dim), dtype=np.float32)
    out[catalogue_order] = emb
    return out


def _co_occurrences(users: np.ndarray, rows: np.ndarray, window: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Symmetric (src, dst, weight) triples of item pairs within ``window`` positions of a user."""
    src, dst, weight = [], [], []
    for d in range(1, max(window, 0) + 1):  # a loop over offsets, not over events
        same = users[d:] == users[:-d]
        a, b = rows[:-d][same], rows[d:][same]
        distinct = a != b  # an item repeated by its user says nothing about its neighbours
        a, b = a[distinct], b[distinct]
        src += [a, b]
        dst += [b, a]
        weight.append(np.full(2 * a.size, 1.0 / d))
    if not src:
        return np.empty(0, np.int64), np.empty(0, np.int64), np.empty(0)
    return np.concatenate(src), np.concatenate(dst), np.concatenate(weight)


def _ppmi(a: np.ndarray, b: np.ndarray, w: np.ndarray, n: int) -> torch.Tensor:
    """Sparse (COO) positive-PMI matrix of the co-occurrence triples (duplicates summed)."""
    # Summing duplicates with numpy's sort keeps torch's threaded coalesce off busy machines.
    cells, inverse = np.unique(a * n + b, return_inverse=True)
    counts = np.bincount(inverse, weights=w)
    row, col = cells // n, cells % n
    row_sum = np.bincount(row, weights=counts, minlength=n)
    ctx = row_sum ** _CONTEXT_SMOOTHING
    pmi = np.log(counts) + np.log(ctx.sum()) - np.log(row_sum[row]) - np.log(ctx[col])
    positive = pmi > 0
    indices = torch.from_numpy(np.stack([row[positive], col[positive]]))
    # Cells come out of np.unique sorted and distinct: already a coalesced COO tensor.
    return torch.sparse_coo_tensor(indices, torch.from_numpy(pmi[positive]), (n, n), check_invariants=False,
                                   is_coalesced=True)


def _randomized_svd_embedding(matrix: torch.Tensor, n: int, dim: int, seed: int) -> np.ndarray:
    """``U[:, :dim] * sqrt(S[:dim])`` of a sparse symmetric matrix by a seeded randomized SVD (Halko et al.).

    For a symmetric matrix the singular pairs are the eigenpairs ordered by ``|eigenvalue|``, so
    the last step is a Rayleigh-Ritz ``eigh`` of the small ``q^T A q`` rather than an SVD of a
    ``k x n`` matrix (same result, a fraction of the cost).
    """
    k = min(dim + _OVERSAMPLE, n)
    gen = torch.Generator().manual_seed(seed)
    q = _orthonormal_basis(matrix @ torch.randn(n, k, generator=gen, dtype=torch.float64))
    for _ in range(_POWER_ITERATIONS):
        q = _orthonormal_basis(matrix @ q)
    eigval, eigvec = torch.linalg.eigh(q.T @ (matrix @ q))
    order = torch.argsort(eigval.abs(), descending=True, stable=True)
    s, u = eigval.abs()[order], q @ eigvec[:, order]
    take = min(dim, s.numel())
    vectors = (u[:, :take] * s[:take].sqrt()).numpy()
    # Singular vectors have arbitrary signs; pin them so reruns on other BLAS agree.
    flip = np.sign(vectors[np.abs(vectors).argmax(axis=0), np.arange(take)])
    vectors = vectors * np.where(flip == 0, 1.0, flip)
    out = np.zeros((n, dim))
    out[:, :take] = vectors
    return out


def _orthonormal_basis(y: torch.Tensor) -> torch.Tensor:
    """Orthonormal basis of the column span of a tall ``y``, dropping numerically dependent directions.

    Whitening by the eigendecomposition of the small Gram matrix costs two matrix products;
    a Householder QR of the tall matrix gave the same basis but was 10-30x slower on a busy
    2-core machine. Columns are equilibrated first and the step is done twice (as in
    CholeskyQR2) so that squaring the condition number in ``y^T y`` costs no accuracy.
    """
    for _ in range(2):
        y = y / y.norm(dim=0).clamp_min(torch.finfo(y.dtype).tiny)
        eigval, eigvec = torch.linalg.eigh(y.T @ y)
        keep = eigval > eigval.max() * 1e-10
        y = y @ (eigvec[:, keep] / eigval[keep].sqrt())
    return y


def hashed_unit_vectors(item_ids: np.ndarray, dim: int = EMBED_DIM, seed: int = 0) -> np.ndarray:
    """Deterministic pseudo-random unit vectors, a pure function of (item id, seed).

    Args:
        item_ids: int64 ids.
        dim: vector width.
        seed: mixes into the hash, so different seeds give unrelated vectors.

    Example::

        >>> v = hashed_unit_vectors(np.array([7, 7, 8]), dim=4)
        >>> bool(np.allclose(v[0], v[1])), bool(np.allclose(np.linalg.norm(v, axis=1), 1))
        (True, True)
    """
    ids = np.asarray(item_ids, dtype=np.int64).astype(np.uint64)
    lanes = np.arange(2 * dim, dtype=np.uint64)
    state = ids[:, None] * np.uint64(2 * dim) + lanes[None, :] + _splitmix64(np.uint64(seed & (2**64 - 1)))
    bits = _splitmix64(state)
    uniform = ((bits >> np.uint64(11)).astype(np.float64) + 0.5) / float(1 << 53)  # (0, 1)
    u1, u2 = uniform[:, :dim], uniform[:, dim:]
    gauss = np.sqrt(-2.0 * np.log(u1)) * np.cos(2.0 * np.pi * u2)  # Box-Muller: isotropic directions
    return gauss / np.linalg.norm(gauss, axis=1, keepdims=True)


def _splitmix64(x: np.ndarray | np.uint64) -> np.ndarray:
    with np.errstate(over="ignore"):
        x = np.asarray(x, dtype=np.uint64) + np.uint64(0x9E3779B97F4A7C15)
        x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return x ^ (x >> np.uint64(31))


def _fill_fallback(emb: np.ndarray, learned: np.ndarray, item_ids: np.ndarray,
                   topic_ids: np.ndarray | None, seed: int) -> None:
    """Give every unlearned row its topic's mean direction (plus jitter) or a hashed vector."""
    missing = np.flatnonzero(~learned)
    if missing.size == 0:
        return
    hashed = hashed_unit_vectors(item_ids[missing], emb.shape[1], seed)
    fill = hashed.copy()
    if topic_ids is not None:
        topics = np.asarray(topic_ids, dtype=np.int64)
        known = learned & (topics != 0)
        if known.any():
            uniq, inv = np.unique(topics[known], return_inverse=True)
            sums = np.zeros((uniq.size, emb.shape[1]))
            np.add.at(sums, inv, emb[known])
            norms = np.linalg.norm(sums, axis=1)
            want = topics[missing]
            slot = np.minimum(np.searchsorted(uniq, want), uniq.size - 1)
            has_mean = (uniq[slot] == want) & (norms[slot] > 1e-12)
            s = slot[has_mean]
            fill[has_mean] = sums[s] / norms[s, None] + _FALLBACK_JITTER * hashed[has_mean]
    emb[missing] = fill / np.linalg.norm(fill, axis=1, keepdims=True)
