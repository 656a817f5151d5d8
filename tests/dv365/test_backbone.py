"""The backbone simulation network: shapes, the DLRM interaction, the loss, the no-tower baseline."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from lifelong.core.errors import ConfigError
from lifelong.dv365.backbone import (
    N_DENSE,
    TASKS,
    BackboneConfig,
    BackboneOutput,
    BackboneSimulation,
    ExampleFeatures,
    backbone_loss,
)


def batch(n: int, groups: list[int]) -> ExampleFeatures:
    g = torch.Generator().manual_seed(n)
    sparse = torch.stack([torch.randint(0, 10**6, (n,), generator=g) for _ in range(3)]
                         + [torch.randint(0, 5, (n,), generator=g)], dim=1)
    return ExampleFeatures(torch.tensor(groups), torch.randn(n, N_DENSE, generator=g), sparse)


def test_output_shapes_and_interaction_width():
    net = BackboneSimulation((6, 4), BackboneConfig(emb_dim=8, user_vectors=3))
    out = net(torch.randn(2, 6, 4), batch(5, [0, 0, 1, 1, 1]))
    assert out.logits.shape == (5, len(TASKS)) and out.watch.shape == (5,)
    n_vectors = 1 + 4 + 3  # bottom MLP, item, author, topic, surface, user vectors
    assert net.top[0].in_features == 8 + n_vectors * (n_vectors - 1) // 2


def test_examples_of_one_user_read_that_users_tower_output():
    torch.manual_seed(0)
    net = BackboneSimulation((3, 2), BackboneConfig(emb_dim=4)).eval()
    user = torch.randn(2, 3, 2)
    b = batch(4, [0, 1, 0, 1])
    out = net(user, b)
    swapped = net(user.flip(0), ExampleFeatures(1 - b.group, b.dense, b.sparse))
    torch.testing.assert_close(out.logits, swapped.logits)
    changed = net(user + torch.tensor([[[0.0]], [[1.0]]]), b)
    moved = (changed.logits - out.logits).abs().sum(1) > 0
    assert moved.tolist() == [False, True, False, True]


def test_without_user_vectors_the_tower_is_ignored():
    net = BackboneSimulation((3, 2), BackboneConfig(emb_dim=4, user_vectors=0)).eval()
    b = batch(3, [0, 0, 0])
    assert net.user_proj is None
    torch.testing.assert_close(net(torch.zeros(1, 3, 2), b).logits, net(torch.ones(1, 3, 2), b).logits)


def test_loss_is_bce_sum_plus_alpha_mse():
    g = torch.Generator().manual_seed(1)
    out = BackboneOutput(torch.randn(6, 4, generator=g), torch.randn(6, generator=g))
    labels = (torch.rand(6, 4, generator=g) < 0.3).to(torch.uint8)
    watch = torch.rand(6, generator=g)
    loss, bce, mse = backbone_loss(out, labels, watch, watch_weight=0.7)
    want_bce = sum(F.binary_cross_entropy_with_logits(out.logits[:, k], labels[:, k].float()) for k in range(4))
    torch.testing.assert_close(bce, want_bce)
    torch.testing.assert_close(mse, ((out.watch - watch) ** 2).mean())
    torch.testing.assert_close(loss, want_bce + 0.7 * mse)


def test_training_steps_lower_the_loss():
    torch.manual_seed(0)
    net = BackboneSimulation((4, 3), BackboneConfig(emb_dim=8, hash_buckets=128))
    user = torch.randn(8, 4, 3)
    b = batch(64, [i % 8 for i in range(64)])
    # Labels that depend on the user only: the tower output must carry them.
    labels = (user[b.group, 0, :1] > 0).to(torch.uint8).expand(-1, 4)
    watch = user[b.group, 1, 0]
    opt = torch.optim.Adam(net.parameters(), lr=1e-2)
    losses = []
    for _ in range(60):
        loss, _, _ = backbone_loss(net(user, b), labels, watch, 0.5)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    assert losses[-1] < 0.3 * losses[0]


@pytest.mark.parametrize("kwargs, message", [({"user_vectors": -1}, "user_vectors"), ({"emb_dim": 0}, "emb_dim"),
                                             ({"watch_weight": -0.1}, "watch_weight")])
def test_bad_configs(kwargs, message):
    with pytest.raises(ConfigError, match=message):
        BackboneConfig(**kwargs)
