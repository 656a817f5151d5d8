"""The Funnel Summarization Arch: output shapes, token-wise parameter sharing, the funnel's pooling."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lifelong.core.errors import ConfigError
from lifelong.dv365.fsa import ENCODERS, FSAConfig, FunnelCompression, FunnelSummarizationArch

COMPRESSING = [e for e in ENCODERS if e != "none"]


@settings(max_examples=25, deadline=None)
@given(n=st.integers(1, 40), d=st.integers(1, 12), c_out=st.integers(1, 9), view=st.sampled_from(["token", "dim"]),
       encoders=st.lists(st.sampled_from(COMPRESSING), min_size=1, max_size=3, unique=True),
       blocks=st.integers(1, 4), stride=st.integers(2, 3))
def test_output_shape(n, d, c_out, view, encoders, blocks, stride):
    cfg = FSAConfig(view=view, encoders=tuple(encoders), out_cols=c_out, funnel_blocks=blocks, pool_stride=stride,
                    ffn_dim=8, mlp_hidden=8, transformer_layers=1)
    fsa = FunnelSummarizationArch(n, d, cfg)
    rows = d if view == "token" else n
    assert fsa.out_shape == (rows * len(encoders), c_out)
    assert fsa(torch.randn(3, n, d)).shape == (3, *fsa.out_shape)


@pytest.mark.parametrize("view", ["token", "dim"])
def test_no_compression_is_the_view_itself(view):
    x = torch.randn(2, 7, 5)
    fsa = FunnelSummarizationArch(7, 5, FSAConfig(view=view, encoders=("none",)))
    want = x.transpose(1, 2) if view == "token" else x
    assert fsa.out_shape == tuple(want.shape[1:]) and torch.equal(fsa(x), want)
    assert sum(p.numel() for p in fsa.parameters()) == 0


@pytest.mark.parametrize("encoder", COMPRESSING)
def test_token_wise_parameters_are_shared_by_the_embedding_columns(encoder):
    """Token view: the parameters act on the N slices and do not grow with D, and the columns
    are treated alike: permuting the D columns of the input permutes the output rows."""
    cfg = FSAConfig(view="token", encoders=(encoder,), out_cols=4, ffn_dim=8)
    counts = {sum(p.numel() for p in FunnelSummarizationArch(20, d, cfg).parameters()) for d in (3, 16, 33)}
    assert len(counts) == 1
    torch.manual_seed(0)
    fsa = FunnelSummarizationArch(20, 6, cfg).eval()
    x = torch.randn(2, 20, 6)
    perm = torch.randperm(6)
    torch.testing.assert_close(fsa(x[:, :, perm]), fsa(x)[:, perm])


@pytest.mark.parametrize("encoder", ["lce", "mlp"])
def test_row_wise_encoders_see_one_column_at_a_time(encoder):
    fsa = FunnelSummarizationArch(10, 4, FSAConfig(view="token", encoders=(encoder,), out_cols=3))
    x = torch.randn(1, 10, 4)
    y = x.clone()
    y[:, :, 2] += 1.0
    changed = (fsa(x) - fsa(y)).abs().sum(-1)[0] > 0
    assert changed.tolist() == [False, False, True, False]


def test_dim_wise_parameters_grow_with_d_not_n():
    cfg = FSAConfig(view="dim", encoders=("lce",), out_cols=2)
    count = lambda n, d: sum(p.numel() for p in FunnelSummarizationArch(n, d, cfg).parameters())  # noqa: E731
    assert count(10, 5) == count(50, 5) == 5 * 2 + 2 and count(10, 8) == 8 * 2 + 2


def test_parallel_encoders_are_stacked_along_rows():
    torch.manual_seed(0)
    both = FunnelSummarizationArch(9, 3, FSAConfig(encoders=("funnel", "lce"), out_cols=2))
    x = torch.randn(2, 9, 3)
    out = both(x)
    torch.testing.assert_close(out[:, :3], both.encoders[0](x.transpose(1, 2)))
    torch.testing.assert_close(out[:, 3:], both.encoders[1](x.transpose(1, 2)))


def test_funnel_pools_strided_means_between_blocks():
    funnel = FunnelCompression(7, 2, FSAConfig(funnel_blocks=3, pool_stride=2, ffn_dim=4))
    assert funnel.widths == (7, 4, 2)
    assert [block[0].linear1.in_features for block in funnel.blocks] == [7, 4, 2]
    # With every encoder layer bypassed, the funnel is mean pooling then the output map.
    for block in funnel.blocks:
        for layer in block:
            layer.forward = lambda x, bias: x
    x = torch.arange(7.0).view(1, 1, 7)  # pooled to [0.5, 2.5, 4.5, 6] (a short last window), then [1.5, 5.25]
    torch.testing.assert_close(funnel(x), funnel.out(torch.tensor([[[1.5, 5.25]]])))


def test_gradients_reach_every_parameter():
    fsa = FunnelSummarizationArch(12, 5, FSAConfig(encoders=("funnel", "lce", "mlp", "transformer"), out_cols=3))
    fsa(torch.randn(2, 12, 5)).square().sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in fsa.parameters())


@pytest.mark.parametrize("kwargs, message", [
    ({"view": "diagonal"}, "unknown FSA view 'diagonal'"),
    ({"encoders": ()}, "at least one encoder"),
    ({"encoders": ("lstm",)}, "unknown FSA encoder 'lstm'"),
    ({"out_cols": 0}, "out_cols must be >= 1"),
    ({"pool_stride": 1}, "pool_stride must be >= 2"),
])
def test_bad_configs_are_config_errors(kwargs, message):
    with pytest.raises(ConfigError, match=message):
        FSAConfig(**kwargs)


def test_heads_must_divide_the_attention_width():
    with pytest.raises(ConfigError, match="does not divide the attention width 7"):
        FunnelSummarizationArch(7, 4, FSAConfig(encoders=("transformer",), n_heads=2))
