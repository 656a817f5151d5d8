"""SKUT (in the interpreter without CUDA) == the PyTorch encoder layer under the causal + padding mask."""

from __future__ import annotations

import os

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

pytest.importorskip("triton")
if not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1":
    pytest.skip("no CUDA and TRITON_INTERPRET unset when the kernels were imported", allow_module_level=True)

from lifelong.core.errors import ConfigError  # noqa: E402
from lifelong.modules.layers import EncoderLayer, TransformerEncoder, causal_attention_mask  # noqa: E402
from lifelong.ops import triton_encoder  # noqa: E402
from lifelong.ops.dispatch import kernel_device  # noqa: E402
from lifelong.ops.triton_encoder import check_supported, skut_encode, skut_layer  # noqa: E402
from tests.ops.test_encoder import VARIANTS, assert_backend_matches_reference  # noqa: E402

TOLERANCE = {torch.float32: 1e-5, torch.float16: 1e-2}


@pytest.fixture(autouse=True)
def small_tiles(monkeypatch):
    """16-position tiles: several query blocks and key tiles per row at test sizes."""
    monkeypatch.setattr(triton_encoder, "TILES", {torch.float16: (16, 16, 4), torch.float32: (16, 16, 4)})


def _stack(n_layers: int, heads: int, d: int = 64, ffn: int = 32) -> TransformerEncoder:
    """Random weights, layer norms too (they start at 1 and 0), in eval mode."""
    torch.manual_seed(heads)
    enc = TransformerEncoder(d, n_layers, heads, ffn, dropout=0.0).eval()
    with torch.no_grad():
        for p in enc.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return enc


@settings(max_examples=12, deadline=None)
@given(n=st.integers(1, 4), s=st.integers(1, 40), heads=st.sampled_from([1, 4]),
       dtype=st.sampled_from([torch.float32, torch.float16]), seed=st.integers(0, 2**31))
def test_two_layers_match_the_pytorch_encoder(n, s, heads, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, s, 64, generator=g).to(dtype)
    # Empty, full and ragged rows.
    lengths = torch.randint(0, s + 1, (n,), generator=g)
    lengths[: min(n, 2)] = torch.tensor([0, s])[: min(n, 2)]
    valid = torch.arange(s) < lengths[:, None]
    enc = _stack(2, heads)
    with torch.inference_mode():
        # The reference: the fp32 layers on the same (rounded) input, as a server would run fp32.
        ref = enc(x.float(), causal_attention_mask(valid))
        out = skut_encode(x.to(kernel_device()), lengths.to(kernel_device()), enc.layers).cpu()
    assert out.dtype == dtype and out.shape == x.shape
    torch.testing.assert_close(out.float()[valid], ref[valid], rtol=0, atol=TOLERANCE[dtype])
    assert torch.equal(out[~valid], torch.zeros_like(out[~valid]))


def test_one_layer_is_the_layer_over_each_rows_real_tokens():
    layer = _stack(1, 1).layers[0]
    x = torch.randn(3, 50, 64)
    lengths = [50, 33, 1]
    with torch.inference_mode():
        out = skut_layer(x.to(kernel_device()), torch.tensor(lengths, device=kernel_device()), layer).cpu()
        for row, n in enumerate(lengths):
            expected = layer(x[row:row + 1, :n], None, is_causal=True)[0]
            torch.testing.assert_close(out[row, :n], expected, rtol=0, atol=1e-5)
        assert skut_layer(x[:0], torch.zeros(0, dtype=torch.int64), layer).shape == (0, 50, 64)


def test_weights_are_converted_once_and_again_after_a_change():
    layer = _stack(1, 1).layers[0]
    dev = kernel_device()
    first = triton_encoder.kernel_weights(layer, dev, torch.float16)
    assert first[0].dtype == torch.float16 and first[0].device.type == torch.device(dev).type
    assert triton_encoder.kernel_weights(layer, dev, torch.float16) is first  # no copy on the next call
    x = torch.randn(2, 20, 64)
    lengths = torch.tensor([20, 7], device=dev)
    with torch.inference_mode():
        before = skut_layer(x.to(dev), lengths, layer).cpu()
    with torch.no_grad():
        layer.linear2.weight.mul_(3.0)  # an in-place update (an optimizer step, load_state_dict)
    assert triton_encoder.kernel_weights(layer, dev, torch.float16) is not first
    with torch.inference_mode():
        after = skut_layer(x.to(dev), lengths, layer).cpu()
        expected = layer(x[:1], None, is_causal=True)[0]
    assert not torch.allclose(before, after)
    torch.testing.assert_close(after[0], expected, rtol=0, atol=1e-5)


@pytest.mark.parametrize("variant", list(VARIANTS))
@settings(max_examples=4, deadline=None)
@given(n=st.integers(0, 5), n_tokens=st.integers(0, 30), seed=st.integers(0, 2**31))
def test_transact_encode_on_triton_matches_reference(variant, n, n_tokens, seed):
    assert_backend_matches_reference("triton", variant, n, n_tokens, seed)


@pytest.mark.parametrize("d, heads, ffn, message", [
    (64, 1, 24, "ffn_dim 24"), (64, 8, 32, "head width 8"), (48, 1, 32, "d_model 48")])
def test_unsupported_widths_are_config_errors(d, heads, ffn, message):
    with pytest.raises(ConfigError, match=message):
        check_supported(EncoderLayer(d, heads, ffn, 0.0))


def test_other_layer_kinds_are_config_errors():
    class PreNormLayer(EncoderLayer):
        pass

    with pytest.raises(ConfigError, match="post-norm EncoderLayers, got PreNormLayer"):
        check_supported(PreNormLayer(64, 1, 32, 0.0))
