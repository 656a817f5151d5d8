"""Model registry and configs: names, overrides, validation errors."""

from __future__ import annotations

import pytest

from lifelong.core.errors import ConfigError
from lifelong.transact.abilities import Abilities, RankingModel, TokenTableRanker
from lifelong.transact.baselines import BST, WideDeep
from lifelong.transact.config import BSTConfig, TransActConfig, apply_overrides
from lifelong.transact.model import TransAct
from lifelong.transact.registry import MODEL_NAMES, build_model, model_abilities
from lifelong.transact.sequence_layout import SequenceLayout


def test_names_and_classes():
    assert MODEL_NAMES == ("wide_deep", "bst", "transact", "transact_v2", "din")
    built = {name: build_model(name, layout=SequenceLayout(4, 4, 2, 2), row={"hash_buckets": 64}) for name in MODEL_NAMES}
    assert isinstance(built["wide_deep"], WideDeep) and isinstance(built["bst"], BST)
    assert built["transact"].cfg.blocks == ("rt",)
    assert built["transact_v2"].cfg.blocks == SequenceLayout.BLOCKS
    assert isinstance(built["transact_v2"], TransAct)


def test_unknown_model_lists_valid_names():
    with pytest.raises(ConfigError, match="unknown model 'dlrm'; valid models are wide_deep, bst, transact, transact_v2, din"):
        build_model("dlrm")
    with pytest.raises(ConfigError, match="unknown model 'dlrm'"):
        model_abilities("dlrm")


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_declared_abilities_match_the_built_model(name):
    """What a config declares before the model exists is what the model says it can do."""
    overrides = {"layout": SequenceLayout(4, 4, 2, 2), "row": {"hash_buckets": 64}}
    model = build_model(name, **overrides)
    assert isinstance(model, RankingModel)
    assert model.abilities == model_abilities(name, **overrides)
    if model.abilities.token_table:
        assert isinstance(model, TokenTableRanker)
    if model.abilities.user_tokens:
        assert model.abilities.accepts_user_tokens


def test_abilities_follow_the_config_not_the_name():
    assert model_abilities("transact") == Abilities(blocks=("rt",), causal=True, accepts_user_tokens=True,
                                                    token_table=True)
    assert model_abilities("transact_v2", blocks=("ll_nn", "imp_nn")).causal is False  # no rt: no rt_states
    with_tokens = model_abilities("transact_v2", user_tokens=(2, 8))
    assert with_tokens.user_tokens and with_tokens.token_table  # the token-table path prepends them too
    assert model_abilities("bst") == Abilities(blocks=("rt",))
    assert model_abilities("wide_deep") == Abilities()
    assert model_abilities("din", blocks=("rt",)).blocks == ("rt",)


def test_config_of_another_model_is_rejected():
    with pytest.raises(ConfigError, match="takes a TransActConfig, got a BSTConfig"):
        build_model("transact", BSTConfig())


def test_overrides_from_plain_mappings():
    cfg = apply_overrides(TransActConfig(), {"layout": {"ll_nn": 8}, "row": {"id_dim": 4}, "mlp_dims": [64, 32]})
    assert cfg.layout == SequenceLayout(ll_nn=8) and cfg.row.id_dim == 4 and cfg.mlp_dims == (64, 32)
    # The message's wording belongs to lifelong.core.config (being reworded): either form names the key.
    with pytest.raises(ConfigError, match=r"RowFeatureConfig has no field 'buckets'|row\.buckets: no such key"):
        apply_overrides(TransActConfig(), {"row": {"buckets": 4}})


@pytest.mark.parametrize(("overrides", "message"), [
    ({"blocks": ("rt", "ll_nn")}, "layout order"),
    ({"blocks": ("rt", "rt")}, "distinct"),
    ({"blocks": ("recent",)}, "subset"),
    ({"blocks": ()}, "non-empty"),
    ({"dropout": 1.0}, "dropout"),
    ({"attn_heads": 3}, "divisible"),
    ({"mlp_dims": (0,)}, "mlp_dims"),
    ({"layout": {"rt": 0}, "blocks": ("rt",)}, "no tokens"),
])
def test_invalid_transact_configs(overrides, message):
    with pytest.raises(ConfigError, match=message):
        build_model("transact_v2", **overrides)
