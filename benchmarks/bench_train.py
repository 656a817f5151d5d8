"""Training throughput of every ranker, side by side, on one synthetic batch shape.

Forward + backward + AdamW step at batch 512 with the default layout (|S_all| = 192), the
Next Action Loss added for the causal sequence models, as ``lifelong transact train`` does. Prints
examples/s (best and median of the timed steps) and the ratio to wide&deep.

    LIFELONG_QUIET=1 .venv/bin/python benchmarks/bench_train.py [--threads N] [--steps 8] [--precision bf16]

``--precision bf16`` runs the forward under bfloat16 autocast, as ``TrainConfig(precision="bf16")``
does (losses in float32).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from lifelong.core.precision import PRECISIONS, forward_precision  # noqa: E402
from lifelong.modules.heads import ranking_loss  # noqa: E402
from lifelong.transact.nal import next_action_loss  # noqa: E402
from lifelong.transact.registry import MODEL_NAMES, build_model  # noqa: E402
from tests.transact.fixtures import random_batch  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--batch", type=int, default=512)
    parser.add_argument("--precision", default="fp32", choices=PRECISIONS)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    batch = random_batch(args.batch, seed=0, n_items=100_000, n_users=128, n_neg=32)
    print(f"torch threads {args.threads}, batch {args.batch}, |S_all| {batch.seq_item.shape[1]}, {args.precision}")
    print(f"{'model':12s} {'params':>8s} {'best ex/s':>10s} {'median ex/s':>12s} {'vs wide&deep':>13s}")
    base = None
    for name in MODEL_NAMES:
        torch.manual_seed(0)
        model = build_model(name).train()
        opt = torch.optim.AdamW(model.parameters(), 1e-3)

        def step() -> None:
            with forward_precision(args.precision):
                out = model(batch)
            loss = ranking_loss(out.logits.float(), batch.labels)
            if out.rt_states is not None:
                loss = loss + 0.01 * next_action_loss(out.rt_states.float(), batch)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()

        step()
        walls = []
        for _ in range(args.steps):
            t = time.perf_counter()
            step()
            walls.append(time.perf_counter() - t)
        best, median = args.batch / min(walls), args.batch / statistics.median(walls)
        base = base or median
        params = sum(p.numel() for p in model.parameters())
        print(f"{name:12s} {params / 1e6:7.2f}M {best:10,.0f} {median:12,.0f} {median / base:12.3f}x", flush=True)


if __name__ == "__main__":
    main()
