"""DIN (target attention over S_all): the recipe for a new ranker, through the declared abilities only."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from lifelong.core.errors import ConfigError
from lifelong.data.world import load_config, simulate_to
from lifelong.transact.din import DIN, DINConfig
from lifelong.transact.evaluate import evaluate_run
from lifelong.transact.registry import build_model, model_abilities
from lifelong.transact.sequence_layout import SequenceLayout
from lifelong.transact.trainer import TrainConfig, load_model, train
from lifelong.transact.training_rows import BuildConfig, build_rows
from tests.transact.fixtures import SMALL, SMALL_LAYOUT, fit, random_batch, topic_match_batch


def _din(**overrides) -> DIN:
    torch.manual_seed(0)
    return build_model("din", n_heads=3, **{**SMALL, **overrides}).eval()


def test_shapes_and_declared_abilities():
    model = _din()
    out = model(random_batch(5, SMALL_LAYOUT, 3, seed=1))
    assert out.logits.shape == (5, 3) and out.rt_states is None
    ab = model.abilities
    assert ab.blocks == SequenceLayout.BLOCKS and not ab.causal and not ab.token_table
    assert not ab.user_tokens and not ab.accepts_user_tokens
    assert model_abilities("din", blocks=("rt", "rt_nn")).blocks == ("rt", "rt_nn")


def test_padding_and_unread_blocks_do_not_change_scores():
    model = _din(blocks=("rt", "rt_nn"))
    batch = random_batch(6, SMALL_LAYOUT, 3, seed=2, pattern="random")
    with torch.no_grad():
        base = model(batch).logits
        invalid = ~batch.seq_valid
        batch.seq_emb[invalid] = torch.randn_like(batch.seq_emb[invalid])
        batch.seq_action[invalid] = 3
        unread = torch.zeros(SMALL_LAYOUT.total, dtype=torch.bool)
        for block in ("ll_nn", "imp_nn"):
            unread[SMALL_LAYOUT.block_slice(block)] = True
        batch.seq_emb[:, unread] = torch.randn_like(batch.seq_emb[:, unread])
        batch.seq_valid[:, unread] = True
        torch.testing.assert_close(model(batch).logits, base, rtol=0, atol=0)
        # A read real token does move the score.
        rt = SMALL_LAYOUT.block_slice("rt")
        batch.seq_valid[:, rt] = True
        batch.seq_emb[:, rt] += 1.0
        assert not torch.allclose(model(batch).logits, base)


def test_attention_weights_are_zero_on_padding_and_rows_without_tokens_pool_to_zero():
    model = _din()
    valid = random_batch(4, SMALL_LAYOUT, 3, seed=3, pattern="random").seq_valid.clone()
    valid[0] = False
    batch = random_batch(4, SMALL_LAYOUT, 3, seed=3, seq_valid=valid)
    with torch.no_grad():
        pooled, _, weights = model.interest(batch)
    assert bool((weights[~batch.seq_valid] == 0).all())
    assert bool((pooled[0] == 0).all())


def test_learns_to_compare_the_candidate_with_the_sequence():
    torch.manual_seed(0)
    model = build_model("din", n_heads=1, **SMALL).train()
    before, after = fit(model, lambda b, s: topic_match_batch(b, SMALL_LAYOUT, s), steps=80)
    assert after < 0.8 * before


def test_config_validation_and_the_trainer_asks_the_abilities():
    with pytest.raises(ConfigError, match="blocks"):
        DINConfig(blocks=("rt", "ll_nn"))
    with pytest.raises(ConfigError, match="causal sequence model; din has none"):
        TrainConfig(model="din", nal="impression")
    with pytest.raises(ConfigError, match="din has none"):
        TrainConfig(model="din", nal="none", user_emb="lmdb:///nowhere")
    assert TrainConfig(model="din", nal="none").model == "din"


def test_trains_on_the_tiny_world_and_evaluates(tmp_path):
    simulate_to(load_config("tiny", overrides=["users.n_users=15"]), tmp_path / "w")
    build_rows(tmp_path / "w", tmp_path / "rows", BuildConfig(layout=SequenceLayout(8, 8, 4, 4), ll_cap=100,
                                                               nal_negatives=4))
    cfg = TrainConfig(model="din", nal="none", epochs=2, max_rows=300, batch_size=64)
    meta = train(tmp_path / "rows", tmp_path / "run", cfg, log=lambda s: None)
    losses = [e["loss"] for e in meta["epochs"]]
    assert len(losses) == 2 and all(np.isfinite(losses)) and losses[1] < losses[0]
    model, _ = load_model(tmp_path / "run")
    assert isinstance(model, DIN) and model.cfg.layout == SequenceLayout(8, 8, 4, 4)
    ev = evaluate_run(tmp_path / "run", tmp_path / "rows")
    assert 0.0 <= ev.per_head["repin"]["auc"] <= 1.0
    assert json.loads((tmp_path / "run" / "run.json").read_text())["train"]["model"] == "din"
