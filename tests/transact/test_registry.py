"""Model registry and configs: names, overrides, validation errors."""

from __future__ import annotations

import pytest

from lifelong.core.errors import ConfigError
from lifelong.transact.baselines import BST, WideDeep
from lifelong.transact.batch import SequenceLayout
from lifelong.transact.config import BSTConfig, TransActConfig, apply_overrides
from lifelong.transact.model import TransAct
from lifelong.transact.registry import MODEL_NAMES, build_model


def test_names_and_classes():
    assert MODEL_NAMES == ("wide_deep", "bst", "transact", "transact_v2")
    built = {name: build_model(name, layout=SequenceLayout(4, 4, 2, 2), row={"hash_buckets": 64}) for name in MODEL_NAMES}
    assert isinstance(built["wide_deep"], WideDeep) and isinstance(built["bst"], BST)
    assert built["transact"].cfg.blocks == ("rt",)
    assert built["transact_v2"].cfg.blocks == SequenceLayout.BLOCKS
    assert isinstance(built["transact_v2"], TransAct)


def test_unknown_model_lists_valid_names():
    with pytest.raises(ConfigError, match="unknown model 'dlrm'; valid models are wide_deep, bst, transact, transact_v2"):
        build_model("dlrm")


def test_config_of_another_model_is_rejected():
    with pytest.raises(ConfigError, match="takes a TransActConfig, got a BSTConfig"):
        build_model("transact", BSTConfig())


def test_overrides_from_plain_mappings():
    cfg = apply_overrides(TransActConfig(), {"layout": {"ll_nn": 8}, "row": {"id_dim": 4}, "mlp_dims": [64, 32]})
    assert cfg.layout == SequenceLayout(ll_nn=8) and cfg.row.id_dim == 4 and cfg.mlp_dims == (64, 32)
    with pytest.raises(ConfigError, match="RowFeatureConfig has no field 'buckets'"):
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
