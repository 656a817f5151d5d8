"""The trainer: deterministic seeds, exact resumption after an interruption, the learning-rate
schedule, gradient clipping, the validation split and early stopping, bfloat16 precision."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from lifelong.core.errors import ConfigError, DataError
from lifelong.core.metrics import normalized_entropy
from lifelong.data.world import load_config, simulate_to
from lifelong.transact.evaluate import evaluate_run
from lifelong.transact.rank_data import RankData
from lifelong.transact.sequence_layout import SequenceLayout
from lifelong.transact.trainer import TrainConfig, load_model, predict, split_validation, train, validation_ne
from lifelong.transact.training_rows import BuildConfig, build_rows


@pytest.fixture(scope="module")
def rows(tmp_path_factory):
    d = tmp_path_factory.mktemp("trainer")
    simulate_to(load_config("tiny", overrides=["users.n_users=15"]), d / "w")
    build_rows(d / "w", d / "rows", BuildConfig(layout=SequenceLayout(8, 8, 4, 4), ll_cap=100, nal_negatives=4))
    return d / "rows"


def _weights(run):
    return torch.load(run / "model.pt", weights_only=False)["state_dict"]


def test_interrupted_run_resumes_to_the_same_weights(rows, tmp_path):
    cfg = TrainConfig(model="transact_v2", nal="in_batch", epochs=2, max_rows=400, batch_size=64)
    train(rows, tmp_path / "straight", cfg, log=lambda s: None)

    def crash_after_first_epoch(message: str) -> None:
        if "epoch 1:" in message:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train(rows, tmp_path / "resumed", cfg, log=crash_after_first_epoch)
    assert not (tmp_path / "resumed" / "model.pt").exists()
    logs = []
    meta = train(rows, tmp_path / "resumed", cfg, log=logs.append)
    assert any("resuming" in m for m in logs) and len(meta["epochs"]) == 2
    a, b = _weights(tmp_path / "straight"), _weights(tmp_path / "resumed")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_same_seed_same_weights_other_seed_differs(rows, tmp_path):
    for name, seed in (("a", 0), ("b", 0), ("c", 1)):
        train(rows, tmp_path / name, TrainConfig(model="wide_deep", nal="none", epochs=1, seed=seed), log=lambda s: None)
    a, b, c = (_weights(tmp_path / n) for n in "abc")
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[k], c[k]) for k in a)


def test_a_scheduled_clipped_run_resumes_to_the_same_weights(rows, tmp_path):
    cfg = TrainConfig(model="transact", nal="none", epochs=2, max_rows=400, batch_size=64, warmup_steps=3,
                      lr_schedule="cosine", clip_norm=0.5)
    meta = train(rows, tmp_path / "straight", cfg, log=lambda s: None)
    # The schedule ran: warmup, then the cosine reaches min_lr_ratio * lr at the last step.
    assert meta["epochs"][-1]["lr"] == pytest.approx(cfg.lr * cfg.min_lr_ratio)
    assert meta["epochs"][0]["lr"] > meta["epochs"][-1]["lr"]

    def crash_after_first_epoch(message: str) -> None:
        if "epoch 1:" in message:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train(rows, tmp_path / "resumed", cfg, log=crash_after_first_epoch)
    train(rows, tmp_path / "resumed", cfg, log=lambda s: None)
    a, b = _weights(tmp_path / "straight"), _weights(tmp_path / "resumed")
    assert all(torch.equal(a[k], b[k]) for k in a)
    train(rows, tmp_path / "plain", TrainConfig(model="transact", nal="none", epochs=2, max_rows=400, batch_size=64),
          log=lambda s: None)
    plain = _weights(tmp_path / "plain")
    assert not all(torch.equal(a[k], plain[k]) for k in a)


def test_validation_keeps_the_best_epoch_and_stops_after_patience(rows, tmp_path):
    cfg = TrainConfig(model="wide_deep", nal="none", epochs=6, batch_size=64, lr=0.05, val_days=2, patience=1)
    logs: list[str] = []
    meta = train(rows, tmp_path / "run", cfg, log=logs.append)
    data = RankData(rows, "train")
    train_rows, val_rows = split_validation(data, cfg)
    assert meta["validation_rows"] == val_rows.size > 0 and meta["rows"] == train_rows.size
    assert train_rows.size + val_rows.size == len(data)
    cutoff = data.meta["protocol"]["cutoff_ms"]
    ts = np.asarray(data.arrays["ts_ms"])
    assert (ts[val_rows] >= cutoff - 2 * 86_400_000).all() and (ts[train_rows] < cutoff - 2 * 86_400_000).all()
    means = [e["val_ne"]["mean"] for e in meta["epochs"]]
    # It stops at the first epoch that does not lower the best NE (patience 1), or runs them all.
    stop = next((i for i in range(1, len(means)) if means[i] >= min(means[:i])), None)
    assert len(means) == (cfg.epochs if stop is None else stop + 1)
    assert meta["best_epoch"] == int(np.argmin(means)) + 1 and meta["best_val_ne"] == min(means)
    assert (stop is None) != any("early stop" in m for m in logs)
    # model.pt holds the best epoch's weights: its validation NE is the best one.
    model, _ = load_model(tmp_path / "run")
    assert validation_ne(model, data, val_rows)["mean"] == pytest.approx(min(means), abs=1e-6)


def test_bf16_trains_near_fp32(rows, tmp_path):
    """bfloat16 autocast moves the weights, but the model it trains predicts like the float32 one."""
    base = dict(model="transact_v2", nal="impression", epochs=1, max_rows=400, batch_size=64)
    for name, extra in (("ahead", {}), ("bf16", {"precision": "bf16"})):
        train(rows, tmp_path / name, TrainConfig(**base, **extra), log=lambda s: None)
    ahead, bf16 = (_weights(tmp_path / n) for n in ("ahead", "bf16"))
    assert not all(torch.equal(ahead[k], bf16[k]) for k in ahead)
    data = RankData(rows, "eval")
    every = np.arange(len(data))
    fp32_ne = validation_ne(load_model(tmp_path / "ahead")[0], data, every)["mean"]
    bf16_ne = validation_ne(load_model(tmp_path / "bf16")[0], data, every)["mean"]
    assert abs(fp32_ne - bf16_ne) < 0.02


@pytest.mark.parametrize("change, message", [
    ({"precision": "fp16"}, "precision must be one of fp32, bf16"),
    ({"patience": 2}, "set val_days > 0 too"),
    ({"lr_schedule": "linear"}, "unknown lr_schedule"),
    ({"clip_norm": -1.0}, "must be >= 0"),
    ({"min_lr_ratio": 2.0}, "min_lr_ratio must be in"),
])
def test_bad_schedule_settings_are_one_clear_error(change, message):
    with pytest.raises(ConfigError, match=message):
        TrainConfig(model="wide_deep", nal="none", **change)


def test_a_validation_window_as_long_as_the_rows_is_refused(rows, tmp_path):
    with pytest.raises(DataError, match="leaves no training rows"):
        train(rows, tmp_path / "run", TrainConfig(model="wide_deep", nal="none", val_days=400), log=lambda s: None)
    assert not (tmp_path / "run" / "model.pt").exists()


def test_the_oracles_ne_is_reported_as_the_floor(rows, tmp_path):
    train(rows, tmp_path / "run", TrainConfig(model="wide_deep", nal="none", epochs=1), log=lambda s: None)
    ev = evaluate_run(tmp_path / "run", rows)
    data = RankData(rows, "eval")
    labels = np.asarray(data.arrays["labels"])
    for i, head in enumerate(data.heads):
        assert ev.oracle_ne[head] == pytest.approx(normalized_entropy(labels[:, i], data.oracle[:, i]))
    # The true probabilities beat a model trained on a few hundred rows on the heads with positives.
    assert ev.oracle_ne["click"] < ev.per_head["click"]["ne"]


def test_predict_returns_rows_in_the_order_asked(rows, tmp_path):
    train(rows, tmp_path / "run", TrainConfig(model="wide_deep", nal="none", epochs=1), log=lambda s: None)
    model, data = load_model(tmp_path / "run")[0], RankData(rows, "eval")
    picked = np.array([5, 0, 3, 1])
    np.testing.assert_allclose(predict(model, data, batch_size=3, rows=picked), predict(model, data)[picked], atol=1e-6)


def test_a_run_records_every_model_setting_and_one_saved_without_them_loads_as_trained(rows, tmp_path):
    train(rows, tmp_path / "run", TrainConfig(model="transact", nal="none", epochs=1, max_rows=200), log=lambda s: None)
    saved = torch.load(tmp_path / "run" / "model.pt", weights_only=False)
    assert saved["model_config"]["token_similarity"] is True and saved["model_config"]["blocks"] == ("rt",)
    assert load_model(tmp_path / "run")[0].cfg.token_similarity
    # A run saved before runs recorded their model config, when the default was concatenation:
    # its weights have no similarity vector, and it must load as the model it was.
    legacy = tmp_path / "legacy"
    legacy.mkdir()
    state = {k: v for k, v in saved["state_dict"].items() if k != "similarity"}
    assert len(state) == len(saved["state_dict"]) - 1
    torch.save({k: v for k, v in saved.items() if k != "model_config"} | {"state_dict": state}, legacy / "model.pt")
    model = load_model(legacy)[0]
    assert not model.cfg.token_similarity
    assert all(torch.equal(model.state_dict()[k], v) for k, v in state.items())


@pytest.mark.parametrize("model", ["wide_deep", "transact"])
def test_calibration_is_folded_into_the_weights_and_never_worsens_validation_ne(rows, tmp_path, model):
    from lifelong.modules.heads import fold_logit_calibration
    from lifelong.transact.trainer import predict_logits

    base = dict(model=model, nal="none", epochs=2, batch_size=64, lr=0.02, val_days=2, max_rows=600)
    train(rows, tmp_path / "plain", TrainConfig(**base), log=lambda s: None)
    meta = train(rows, tmp_path / "calibrated", TrainConfig(**base, calibrate=True), log=lambda s: None)
    data = RankData(rows, "train")
    _, val_rows = split_validation(data, TrainConfig(**base))
    # Platt scaling minimises the validation log loss over (scale, shift), (1, 0) included.
    for head, ne in meta["calibrated_val_ne"].items():
        if not np.isnan(ne) and head != "mean":
            assert ne <= meta["epochs"][meta["best_epoch"] - 1]["val_ne"][head] + 1e-6
    # The saved weights are the plain run's with scale * logit + shift folded into the logit layers.
    plain, calibrated = load_model(tmp_path / "plain")[0], load_model(tmp_path / "calibrated")[0]
    scale = torch.tensor([meta["calibration"][h][0] for h in data.heads])
    shift = torch.tensor([meta["calibration"][h][1] for h in data.heads])
    z = predict_logits(plain, data, rows=val_rows[:50])
    np.testing.assert_allclose(predict_logits(calibrated, data, rows=val_rows[:50]), z * scale.numpy() + shift.numpy(),
                               rtol=1e-4, atol=1e-4)
    fold_logit_calibration(plain.logit_layers, scale, shift)
    np.testing.assert_allclose(predict_logits(plain, data, rows=val_rows[:50]), z * scale.numpy() + shift.numpy(),
                               rtol=1e-4, atol=1e-4)
    with pytest.raises(ConfigError, match="calibrate fits on the validation split"):
        TrainConfig(model=model, nal="none", calibrate=True)
