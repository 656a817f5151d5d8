"""Building blocks shared by the rankers: id features, token embeddings, encoder, crossing, MLP.

The transformer encoder is written out (rather than ``nn.TransformerEncoder``) so that the
attention mask is one explicit per-row boolean tensor and the serving kernels have a plain
reference to agree with. Its parameter names follow ``nn.TransformerEncoderLayer``
(``self_attn.in_proj``/``out_proj``, ``linear1``/``linear2``, ``norm1``/``norm2``, post-norm,
ReLU) so that weights map one to one.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from lifelong.data.schema import KNOWN_ACTION_BITS, SURFACES

N_ACTION_BITS = KNOWN_ACTION_BITS.bit_length()


class HashedEmbedding(nn.Embedding):
    """An embedding table indexed by ``id mod num_embeddings`` (any int64 id, negatives too).

    Example::

        >>> out = HashedEmbedding(8, 4)(torch.tensor([3, 11, -5]))
        >>> bool((out[0] == out[1]).all() and (out[0] == out[2]).all())
        True
    """

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return super().forward(torch.remainder(ids, self.num_embeddings))


def action_bits(mask: torch.Tensor) -> torch.Tensor:
    """The action bitmask (any shape, int64) as a float multi-hot vector over the known bits."""
    shifts = torch.arange(N_ACTION_BITS, device=mask.device)
    return ((mask.unsqueeze(-1) >> shifts) & 1).to(torch.float32)


class ActionEmbedding(nn.Module):
    """Sum of one learned vector per set action bit (a multi-hot token may carry several).

    No bias, so a padding token (mask 0) embeds to exactly zero.

    Example::

        >>> emb = ActionEmbedding(4)
        >>> bool(torch.allclose(emb(torch.tensor([6])), emb(torch.tensor([2])) + emb(torch.tensor([4]))))
        True
    """

    def __init__(self, dim: int):
        super().__init__()
        self.proj = nn.Linear(N_ACTION_BITS, dim, bias=False)

    def forward(self, mask: torch.Tensor) -> torch.Tensor:
        return self.proj(action_bits(mask))


class TokenContext(nn.Module):
    """``E_act + E_surf + E_pos`` of each token, added to the token's content vector.

    Args:
        dim: width of the token vectors.
        n_positions: sequence length (one learned position vector each).
    """

    def __init__(self, dim: int, n_positions: int):
        super().__init__()
        self.action = ActionEmbedding(dim)
        self.surface = HashedEmbedding(len(SURFACES), dim)
        self.position = nn.Parameter(torch.randn(n_positions, dim) * 0.02)
        # Default inits (unit-variance surface rows, norm ~8) would drown the unit-norm item
        # embedding the token carries; starting small lets content drive attention from step one
        # (+0.03 HIT@3/repin for TransAct on the small world after two epochs, 3 seeds).
        nn.init.normal_(self.surface.weight, std=0.02)
        nn.init.normal_(self.action.proj.weight, std=0.02)

    def forward(self, action: torch.Tensor, surface: torch.Tensor) -> torch.Tensor:
        return self.action(action) + self.surface(surface) + self.position


class MLP(nn.Sequential):
    """Linear + ReLU (+ dropout) per hidden width; ``out_dim`` is the last width.

    Example::

        >>> MLP(8, (16, 4))(torch.zeros(2, 8)).shape
        torch.Size([2, 4])
    """

    def __init__(self, in_dim: int, dims: Sequence[int], dropout: float = 0.0):
        layers: list[nn.Module] = []
        for d in dims:
            layers += [nn.Linear(in_dim, d), nn.ReLU()]
            if dropout > 0:
                layers.append(nn.Dropout(dropout))
            in_dim = d
        super().__init__(*layers)
        self.out_dim = in_dim


class CrossNetwork(nn.Module):
    """DCN-v2 cross network with full-rank weights: ``x_{l+1} = x_0 * (W_l x_l + b_l) + x_l``.

    Args:
        dim: input (and output) width.
        n_layers: number of cross layers; 0 is the identity.

    Example::

        >>> CrossNetwork(6, 2)(torch.ones(3, 6)).shape
        torch.Size([3, 6])
    """

    def __init__(self, dim: int, n_layers: int):
        super().__init__()
        self.layers = nn.ModuleList(nn.Linear(dim, dim) for _ in range(n_layers))
        for layer in self.layers:
            # Starting near the identity (x_{l+1} ~ x_l) keeps early training as stable as the MLP alone.
            nn.init.normal_(layer.weight, std=0.01)
            nn.init.zeros_(layer.bias)

    def forward(self, x0: torch.Tensor) -> torch.Tensor:
        x = x0
        for layer in self.layers:
            x = x0 * layer(x) + x
        return x


class CrossHead(nn.Module):
    """Cross network, then MLP, then one logit per ranking head (stacked DCN-v2).

    Args:
        in_dim: width of the concatenated features.
        cross_layers: DCN-v2 cross layers.
        mlp_dims: hidden widths of the MLP.
        n_heads: number of logits.
        dropout: dropout after each MLP layer.
    """

    def __init__(self, in_dim: int, cross_layers: int, mlp_dims: Sequence[int], n_heads: int,
                 dropout: float = 0.0):
        super().__init__()
        self.cross = CrossNetwork(in_dim, cross_layers)
        self.mlp = MLP(in_dim, mlp_dims, dropout)
        self.out = nn.Linear(self.mlp.out_dim, n_heads)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(self.mlp(self.cross(x)))


def causal_attention_mask(valid: torch.Tensor) -> torch.Tensor:
    """(B, S, S) bool, True where query i may attend key j: j <= i and j is a real token.

    Every position may also attend to itself, so no query row is empty (an empty row would
    make softmax produce NaN); a padding query only ever sees itself and earlier real tokens,
    and no real query sees a padding key.
    """
    s = valid.shape[-1]
    eye = torch.eye(s, dtype=torch.bool, device=valid.device)
    causal = torch.ones(s, s, dtype=torch.bool, device=valid.device).tril()
    return (causal & valid.unsqueeze(-2)) | eye


def attention_bias(allowed: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The additive form of a boolean attention mask: 0 where allowed, -inf elsewhere.

    Example::

        >>> attention_bias(torch.tensor([[True, False]])).tolist()
        [[0.0, -inf]]
    """
    return torch.zeros(allowed.shape, dtype=dtype, device=allowed.device).masked_fill_(~allowed, float("-inf"))


def padding_attention_mask(valid: torch.Tensor) -> torch.Tensor:
    """(B, S, S) bool for bidirectional attention: any real key, plus the query itself."""
    s = valid.shape[-1]
    eye = torch.eye(s, dtype=torch.bool, device=valid.device)
    return valid.unsqueeze(-2).expand(-1, s, -1) | eye


class SelfAttention(nn.Module):
    """Multi-head self-attention under an additive mask (0 = may attend, -inf = may not).

    No dropout on the attention probabilities: on CPU, sampling a (B, S, S) mask per layer
    costs about as much as the attention itself.
    """

    def __init__(self, dim: int, n_heads: int):
        super().__init__()
        self.n_heads = n_heads
        self.in_proj = nn.Linear(dim, 3 * dim)
        self.out_proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, attn_bias: torch.Tensor | None, is_causal: bool = False) -> torch.Tensor:
        b, s, d = x.shape
        # Three projections from slices of one weight give contiguous q, k, v; slicing one
        # (B, S, 3d) output would make the attention kernel copy them.
        w, bias = self.in_proj.weight.chunk(3), self.in_proj.bias.chunk(3)
        q, k, v = (F.linear(x, w[i], bias[i]).view(b, s, self.n_heads, -1).transpose(1, 2) for i in range(3))
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_bias, is_causal=is_causal)
        return self.out_proj(out.transpose(1, 2).reshape(b, s, d))


class EncoderLayer(nn.Module):
    """Post-norm transformer layer with ReLU feed-forward, as ``nn.TransformerEncoderLayer``."""

    def __init__(self, dim: int, n_heads: int, ffn_dim: int, dropout: float):
        super().__init__()
        self.self_attn = SelfAttention(dim, n_heads)
        self.linear1 = nn.Linear(dim, ffn_dim)
        self.linear2 = nn.Linear(ffn_dim, dim)
        self.norm1 = nn.LayerNorm(dim)
        self.norm2 = nn.LayerNorm(dim)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    def forward(self, x: torch.Tensor, attn_bias: torch.Tensor | None, is_causal: bool = False) -> torch.Tensor:
        """``attn_bias`` (B, 1, S, S) additive mask, or None with ``is_causal`` for a plain causal one."""
        x = self.norm1(x + self.dropout(self.self_attn(x, attn_bias, is_causal)))
        return self.norm2(x + self.dropout(self.linear2(self.dropout(F.relu(self.linear1(x))))))


class TransformerEncoder(nn.Module):
    """A stack of :class:`EncoderLayer` sharing one attention mask.

    Args:
        dim: token width (d_model).
        n_layers, n_heads, ffn_dim, dropout: as in ``nn.TransformerEncoder``; dropout applies
            to the residual branches and the feed-forward hidden layer.

    Example::

        >>> enc = TransformerEncoder(8, n_layers=2, n_heads=1, ffn_dim=4, dropout=0.0)
        >>> valid = torch.tensor([[True, False, True]])
        >>> enc(torch.randn(1, 3, 8), causal_attention_mask(valid)).shape
        torch.Size([1, 3, 8])
    """

    def __init__(self, dim: int, n_layers: int, n_heads: int, ffn_dim: int, dropout: float):
        super().__init__()
        self.layers = nn.ModuleList(EncoderLayer(dim, n_heads, ffn_dim, dropout) for _ in range(n_layers))

    def forward(self, x: torch.Tensor, allowed: torch.Tensor) -> torch.Tensor:
        """Encode (B, S, d) tokens; ``allowed`` (B, S, S) is True where query i may attend key j."""
        # One additive mask for all layers: the kernel would otherwise convert the boolean mask
        # in every layer's forward and backward.
        attn_bias = attention_bias(allowed, x.dtype).unsqueeze(1)
        for layer in self.layers:
            x = layer(x, attn_bias)
        return x


def masked_max_pool(x: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Max over the real tokens of each row (B, S, D) -> (B, D); a row without any gives zeros.

    Example::

        >>> x = torch.tensor([[[1.0], [9.0]], [[2.0], [3.0]]])
        >>> masked_max_pool(x, torch.tensor([[True, False], [False, False]])).flatten().tolist()
        [1.0, 0.0]
    """
    pooled = x.masked_fill(~valid.unsqueeze(-1), float("-inf")).amax(dim=1)
    return torch.where(valid.any(dim=1, keepdim=True), pooled, torch.zeros_like(pooled))


def masked_mean_pool(x: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Mean over the real tokens of each row (B, S, D) -> (B, D); a row without any gives zeros."""
    w = valid.unsqueeze(-1).to(x.dtype)
    return (x * w).sum(dim=1) / w.sum(dim=1).clamp_min(1.0)
