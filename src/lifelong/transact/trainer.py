"""Batch trainer for the rankers: ``L = L_CE + w_NAL · L_NAL``, AdamW, seeded, checkpointed.

A run directory holds ``run.json`` (configs, per-epoch losses, throughput) and ``model.pt``
(the model's name, config and weights), plus ``checkpoint.pt`` (optimizer state and epoch) so
an interrupted run resumes where its last epoch ended. Every file is written atomically.

Data-parallel (``lifelong transact train --nproc N``, or torchrun): every rank runs :func:`train`,
draws the same permutation and global batches of ``batch_size`` rows, reads and steps on its
rows ``rank::N`` of each (``batch_size / N``), and DDP averages the gradients; each rank's loss
is scaled (:func:`lifelong.core.distributed.loss_share`) so that the average is the gradient of
the global batch's loss. Rank 0 alone writes the run; every rank resumes from its checkpoint.
docs/scaling.md has the commands and what may differ from one process.
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.nn.parallel import DistributedDataParallel

import lifelong
from lifelong.core.checkpoint import save_atomic
from lifelong.core.config import apply_overrides, apply_sets, build, merge, parse_set
from lifelong.core.distributed import (
    Ranks,
    all_reduce_sum,
    check_split,
    fault_point,
    loss_share,
    process_group,
    ranks_from_env,
    shard,
)
from lifelong.core.errors import ConfigError, DataError
from lifelong.core.metrics import head_ne
from lifelong.core.precision import check_precision, forward_precision
from lifelong.core.progress import progress
from lifelong.data.io import write_json
from lifelong.modules.heads import fit_logit_calibration, fold_logit_calibration, ranking_loss
from lifelong.tables.embedding import collisionless_modules, sparse_step
from lifelong.transact.nal import next_action_loss
from lifelong.transact.rank_data import RankData
from lifelong.transact.registry import MODEL_NAMES, build_model, default_config, model_abilities

NAL_MODES = ("none", "in_batch", "impression")
NAL_LOSSES = ("softmax", "bce")
LR_SCHEDULES = ("constant", "cosine")


@dataclass(frozen=True)
class TrainConfig:
    """One training run.

    Args:
        model: one of ``MODEL_NAMES``.
        nal: Next Action Loss negatives: ``none``, ``in_batch`` or ``impression``.
        nal_loss: ``softmax`` (sampled softmax) or ``bce``.
        w_nal: weight of the NAL in the total loss (paper default 0.01).
        head_weights: BCE weight per head, in the rows' head order.
        epochs: passes over the training rows; with ``patience`` the most it makes.
        batch_size: rows per step.
        lr: AdamW learning rate (the peak, with a schedule).
        weight_decay: AdamW weight decay.
        seed: seeds weights, shuffling and in-batch negative sampling.
        max_rows: train on a seeded random subset of this many rows (None: all).
        model_overrides: fields of the model's config (e.g. ``{"mlp_dims": (128, 64)}``);
            :func:`build_train_config` fills it from a ``model:`` section.
        user_emb: a store holding a ``lifelong dv365 export``: each row's frozen user embedding
            is prepended as tokens (``TransActConfig.user_tokens``; transact models only). The
            export should predate the training rows (``--as-of-ms``), or its embedding has seen
            their labels.
        val_days: hold out the training rows of the last ``val_days`` days before the protocol's
            cutoff as a validation split (0: train on all rows, no validation). The model is
            evaluated on it after every epoch (NE per head, and their mean), and ``model.pt``
            keeps the epoch with the lowest mean NE.
        patience: with a validation split, stop after this many epochs without a lower mean
            validation NE (0: run every epoch).
        warmup_steps: optimizer steps of linear learning-rate warmup from ``lr / warmup_steps``.
        lr_schedule: ``constant`` or ``cosine`` (after warmup, decay to ``min_lr_ratio * lr`` at
            the last step of the last epoch).
        min_lr_ratio: the cosine schedule's final learning rate, as a share of ``lr``.
        clip_norm: clip the gradients' global L2 norm to this before each step (0: no clipping).
        precision: ``fp32``, or ``bf16``: the forward pass under bfloat16 autocast, parameters
            and losses in float32 (:mod:`lifelong.core.precision`; fast only on a CPU with
            bfloat16 units). Evaluation and serving stay float32.
        calibrate: after training, fit each head's ``scale * logit + shift`` on the validation
            split (Platt scaling, :func:`~lifelong.modules.heads.fit_logit_calibration`) and fold
            it into the model's logit layers, so every path that scores with the saved weights
            scores calibrated probabilities. It cannot reorder a head's rows, only fix how
            confident they are; needs ``val_days``. ``run.json`` records each head's
            ``calibration`` and the validation NE after it.

    Example::

        >>> TrainConfig(model="transact", nal="in_batch").w_nal
        0.01
    """

    model: str = "transact_v2"
    nal: str = "impression"
    nal_loss: str = "softmax"
    w_nal: float = 0.01
    head_weights: tuple[float, ...] = (1.0, 1.0, 1.0, 1.0)
    epochs: int = 2
    batch_size: int = 512
    lr: float = 2e-3
    weight_decay: float = 1e-4
    seed: int = 0
    max_rows: int | None = None
    model_overrides: dict = field(default_factory=dict)
    user_emb: str | None = None
    val_days: float = 0.0
    patience: int = 0
    warmup_steps: int = 0
    lr_schedule: str = "constant"
    min_lr_ratio: float = 0.1
    clip_norm: float = 0.0
    precision: str = "fp32"
    calibrate: bool = False

    def __post_init__(self) -> None:
        check_precision(self.precision)
        if self.model not in MODEL_NAMES:
            raise ConfigError(f"unknown model {self.model!r}; valid models are {', '.join(MODEL_NAMES)}")
        if self.nal not in NAL_MODES:
            raise ConfigError(f"unknown --nal {self.nal!r}; choose one of {', '.join(NAL_MODES)}")
        if self.nal_loss not in NAL_LOSSES:
            raise ConfigError(f"unknown --nal-loss {self.nal_loss!r}; choose one of {', '.join(NAL_LOSSES)}")
        abilities = model_abilities(self.model, **self.model_overrides)  # asked of the model, not its name
        if self.nal != "none" and not abilities.causal:
            raise ConfigError(f"the Next Action Loss needs a causal sequence model; {self.model} has none (use --nal none)")
        if self.user_emb is not None and not abilities.accepts_user_tokens:
            raise ConfigError(f"--user-emb prepends user tokens to a model's sequence; {self.model} has none")
        if self.epochs < 1 or self.batch_size < 1 or self.lr <= 0:
            raise ConfigError("epochs and batch_size must be >= 1 and lr > 0")
        if self.lr_schedule not in LR_SCHEDULES:
            raise ConfigError(f"unknown lr_schedule {self.lr_schedule!r}; choose one of {', '.join(LR_SCHEDULES)}")
        if self.val_days < 0 or self.patience < 0 or self.warmup_steps < 0 or self.clip_norm < 0:
            raise ConfigError("val_days, patience, warmup_steps and clip_norm must be >= 0")
        if not 0.0 <= self.min_lr_ratio <= 1.0:
            raise ConfigError(f"min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}")
        if self.patience and not self.val_days:
            raise ConfigError("patience stops on the validation NE: set val_days > 0 too")
        if self.calibrate and not self.val_days:
            raise ConfigError("calibrate fits on the validation split: set val_days > 0 too")


_SET_BY_DATA = ("layout", "n_heads", "user_tokens")


def build_train_config(data: Mapping[str, Any] | None = None,
                       overrides: Iterable[str | tuple[str, Any]] = ()) -> TrainConfig:
    """A :class:`TrainConfig` from nested plain data and ``key=value`` overrides (:func:`lifelong.core.config.build`).

    ``model`` is a model name, or a section ``{name: NAME, <fields of that model's config>}``
    whose other keys become ``model_overrides``, checked against the model's config, so
    ``--set model.d_model=64`` reaches the model. ``--set model=bst`` sets the name only.

    Raises:
        ConfigError: an unknown key (named with its dotted key) or an invalid value.

    Example::

        >>> cfg = build_train_config({"model": "bst", "nal": "none"}, ["model.mlp_dims=[64, 32]", "lr=1e-3"])
        >>> cfg.model, cfg.model_overrides, cfg.lr
        ('bst', {'mlp_dims': [64, 32]}, 0.001)
    """
    data = dict(data or {})
    model = data.get("model", TrainConfig.model)
    data["model"] = dict(model) if isinstance(model, Mapping) else {"name": model}
    sets = []
    for item in overrides:
        key, value = parse_set(item) if isinstance(item, str) else item
        sets.append(("model.name" if key == "model" and not isinstance(value, Mapping) else key, value))
    data = apply_sets(data, sets)
    model = dict(data.pop("model"))
    name = model.pop("name", TrainConfig.model)
    model_overrides = merge(data.pop("model_overrides", None) or {}, model)
    for key in _SET_BY_DATA:
        if key in model_overrides:
            raise ConfigError(f"model.{key}: set by the rows directory (and --user-emb), not by the config")
    if isinstance(name, str) and name in MODEL_NAMES:
        apply_overrides(default_config(name), model_overrides, prefix="model")  # names a bad key as model.<key>
    return build(TrainConfig, {**data, "model": name, "model_overrides": model_overrides})


def make_model(cfg: TrainConfig, data: RankData) -> torch.nn.Module:
    tokens = {} if data.user_tokens is None else {"user_tokens": data.user_tokens}
    return build_model(cfg.model, layout=data.layout, n_heads=len(data.heads), **cfg.model_overrides, **tokens)


# What the model settings defaulted to when a run was saved without its resolved ``model_config``
# (before 2026-12-02): such runs recorded only the settings they changed, so they are read with
# the defaults they were trained under, not today's.
_DEFAULTS_OF_RUNS_WITHOUT_MODEL_CONFIG = {"token_similarity": False}


def model_config(cfg: TrainConfig) -> dict[str, Any]:
    """Every setting of ``cfg``'s model, defaults included, as plain data; the fields the rows set
    (``layout``, ``n_heads``, ``user_tokens``) aside. Runs save it, and name themselves by it, so
    a change of a default never makes an old run load, or be reused, as another model.

    Example::

        >>> model_config(TrainConfig(model="transact", nal="none"))["blocks"]
        ('rt',)
    """
    resolved = asdict(apply_overrides(default_config(cfg.model), cfg.model_overrides))
    return {k: v for k, v in resolved.items() if k not in _SET_BY_DATA}


def saved_model_config(saved: Mapping[str, Any], cfg: TrainConfig) -> dict[str, Any]:
    """The model settings a run (its ``model.pt`` or ``run.json``) was trained with; for a run saved
    without them, its changed settings over the defaults of that time."""
    if "model_config" in saved:
        return dict(saved["model_config"])
    fields = asdict(default_config(cfg.model))
    legacy = {k: v for k, v in _DEFAULTS_OF_RUNS_WITHOUT_MODEL_CONFIG.items() if k in fields}
    return model_config(replace(cfg, model_overrides={**legacy, **cfg.model_overrides}))


def _losses(model: torch.nn.Module, batch, row_w: torch.Tensor | None, weights: torch.Tensor, cfg: TrainConfig,
            gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The ranking loss of a batch and its Next Action Loss (None when the run has none), in float32."""
    with forward_precision(cfg.precision):
        output = model(batch)
    ce = ranking_loss(output.logits.float(), batch.labels, weights, row_w)
    if cfg.nal == "none" or output.rt_states is None:
        return ce, None
    return ce, next_action_loss(output.rt_states.float(), batch, negatives=cfg.nal, loss=cfg.nal_loss, generator=gen)


class _Losses(torch.nn.Module):
    """:func:`_losses` as a module, the one DDP wraps. DDP hooks the gradient sync of its first
    (static-graph) step into the tensors a forward returns, which it finds in a tuple but not
    inside a dataclass such as ``ModelOutput``: wrapping the model itself, that first step would
    not be averaged."""

    def __init__(self, model: torch.nn.Module, weights: torch.Tensor, cfg: TrainConfig):
        super().__init__()
        self.model, self.weights, self.cfg = model, weights, cfg

    def forward(self, batch, row_w: torch.Tensor | None, gen: torch.Generator):
        return _losses(self.model, batch, row_w, self.weights, self.cfg, gen)


def lr_factor(cfg: TrainConfig, step: int, total_steps: int) -> float:
    """The learning rate at optimizer step ``step`` (0-based) of ``total_steps``, as a share of ``cfg.lr``.

    Example::

        >>> cfg = TrainConfig(warmup_steps=10, lr_schedule="cosine", min_lr_ratio=0.1)
        >>> [round(lr_factor(cfg, s, 111), 3) for s in (0, 9, 10, 60, 110)]
        [0.1, 1.0, 1.0, 0.55, 0.1]
    """
    if step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    if cfg.lr_schedule == "constant":
        return 1.0
    span = max(total_steps - 1 - cfg.warmup_steps, 1)
    done = min((step - cfg.warmup_steps) / span, 1.0)
    return cfg.min_lr_ratio + (1.0 - cfg.min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * done))


def split_validation(data: RankData, cfg: TrainConfig) -> tuple[np.ndarray, np.ndarray]:
    """Training and validation row indices: validation is the rows of the last ``cfg.val_days``
    days before the protocol's cutoff (whole days of requests, every user), none when 0."""
    rows = np.arange(len(data))
    if not cfg.val_days:
        return rows, rows[:0]
    if "ts_ms" not in data.arrays:
        raise DataError(data.directory, "val_days needs the rows' ts_ms (rebuild with lifelong transact build)")
    start = data.meta["protocol"]["cutoff_ms"] - cfg.val_days * 86_400_000
    held = np.asarray(data.arrays["ts_ms"]) >= start
    if held.all() or not held.any():
        raise DataError(data.directory, f"val_days={cfg.val_days} leaves {'no training' if held.all() else 'no validation'} "
                                        "rows: choose fewer days than the training window holds")
    return rows[~held], rows[held]


@torch.no_grad()
def validation_ne(model: torch.nn.Module, data: RankData, rows: np.ndarray, batch_size: int = 4096) -> dict[str, float]:
    """NE of each head on ``rows`` and their ``mean`` over the heads with both classes there (a head
    without positives has no NE: :func:`head_ne`). :func:`predict` leaves the model in eval mode."""
    probs = predict(model, data, batch_size, rows)
    labels = np.asarray(data.arrays["labels"])[rows]
    ne = {h: head_ne(labels[:, i], probs[:, i]) for i, h in enumerate(data.heads)}
    defined = [v for v in ne.values() if not math.isnan(v)]
    return {**ne, "mean": float(np.mean(defined)) if defined else math.nan}


def train(data_dir: str | os.PathLike[str], out: str | os.PathLike[str], cfg: TrainConfig,
          log=print) -> dict:
    """Train a ranker on the ``train`` rows of ``data_dir``; write the run to ``out``.

    Returns the run metadata (also in ``out/run.json``): losses per epoch and examples/s.
    Started as a rank (torchrun's ``WORLD_SIZE``, ``RANK``…, or
    :func:`lifelong.core.distributed.launch`), it trains one rank of a data-parallel run: only
    rank 0 logs and writes.

    Raises:
        ConfigError: an invalid setting, or ``batch_size`` not a multiple of the ranks, or
            collision-less id tables under more than one rank (their rows are not parameters that
            DDP averages: each rank's table would learn apart).

    Example::

        meta = train("datasets/small", "runs/v2", TrainConfig(model="transact_v2"))
    """
    ranks = ranks_from_env()
    check_split(cfg.batch_size, ranks.size, "batch_size")
    with process_group(ranks):
        return _train(data_dir, Path(out), cfg, log if ranks.main else lambda *_: None, ranks)


def _train(data_dir: str | os.PathLike[str], out: Path, cfg: TrainConfig, log, ranks: Ranks) -> dict:
    data = RankData(data_dir, "train", user_emb=cfg.user_emb)
    if data.user_emb_info is not None:
        info = data.user_emb_info
        log(f"user embedding: version {info['version']} of {info['store']}, {tuple(info['shape'])} a user, "
            f"{info['users_found']:,} of {info['users']:,} training users found (the rest read zeros)")
    if len(cfg.head_weights) != len(data.heads):
        raise ConfigError(f"{len(cfg.head_weights)} head weights for heads {data.heads}")
    torch.manual_seed(cfg.seed)
    rng = np.random.default_rng(cfg.seed)
    if len(data) == 0:
        raise DataError(data.directory, "no training rows")
    rows, val_rows = split_validation(data, cfg)
    if cfg.max_rows is not None and cfg.max_rows < len(rows):
        rows = np.sort(rng.choice(rows, cfg.max_rows, replace=False))
    model = make_model(cfg, data)
    if ranks.parallel and next(collisionless_modules(model), None) is not None:
        raise ConfigError("collision-less id tables (model.row.tables) train with their own sparse optimizers, which "
                          "DDP does not average: train this model in one process (no --nproc)")
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    gen = torch.Generator().manual_seed(cfg.seed)
    n_batches = (len(rows) + cfg.batch_size - 1) // cfg.batch_size
    if 0 < len(rows) % cfg.batch_size < ranks.size:
        n_batches -= 1  # a last batch of fewer rows than ranks would leave a rank without any: skipped
    scheduled = cfg.warmup_steps > 0 or cfg.lr_schedule != "constant"
    # Without warmup or schedule no scheduler is made, so such runs step exactly as before.
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: lr_factor(cfg, step, cfg.epochs * n_batches)) \
        if scheduled else None
    best = {"ne": math.inf, "epoch": 0, "state": None, "since": 0}
    if ranks.main:
        out.mkdir(parents=True, exist_ok=True)
    meta = {"kind": "run", "data": str(Path(data_dir).resolve()), "train": asdict(cfg), "model_config": model_config(cfg),
            "heads": list(data.heads),
            "layout": asdict(data.layout), "rows": int(len(rows)), "epochs": [],
            "parameters": int(sum(p.numel() for p in model.parameters())), "lifelong_version": lifelong.__version__,
            "user_emb": data.user_emb_info, "validation_rows": int(val_rows.size)}
    if ranks.parallel:
        meta["data_parallel"] = {"processes": ranks.size, "backend": "gloo",
                                 "batch_per_process": cfg.batch_size // ranks.size}
    start_epoch = 0
    ckpt_path = out / "checkpoint.pt"
    if ckpt_path.exists():  # every rank loads rank 0's checkpoint, before any rank can write the next one
        ckpt = torch.load(ckpt_path, weights_only=False)
        if ckpt["train"] == asdict(cfg) and ckpt.get("model_config") == meta["model_config"]:
            model.load_state_dict(ckpt["model"])
            opt.load_state_dict(ckpt["optimizer"])
            start_epoch, meta["epochs"] = ckpt["epoch"], ckpt["epochs"]
            rng.bit_generator.state, gen = ckpt["rng"], ckpt["gen"]
            if sched is not None:
                sched.load_state_dict(ckpt["scheduler"])
            best = ckpt.get("best", best)
            log(f"resuming {out} after epoch {start_epoch}")
    weights = torch.tensor(cfg.head_weights)
    # Wrapped after the checkpoint is loaded: DDP starts every rank from rank 0's parameters. Some
    # parameters get no gradient (rt_proj feeds only the NAL): a static graph lets DDP find them in
    # the first step and leave their gradient None, as one process does (AdamW then skips them).
    # The buffers (index maps) are constants: not broadcast at every step.
    ddp = DistributedDataParallel(_Losses(model, weights, cfg), static_graph=True,
                                  forward_sync_buffers=False) if ranks.parallel else None
    for epoch in range(start_epoch, cfg.epochs):
        if cfg.patience and best["since"] >= cfg.patience:
            break  # a run resumed after it had already stopped early
        model.train()
        order = rng.permutation(rows)
        if ranks.parallel:
            # Each rank samples in-batch negatives from its own rows: a generator per (seed, epoch,
            # rank) makes a run resumed after any epoch draw what the uninterrupted one did.
            seed = np.random.SeedSequence([cfg.seed, epoch, ranks.rank]).generate_state(1)[0]
            gen = torch.Generator().manual_seed(int(seed))
        totals = {"loss": 0.0, "ce": 0.0, "nal": 0.0}
        steps = 0
        t0 = time.perf_counter()
        with progress(f"{cfg.model} epoch {epoch + 1}/{cfg.epochs}", total=n_batches) as advance:
            for b in range(n_batches):
                glob = order[b * cfg.batch_size:(b + 1) * cfg.batch_size]
                idx = np.sort(shard(glob, ranks))
                batch = data.batch(idx)
                row_w = torch.from_numpy(np.asarray(data.arrays["weight"][idx])) if "weight" in data.arrays else None
                ce, nal = _losses(model, batch, row_w, weights, cfg, gen) if ddp is None else ddp(batch, row_w, gen)
                if ddp is not None:
                    row_share = loss_share(len(idx), len(glob), ranks)
                    local = len(idx) if row_w is None else float(row_w.sum())
                    total = len(glob) if row_w is None else float(all_reduce_sum([local], ranks)[0])
                    ce = ce * loss_share(local, total, ranks)
                    # The NAL is a mean over the rank's valid positions, not rows: weighted by the
                    # rank's share of the rows, the average over ranks approximates the global one.
                    nal = None if nal is None else nal * row_share
                loss = ce if nal is None else ce + cfg.w_nal * nal
                if nal is not None:
                    totals["nal"] += float(nal.detach())
                opt.zero_grad(set_to_none=True)
                loss.backward()
                if cfg.clip_norm:
                    torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.clip_norm)
                opt.step()
                if sched is not None:
                    sched.step()
                # Collision-less id tables (row.tables) step with their own sparse optimizers,
                # their rows stamped with the batch's newest impression time.
                sparse_step(model, int(data.arrays["ts_ms"][idx].max()) if "ts_ms" in data.arrays else steps)
                totals["loss"] += float(loss.detach())
                totals["ce"] += float(ce.detach())
                steps += 1
                advance(1)
                fault_point(ranks, (epoch - start_epoch) * n_batches + steps)
        seconds = time.perf_counter() - t0
        if ranks.parallel:  # each rank summed its scaled share: their sum over ranks is size x the global losses
            totals = dict(zip(totals, (all_reduce_sum(list(totals.values()), ranks) / ranks.size).tolist()))
        record = {k: v / max(steps, 1) for k, v in totals.items()}
        record.update(epoch=epoch + 1, seconds=round(seconds, 2), examples_per_s=round(len(order) / seconds, 1),
                      lr=opt.param_groups[0]["lr"])
        note = ""
        if val_rows.size:  # every rank computes it on the same weights: they stop together
            record["val_ne"] = validation_ne(model, data, val_rows)
            if record["val_ne"]["mean"] < best["ne"]:
                best = {"ne": record["val_ne"]["mean"], "epoch": epoch + 1,
                        "state": {k: v.detach().clone() for k, v in model.state_dict().items()}, "since": 0}
            else:
                best["since"] += 1
            note = f", validation NE {record['val_ne']['mean']:.4f}" + (" (best)" if best["since"] == 0 else "")
        meta["epochs"].append(record)
        if ranks.main:
            save_atomic({"model": model.state_dict(), "optimizer": opt.state_dict(), "epoch": epoch + 1,
                          "epochs": meta["epochs"], "train": asdict(cfg), "model_config": meta["model_config"],
                          "rng": rng.bit_generator.state, "gen": gen,
                          "best": best, **({"scheduler": sched.state_dict()} if sched is not None else {})},
                         ckpt_path)
        log(f"{cfg.model} epoch {epoch + 1}: loss {record['loss']:.4f} (ce {record['ce']:.4f}, nal {record['nal']:.4f}), "
            f"{record['examples_per_s']:,.0f} examples/s{note}")
        if cfg.patience and best["since"] >= cfg.patience:
            log(f"early stop: no lower validation NE in {cfg.patience} epoch(s) after epoch {best['epoch']}")
            break
    if best["state"] is not None:
        model.load_state_dict(best["state"])
        meta["best_epoch"], meta["best_val_ne"] = best["epoch"], best["ne"]
    if cfg.calibrate:
        calibration = calibrate(model, data, val_rows)
        meta["calibration"] = calibration
        meta["calibrated_val_ne"] = validation_ne(model, data, val_rows)
        log("calibrated on the validation split: " + ", ".join(
            f"{h} x{a:.3f} {b:+.3f}" for h, (a, b) in calibration.items())
            + f"; validation NE {meta['calibrated_val_ne']['mean']:.4f}")
    meta["examples_per_s"] = float(np.mean([e["examples_per_s"] for e in meta["epochs"]]))
    if ranks.main:
        save_atomic({"name": cfg.model, "train": asdict(cfg), "model_config": meta["model_config"],
                     "layout": asdict(data.layout), "n_heads": len(data.heads),
                     "user_tokens": data.user_tokens, "state_dict": model.state_dict()}, out / "model.pt")
        write_json(meta, out / "run.json")
    return meta


def load_model(run: str | os.PathLike[str]) -> tuple[torch.nn.Module, dict]:
    """The trained model of a run directory (in eval mode) and its run metadata."""
    run = Path(run)
    if not (run / "model.pt").is_file():
        raise DataError(run, "not a finished run (no model.pt); run `lifelong transact train` first")
    saved = torch.load(run / "model.pt", weights_only=False)
    from lifelong.transact.sequence_layout import SequenceLayout

    cfg = build(TrainConfig, saved["train"])
    tokens = {} if saved.get("user_tokens") is None else {"user_tokens": tuple(saved["user_tokens"])}
    model = build_model(saved["name"], layout=SequenceLayout(**saved["layout"]), n_heads=saved["n_heads"],
                        **saved_model_config(saved, cfg), **tokens)
    model.load_state_dict(saved["state_dict"])
    model.eval()
    meta = json.loads((run / "run.json").read_text()) if (run / "run.json").exists() else {}
    return model, meta


@torch.no_grad()
def predict_logits(model: torch.nn.Module, data: RankData, batch_size: int = 4096,
                   rows: np.ndarray | None = None) -> np.ndarray:
    """(n, H) head logits of ``rows`` of ``data`` (default: every row), in their order."""
    model.eval()
    rows = np.arange(len(data)) if rows is None else np.asarray(rows)
    # RankData.batch returns its rows sorted: score in sorted order, then put each back in place.
    order = np.argsort(rows, kind="stable")
    out = np.zeros((rows.size, len(data.heads)), dtype=np.float32)
    for a in range(0, rows.size, batch_size):
        at = order[a:a + batch_size]
        out[at] = model(data.batch(rows[at])).logits.numpy()
    return out


def predict(model: torch.nn.Module, data: RankData, batch_size: int = 4096,
            rows: np.ndarray | None = None) -> np.ndarray:
    """(n, H) head probabilities of ``rows`` of ``data`` (default: every row), in their order."""
    return torch.sigmoid(torch.from_numpy(predict_logits(model, data, batch_size, rows))).numpy()


def calibrate(model: torch.nn.Module, data: RankData, rows: np.ndarray) -> dict[str, list[float]]:
    """Fit each head's Platt scaling on ``rows`` of ``data`` and fold it into ``model``'s
    ``logit_layers``; returns ``{head: [scale, shift]}``."""
    labels = torch.from_numpy(np.asarray(data.arrays["labels"])[rows].astype(np.float32))
    scale, shift = fit_logit_calibration(torch.from_numpy(predict_logits(model, data, rows=rows)), labels)
    fold_logit_calibration(model.logit_layers, scale, shift)
    return {h: [float(scale[i]), float(shift[i])] for i, h in enumerate(data.heads)}
