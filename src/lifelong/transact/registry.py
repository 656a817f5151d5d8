"""Rankers by name, as experiments and the CLI refer to them (the rows of the paper's Table 2).

NAL variants ("TransAct + NAL in-batch / impression") are not separate models: the trainer
adds :func:`lifelong.transact.nal.next_action_loss` to any model whose abilities declare it
``causal``. What a model can do is asked of :func:`model_abilities` (before the model exists)
or of ``model.abilities`` (:mod:`lifelong.transact.abilities`), never of its name.

Adding a ranker is one line here: its name, its ``nn.Module`` class (with ``abilities_for``)
and a factory of its default configuration.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from torch import nn

from lifelong.core.errors import ConfigError
from lifelong.transact.abilities import Abilities
from lifelong.transact.baselines import BST, WideDeep
from lifelong.transact.config import BSTConfig, ModelConfig, TransActConfig, WideDeepConfig, apply_overrides
from lifelong.transact.din import DIN, DINConfig
from lifelong.transact.model import TransAct

_MODELS: dict[str, tuple[type[nn.Module], Callable[[], Any]]] = {
    "wide_deep": (WideDeep, WideDeepConfig),
    "bst": (BST, BSTConfig),
    "transact": (TransAct, TransActConfig.v1),
    "transact_v2": (TransAct, TransActConfig),
    "din": (DIN, DINConfig),
}
MODEL_NAMES: tuple[str, ...] = tuple(_MODELS)


def default_config(name: str) -> ModelConfig:
    """The default configuration of the model called ``name``."""
    if name not in _MODELS:
        raise ConfigError(f"unknown model {name!r}; valid models are {', '.join(MODEL_NAMES)}")
    return _MODELS[name][1]()


def _config(name: str, cfg: Any, overrides: dict[str, Any]) -> Any:
    base = default_config(name)
    if cfg is None:
        cfg = base
    elif type(cfg) is not type(base):
        raise ConfigError(f"model {name!r} takes a {type(base).__name__}, got a {type(cfg).__name__}")
    return apply_overrides(cfg, overrides)


def model_abilities(name: str, cfg: ModelConfig | None = None, **overrides: Any) -> Abilities:
    """The abilities the model ``name`` declares for a configuration, without building it.

    Args and Raises: as :func:`build_model`.

    Example::

        >>> model_abilities("transact").causal, model_abilities("bst").causal, model_abilities("wide_deep").blocks
        (True, False, ())
    """
    cfg = _config(name, cfg, overrides)
    return _MODELS[name][0].abilities_for(cfg)


def build_model(name: str, cfg: ModelConfig | None = None, **overrides: Any) -> nn.Module:
    """Build a ranker by name.

    Args:
        name: one of ``MODEL_NAMES``: "wide_deep", "bst", "transact" (v1), "transact_v2", "din".
        cfg: its configuration; None takes the model's default (for "transact" that is
            ``TransActConfig.v1()``).
        **overrides: fields replaced in ``cfg`` (nested mappings update nested configs, e.g.
            ``layout={"rt": 32}``), typically the shared ``layout`` and ``n_heads``.

    Raises:
        ConfigError: unknown name or field, invalid value, or a config of another model.

    Example::

        >>> from lifelong.transact.sequence_layout import SequenceLayout
        >>> build_model("transact", layout=SequenceLayout(8, 8, 4, 4), n_heads=2).cfg.blocks
        ('rt',)
        >>> build_model("dlrm")  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        lifelong.core.errors.ConfigError: unknown model 'dlrm'; valid models are wide_deep, bst, transact, transact_v2, din
    """
    cfg = _config(name, cfg, overrides)
    return _MODELS[name][0](cfg)
