"""Sharded collision-less table: 2 gloo ranks against one table fed the same global batches.

Each step every rank looks up its half of a global batch of ids, takes the gradient of a fixed
linear loss (so both runs see the same gradients) and steps; the single table looks up the whole
batch (rank 0's half then rank 1's). After the run, the shards' rows put together are the
single table's (ids, values, update times), admission counted the same rows at every step, the
loss and the eval lookups agree, and the per-shard checkpoint and deltas reassemble to it.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist

from lifelong.core.distributed import Ranks, launch, process_group, ranks_from_env
from lifelong.core.errors import ConfigError
from lifelong.tables.embedding import CollisionlessEmbedding
from lifelong.tables.filters import FilterConfig
from lifelong.tables.sharded import ShardedCollisionlessEmbedding, assemble_shards, merge_exports, owner
from lifelong.tables.table import EmbeddingTable, ExportedRows, OptimizerConfig, TableConfig

WORLD, STEPS, BATCH, DIM = 2, 8, 24, 4
# Counting admission at the 2nd occurrence (a wide sketch: no collision changes a decision) and a
# TTL of 2.5 steps, so admission and expiry both act during the run.
CFG = TableConfig(dim=DIM, ttl_ms=2_500, init_scale=0.1, filter=FilterConfig(kind="counting", threshold=2),
                  optimizer=OptimizerConfig(kind="adagrad", lr=0.1))
DELTA_SINCE = (STEPS - 1) * 1_000


def stream() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Global id batches (STEPS, WORLD, BATCH), the loss weights (WORLD, BATCH, DIM), eval ids (WORLD, 6)."""
    rng = np.random.default_rng(0)
    pool = np.concatenate([np.arange(80), [-1, -7, 2**40, -2**62, 2**63 - 1]]).astype(np.int64)
    skew = 1.0 / np.arange(1, pool.size + 1)  # a few frequent ids, many rare ones that expire
    ids = rng.choice(pool, size=(STEPS, WORLD, BATCH), p=skew / skew.sum())
    weights = rng.normal(size=(WORLD, BATCH, DIM)).astype(np.float32)
    evals = np.array([[0, 1, 2, 2**40, 999, -1], [3, 4, -7, 5, 12345, 29]], np.int64)
    return ids, weights, evals


def run_rank(out: Path) -> None:
    """One rank's run (launched in 2 processes): train STEPS steps, save, export, resume."""
    torch.set_num_threads(1)
    ranks = ranks_from_env()
    ids, weights, evals = stream()
    with process_group(ranks):
        emb = ShardedCollisionlessEmbedding(CFG, ranks)
        losses, admitted, kept = [], [], []
        for k in range(STEPS):
            now = (k + 1) * 1_000
            vecs = emb(torch.from_numpy(ids[k, ranks.rank]), now_ms=now)
            admitted.append(len(emb.table))
            loss = (vecs * torch.from_numpy(weights[ranks.rank])).sum()
            loss.backward()
            emb.step(now)
            emb.expire(now)
            kept.append(len(emb.table))
            losses.append(loss.item())
        last = vecs.detach().numpy()
        emb.eval()
        with torch.no_grad():
            looked_up = emb(torch.from_numpy(evals[ranks.rank])).numpy()
        emb.save(out / "ckpt")
        dist.barrier()  # rank 0's shards.json is written before any rank resumes from it
        resumed = ShardedCollisionlessEmbedding(CFG, ranks)
        resumed.load(out / "ckpt")
        same = all(np.array_equal(a, b) for a, b in zip(emb.table.state_dict()[1].values(),
                                                         resumed.table.state_dict()[1].values(), strict=True))
        delta = emb.export("fp32", since_ms=DELTA_SINCE)
        np.savez(out / f"rank{ranks.rank}.npz", losses=losses, admitted=admitted, kept=kept, last=last,
                 looked_up=looked_up, resumed_same=same, shard_ids=emb.table.index.items()[0],
                 delta_ids=delta.ids, delta_values=delta.values, delta_updated=delta.updated_ms,
                 delta_default=delta.default)


def single_table() -> dict[str, object]:
    """The reference: one table fed each whole global batch, rank 0's half first."""
    torch.set_num_threads(1)
    ids, weights, evals = stream()
    emb = CollisionlessEmbedding(CFG)
    losses, admitted, kept = [], [], []
    for k in range(STEPS):
        now = (k + 1) * 1_000
        vecs = emb(torch.from_numpy(ids[k]), now_ms=now)
        admitted.append(len(emb.table))
        loss = vecs * torch.from_numpy(weights)
        loss.sum().backward()
        emb.step(now)
        emb.table.expire(now)
        kept.append(len(emb.table))
        losses.append(loss.detach().sum(dim=(1, 2)).numpy())  # each rank's share of the loss
    last = vecs.detach().numpy()
    emb.eval()
    with torch.no_grad():
        looked_up = emb(torch.from_numpy(evals)).numpy()
    return {"table": emb.table, "losses": np.array(losses), "admitted": admitted, "kept": kept, "last": last,
            "looked_up": looked_up}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    out = tmp_path_factory.mktemp("sharded")
    # The ranks unpickle run_rank by importing this module by its pytest name from the rootdir.
    root = str(Path(__file__).resolve().parents[2])
    old = os.environ.get("PYTHONPATH")
    os.environ["PYTHONPATH"] = root + (os.pathsep + old if old else "")
    try:
        launch(run_rank, (out,), WORLD)
    finally:
        if old is None:
            del os.environ["PYTHONPATH"]
        else:
            os.environ["PYTHONPATH"] = old
    shards = [dict(np.load(out / f"rank{r}.npz")) for r in range(WORLD)]
    return out, shards, single_table()


def test_training_matches_one_table(runs):
    _, shards, single = runs
    np.testing.assert_array_equal(sum(np.array(s["admitted"]) for s in shards), single["admitted"])
    np.testing.assert_array_equal(sum(np.array(s["kept"]) for s in shards), single["kept"])
    # The filter held ids back and rows expired: both decisions were taken, by the owners.
    assert single["admitted"][0] < np.unique(stream()[0][0]).size
    assert any(a > k for a, k in zip(single["admitted"], single["kept"], strict=True))
    for r, s in enumerate(shards):
        np.testing.assert_allclose(s["losses"], single["losses"][:, r], atol=1e-6, rtol=0)
        np.testing.assert_allclose(s["last"], single["last"][r], atol=1e-6, rtol=0)
        np.testing.assert_allclose(s["looked_up"], single["looked_up"][r], atol=1e-6, rtol=0)
        assert (owner(s["shard_ids"], WORLD) == r).all()


def test_checkpoint_and_deltas_reassemble(runs):
    out, shards, single = runs
    ref: EmbeddingTable = single["table"]
    want = ref.export("fp32")
    got = assemble_shards(out / "ckpt").export("fp32")
    np.testing.assert_array_equal(got.ids, want.ids)
    np.testing.assert_allclose(got.values, want.values, atol=1e-6, rtol=0)
    np.testing.assert_array_equal(got.updated_ms, want.updated_ms)
    assert all(bool(s["resumed_same"]) for s in shards)

    delta = merge_exports([ExportedRows(ids=s["delta_ids"], values=s["delta_values"], scale=None,
                                        updated_ms=s["delta_updated"], default=s["delta_default"]) for s in shards])
    want_delta = ref.export("fp32", since_ms=DELTA_SINCE)
    assert 0 < want_delta.ids.size < want.ids.size
    np.testing.assert_array_equal(delta.ids, want_delta.ids)
    np.testing.assert_allclose(delta.values, want_delta.values, atol=1e-6, rtol=0)


def test_one_rank_is_the_plain_module():
    ids, weights, _ = stream()
    sharded, plain = ShardedCollisionlessEmbedding(CFG, Ranks()), CollisionlessEmbedding(CFG)
    for emb in (sharded, plain):
        (emb(torch.from_numpy(ids[0]), now_ms=1_000) * torch.from_numpy(weights)).sum().backward()
        emb.step(1_000)
    np.testing.assert_array_equal(sharded.table.export("fp32").values, plain.table.export("fp32").values)


def test_learned_default_is_refused_with_more_than_one_rank():
    with pytest.raises(ConfigError, match="default"):
        ShardedCollisionlessEmbedding(TableConfig(dim=2, default="learned"), Ranks(rank=0, size=2))
