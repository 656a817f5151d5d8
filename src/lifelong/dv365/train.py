"""Train the DV365 user tower inside the backbone simulation network (``lifelong dv365 train``).

``L = Σ_k BCE_k + α · MSE(watch)`` over impressions grouped by (user, day)
(:mod:`lifelong.dv365.examples`); each group's tower input is the user's timeline before
``anchor - gap_ms`` (24 h by default; 0 turns the distant-interest gap off). AdamW, seeded.

A run directory holds ``model.pt`` (``kind: dv365``: the tower, with its slice spec, content
tables, FSA config and gap, and the backbone) and ``run.json`` (the config, losses and
examples/s per epoch, parameters, and the evaluation: NE per task on the protocol's
evaluation day). Both are written atomically; :func:`lifelong.dv365.tower.load_tower` reads
the tower back. With ``resume``, ``checkpoint.pt`` (weights, optimizer, shuffling state) is
written after every epoch and a rerun continues after the last one.

Data-parallel (``lifelong dv365 train --nproc N``, or torchrun): every rank samples the same
examples (seeded), rank 0 pools the tower tokens into the run's token cache and the others read
them from there, each step's global batch of ``groups_per_batch`` groups is split ``rank::N``
and DDP averages the gradients, each rank's loss scaled by its share of the batch's examples
(:func:`lifelong.core.distributed.loss_share`). Rank 0 alone evaluates and writes.

Example::

    meta = train_dv365("worlds/lifelong", "runs/dv365", DV365TrainConfig(epochs=2))
    meta["eval"]["ne"]  # {"click": ..., "repin": ..., "long_view": ..., "hide": ...}
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

import lifelong
from lifelong.core.checkpoint import save_atomic
from lifelong.core.config import build
from lifelong.core.distributed import (
    Ranks,
    all_reduce_sum,
    barrier,
    check_split,
    fault_point,
    loss_share,
    process_group,
    ranks_from_env,
    shard,
)
from lifelong.core.errors import ConfigError
from lifelong.core.metrics import auc, normalized_entropy
from lifelong.core.precision import check_precision, forward_precision
from lifelong.core.progress import progress
from lifelong.data.io import write_json
from lifelong.data.protocol import DAY_MS
from lifelong.dv365.backbone import TASKS, BackboneConfig, BackboneOutput, BackboneSimulation, backbone_loss
from lifelong.dv365.examples import ExampleSet, TokenCache, World, open_world, sample_examples
from lifelong.dv365.fsa import FSAConfig
from lifelong.dv365.slices import SliceSpec
from lifelong.dv365.tower import DV365Tower, content_tables


@dataclass(frozen=True)
class DV365TrainConfig:
    """One DV365 training run.

    Args:
        fsa: the user tower's summarisation arch.
        backbone: the DLRM around it (``user_vectors=0``: no user tower, the baseline).
        gap_ms: events of the last ``gap_ms`` before each group's anchor are hidden from the
            tower (the distant-interest objective; 0 turns it off).
        train_days: days of impressions before the protocol's cutoff to train on. 14 (the
            `lifelong` protocol's whole training window): a 4-day tower on 400 or 1,000 users
            learned too little (eval NE 0.98-0.99) for a downstream ranker to gain from it
            (docs/results.md, "What the downstream gain depends on").
        per_group: training impressions kept per (user, day).
        eval_per_group: evaluation impressions kept per (user, day).
        max_users: train and evaluate on a seeded random subset of this many users (None: all).
        epochs: passes over the training groups.
        groups_per_batch: (user, day) groups per step (each with up to ``per_group`` examples).
        lr: AdamW learning rate.
        weight_decay: AdamW weight decay.
        seed: seeds the user subset, the example draw, the weights and the shuffling.
        precision: ``fp32``, or ``bf16``: training forward passes under bfloat16 autocast,
            parameters and losses in float32 (:mod:`lifelong.core.precision`). Evaluation and
            export stay float32.

    Example::

        >>> DV365TrainConfig(gap_ms=-1)
        Traceback (most recent call last):
        ...
        lifelong.core.errors.ConfigError: gap_ms must be >= 0, got -1
    """

    fsa: FSAConfig = field(default_factory=FSAConfig)
    backbone: BackboneConfig = field(default_factory=BackboneConfig)
    gap_ms: int = DAY_MS
    train_days: int = 14
    per_group: int = 64
    eval_per_group: int = 256
    max_users: int | None = 1000
    epochs: int = 4
    groups_per_batch: int = 32
    lr: float = 2e-3
    weight_decay: float = 1e-5
    seed: int = 0
    precision: str = "fp32"

    def __post_init__(self) -> None:
        check_precision(self.precision)
        if self.gap_ms < 0:
            raise ConfigError(f"gap_ms must be >= 0, got {self.gap_ms}")
        for key in ("train_days", "per_group", "eval_per_group", "epochs", "groups_per_batch"):
            if getattr(self, key) < 1:
                raise ConfigError(f"{key} must be >= 1, got {getattr(self, key)}")
        if self.max_users is not None and self.max_users < 1:
            raise ConfigError(f"max_users must be >= 1 or None, got {self.max_users}")
        if self.lr <= 0:
            raise ConfigError(f"lr must be > 0, got {self.lr}")

    @classmethod
    def from_dict(cls, d: dict) -> DV365TrainConfig:
        """The inverse of ``dataclasses.asdict`` (:func:`lifelong.core.config.build`)."""
        return build(cls, d)


@dataclass(frozen=True, eq=False)
class Prepared:
    """The examples of a run and the shared token cache (reusable across runs of one experiment)."""

    world: World
    users: np.ndarray
    train: ExampleSet
    eval: ExampleSet
    cache: TokenCache
    content: dict[str, torch.Tensor]


def prepare(world: World, cfg: DV365TrainConfig, spec: SliceSpec | None = None,
            cache_dir: str | os.PathLike[str] | None = None) -> Prepared:
    """Sample the users and examples of ``cfg`` and set up the token cache (tokens come on first use).

    Args:
        world: the data.
        cfg: train_days, per_group, eval_per_group, max_users and seed are read.
        spec: the slices (default: :meth:`SliceSpec.default`).
        cache_dir: where the token cache keeps its tokens across processes (None: memory only).
    """
    users = world.users
    if cfg.max_users is not None and cfg.max_users < users.size:
        users = np.sort(np.random.default_rng(cfg.seed).choice(users, cfg.max_users, replace=False))
    train = sample_examples(world, world.train_window(cfg.train_days), cfg.per_group, users, seed=cfg.seed)
    evaluation = sample_examples(world, world.eval_window(), cfg.eval_per_group, users, seed=cfg.seed + 1)
    content = content_tables(world.items)
    pooler = DV365Tower(spec or SliceSpec.default(), content, FSAConfig(encoders=("none",)), gap_ms=0)
    return Prepared(world, users, train, evaluation, TokenCache(pooler, world.source, users, cache_dir), content)


def group_tokens(prepared: Prepared, examples: ExampleSet, cut_offset_ms: int) -> torch.Tensor:
    """(G, N, TOKEN_DIM) float16 tower tokens of every group, cut at ``anchor - cut_offset_ms``."""
    return prepared.cache.tokens(examples.group_user, examples.group_anchor_ms - cut_offset_ms)


def _forward(tower: DV365Tower, backbone: BackboneSimulation, tokens: torch.Tensor, examples: ExampleSet,
             groups: np.ndarray, precision: str = "fp32"):
    features, labels, watch = examples.batch(groups)
    with forward_precision(precision):
        # Without user vectors the backbone ignores the tower: skip its forward.
        user = tower(tokens[torch.from_numpy(groups)].float()) if backbone.user_proj is not None else tokens[:0]
        out = backbone(user, features)
    return BackboneOutput(out.logits.float(), out.watch.float()), labels, watch


class _Losses(nn.Module):
    """``backbone_loss`` of a batch of groups as one module, the one DDP wraps (tower and backbone
    together; it finds the tensors a forward returns in a tuple, not inside a ``BackboneOutput``)."""

    def __init__(self, tower: DV365Tower, backbone: BackboneSimulation, watch_weight: float, precision: str):
        super().__init__()
        self.tower, self.backbone, self.watch_weight, self.precision = tower, backbone, watch_weight, precision

    def forward(self, tokens: torch.Tensor, examples: ExampleSet, groups: np.ndarray):
        out, labels, watch = _forward(self.tower, self.backbone, tokens, examples, groups, self.precision)
        return backbone_loss(out, labels, watch, self.watch_weight)


@torch.no_grad()
def evaluate(tower: DV365Tower, backbone: BackboneSimulation, examples: ExampleSet, tokens: torch.Tensor,
             groups_per_batch: int = 256) -> dict:
    """NE and AUC per task and the watch-time MSE of ``examples``, the tower reading ``tokens``."""
    tower.eval()
    backbone.eval()
    probs, labels, watch_err = [], [], []
    for a in range(0, examples.n_groups, groups_per_batch):
        groups = np.arange(a, min(a + groups_per_batch, examples.n_groups))
        out, y, watch = _forward(tower, backbone, tokens, examples, groups)
        probs.append(torch.sigmoid(out.logits).numpy())
        labels.append(y.numpy())
        watch_err.append(((out.watch - watch) ** 2).numpy())
    p, y = np.concatenate(probs), np.concatenate(labels)
    return {"examples": int(y.shape[0]), "ne": {t: normalized_entropy(y[:, k], p[:, k]) for k, t in enumerate(TASKS)},
            "auc": {t: auc(y[:, k], p[:, k]) for k, t in enumerate(TASKS)},
            "watch_mse": float(np.concatenate(watch_err).mean())}


def fit(prepared: Prepared, cfg: DV365TrainConfig, log: Callable[[str], None] = print,
        spec: SliceSpec | None = None, ranks: Ranks = Ranks(),
        checkpoint: Path | None = None) -> tuple[DV365Tower, BackboneSimulation, dict]:
    """Train a tower and its backbone on prepared examples; returns both (eval mode) and the metadata.

    Args:
        ranks: this process's rank of a data-parallel run (the process group initialised);
            rank 0 alone evaluates (the others' metadata has no ``eval``).
        checkpoint: write the training state there after every epoch (rank 0), and start from
            it when it holds a run of the same settings and slices. None: neither.
    """
    torch.manual_seed(cfg.seed)
    rng = np.random.default_rng(cfg.seed)
    tower = DV365Tower(spec or prepared.cache.tower.spec, prepared.content, cfg.fsa, cfg.gap_ms)
    backbone = BackboneSimulation(tower.out_shape, cfg.backbone)
    params = [p for p in (*tower.parameters(), *backbone.parameters()) if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    train = prepared.train
    # Rank 0 pools the tokens into the cache's files first; the other ranks then read them there.
    if ranks.main:
        tokens = group_tokens(prepared, train, cfg.gap_ms)
    barrier(ranks)
    if not ranks.main:
        tokens = group_tokens(prepared, train, cfg.gap_ms)
    tower_params = sum(p.numel() for p in tower.fsa.parameters())
    meta = {"kind": "dv365_run", "train": asdict(cfg), "users": int(prepared.users.size),
            "train_examples": len(train), "train_groups": train.n_groups, "tower_out_shape": list(tower.out_shape),
            "parameters": {"fsa": tower_params if backbone.user_proj is not None else 0,
                           "backbone": sum(p.numel() for p in backbone.parameters())},
            "epochs": [], "lifelong_version": lifelong.__version__}
    if ranks.parallel:
        meta["data_parallel"] = {"processes": ranks.size, "backend": "gloo",
                                 "groups_per_process": cfg.groups_per_batch // ranks.size}
    key = {"train": asdict(cfg), "slices": list(tower.spec.names)}
    start_epoch = 0
    if checkpoint is not None and checkpoint.exists():  # every rank reads rank 0's, before any can write again
        ckpt = torch.load(checkpoint, weights_only=False)
        if ckpt["key"] == key:
            tower.load_state_dict(ckpt["tower"])
            backbone.load_state_dict(ckpt["backbone"])
            opt.load_state_dict(ckpt["optimizer"])
            rng.bit_generator.state, start_epoch, meta["epochs"] = ckpt["rng"], ckpt["epoch"], ckpt["epochs"]
            log(f"resuming {checkpoint.parent} after epoch {start_epoch}")
    # Wrapped after the checkpoint is loaded (DDP starts every rank from rank 0's parameters); a
    # static graph, as the tower gets no gradient without user vectors. The buffers (the content
    # tables) are constants every rank builds alike: not broadcast at every step.
    ddp = DistributedDataParallel(_Losses(tower, backbone, cfg.backbone.watch_weight, cfg.precision), static_graph=True,
                                  forward_sync_buffers=False) if ranks.parallel else None
    sizes = np.diff(train.offsets)
    n_batches = (train.n_groups + cfg.groups_per_batch - 1) // cfg.groups_per_batch
    if 0 < train.n_groups % cfg.groups_per_batch < ranks.size:
        n_batches -= 1  # a last batch of fewer groups than ranks would leave a rank without any: skipped
    for epoch in range(start_epoch, cfg.epochs):
        tower.train()
        backbone.train()
        order = rng.permutation(train.n_groups)
        totals = np.zeros(3)
        t0 = time.perf_counter()
        with progress(f"DV365 epoch {epoch + 1}/{cfg.epochs}", total=n_batches) as advance:
            for b in range(n_batches):
                glob = order[b * cfg.groups_per_batch:(b + 1) * cfg.groups_per_batch]
                groups = np.sort(shard(glob, ranks))
                if ddp is None:
                    out, labels, watch = _forward(tower, backbone, tokens, train, groups, cfg.precision)
                    loss, bce, mse = backbone_loss(out, labels, watch, cfg.backbone.watch_weight)
                else:  # the losses are means over the rank's examples: scaled to its share of the batch's
                    share = loss_share(int(sizes[groups].sum()), int(sizes[glob].sum()), ranks)
                    loss, bce, mse = (x * share for x in ddp(tokens, train, groups))
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                totals += [float(loss.detach()), float(bce.detach()), float(mse.detach())]
                advance(1)
                fault_point(ranks, (epoch - start_epoch) * n_batches + b + 1)
        seconds = time.perf_counter() - t0
        if ranks.parallel:  # each rank summed its scaled share: their sum over ranks is size x the batches' losses
            totals = all_reduce_sum(totals, ranks) / ranks.size
        record = dict(zip(("loss", "bce", "mse"), (totals / n_batches).round(5).tolist()))
        record.update(epoch=epoch + 1, seconds=round(seconds, 2), examples_per_s=round(len(train) / seconds, 1))
        meta["epochs"].append(record)
        if checkpoint is not None and ranks.main:
            save_atomic({"key": key, "tower": tower.state_dict(), "backbone": backbone.state_dict(),
                         "optimizer": opt.state_dict(), "rng": rng.bit_generator.state, "epoch": epoch + 1,
                         "epochs": meta["epochs"]}, checkpoint)
        log(f"DV365 epoch {epoch + 1}: loss {record['loss']:.4f} (bce {record['bce']:.4f}, mse {record['mse']:.4f}), "
            f"{record['examples_per_s']:,.0f} examples/s")
    meta["examples_per_s"] = float(np.mean([e["examples_per_s"] for e in meta["epochs"]]))
    if ranks.main:
        meta["eval"] = evaluate(tower, backbone, prepared.eval, group_tokens(prepared, prepared.eval, cfg.gap_ms))
    return tower.eval(), backbone.eval(), meta


def save_run(out: str | os.PathLike[str], tower: DV365Tower, backbone: BackboneSimulation, meta: dict) -> None:
    """Write ``model.pt`` and ``run.json`` of a run, each atomically."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    save_atomic({"kind": "dv365", "tower": tower.save_state(),
                  "backbone": {"config": backbone.cfg, "user_shape": tower.out_shape,
                               "state_dict": backbone.state_dict()}, "train": meta["train"]}, out / "model.pt")
    write_json(meta, out / "run.json")


def load_backbone(run_dir: str | os.PathLike[str]) -> BackboneSimulation:
    """The trained backbone of a run directory (eval mode): the DLRM that consumed the tower."""
    saved = torch.load(Path(run_dir) / "model.pt", weights_only=False)
    backbone = BackboneSimulation(tuple(saved["backbone"]["user_shape"]), saved["backbone"]["config"])
    backbone.load_state_dict(saved["backbone"]["state_dict"])
    return backbone.eval()


def train_dv365(data_dir: str | os.PathLike[str], out: str | os.PathLike[str], cfg: DV365TrainConfig,
                log: Callable[[str], None] = print, spec: SliceSpec | None = None, resume: bool = False) -> dict:
    """Open a world, sample examples, train, evaluate and write the run to ``out``; returns its metadata.

    With ``resume``, ``out/checkpoint.pt`` is written after every epoch and a rerun with the same
    settings continues after its last one. Started as a rank (torchrun's ``WORLD_SIZE``, ``RANK``…,
    or :func:`lifelong.core.distributed.launch`), it trains one rank of a data-parallel run: rank
    0 alone logs, evaluates and writes the run.

    Raises:
        ConfigError: ``groups_per_batch`` is not a multiple of the ranks.
    """
    ranks = ranks_from_env()
    check_split(cfg.groups_per_batch, ranks.size, "groups_per_batch")
    out = Path(out)
    with process_group(ranks):
        prepared = prepare(open_world(data_dir), cfg, spec, cache_dir=out / "tokens")
        tower, backbone, meta = fit(prepared, cfg, log if ranks.main else lambda _: None, ranks=ranks,
                                    checkpoint=out / "checkpoint.pt" if resume else None)
        if ranks.main:
            meta["data"] = str(Path(data_dir).resolve())
            save_run(out, tower, backbone, meta)
    return meta
