"""Rankers by name, as experiments and the CLI refer to them (the rows of the paper's Table 2).

NAL variants ("TransAct + NAL in-batch / impression") are not separate models: the trainer
adds :func:`lifelong.models.nal.next_action_loss` to a ``"transact"`` or ``"transact_v2"``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from torch import nn

from lifelong.errors import ConfigError
from lifelong.models.baselines import BST, WideDeep
from lifelong.models.config import BSTConfig, ModelConfig, TransActConfig, WideDeepConfig, apply_overrides
from lifelong.models.transact import TransAct

_MODELS: dict[str, tuple[type[nn.Module], Callable[[], ModelConfig]]] = {
    "wide_deep": (WideDeep, WideDeepConfig),
    "bst": (BST, BSTConfig),
    "transact": (TransAct, TransActConfig.v1),
    "transact_v2": (TransAct, TransActConfig),
}
MODEL_NAMES: tuple[str, ...] = tuple(_MODELS)


def default_config(name: str) -> ModelConfig:
    """The default configuration of the model called ``name``."""
    if name not in _MODELS:
        raise ConfigError(f"unknown model {name!r}; valid models are {', '.join(MODEL_NAMES)}")
    return _MODELS[name][1]()


def build_model(name: str, cfg: ModelConfig | None = None, **overrides: Any) -> nn.Module:
    """Build a ranker by name.

    Args:
        name: one of ``MODEL_NAMES``: "wide_deep", "bst", "transact" (v1), "transact_v2".
        cfg: its configuration; None takes the model's default (for "transact" that is
            ``TransActConfig.v1()``).
        **overrides: fields replaced in ``cfg`` (nested mappings update nested configs, e.g.
            ``layout={"rt": 32}``), typically the shared ``layout`` and ``n_heads``.

    Raises:
        ConfigError: unknown name or field, invalid value, or a config of another model.

    Example::

        >>> from lifelong.models.batch import SequenceLayout
        >>> build_model("transact", layout=SequenceLayout(8, 8, 4, 4), n_heads=2).cfg.blocks
        ('rt',)
        >>> build_model("dlrm")  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        lifelong.errors.ConfigError: unknown model 'dlrm'; valid models are wide_deep, bst, transact, transact_v2
    """
    base = default_config(name)
    model_cls, _ = _MODELS[name]
    if cfg is None:
        cfg = base
    elif type(cfg) is not type(base):
        raise ConfigError(f"model {name!r} takes a {type(base).__name__}, got a {type(cfg).__name__}")
    return model_cls(apply_overrides(cfg, overrides))
