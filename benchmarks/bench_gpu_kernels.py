"""Triton kernels vs PyTorch on a GPU: the TransAct V2 paper's grids (§4.4.3), side by side.

1. **SKUT vs PyTorch's encoder**: TransAct V2's 2-layer encoder (d_model 64, one head, FFN 32,
   random weights, eval) over ``(B, L, 64)`` fp16 rows with ragged lengths (uniform in
   ``[1, L]``, real tokens first) under the causal + padding mask. PyTorch runs
   :class:`~lifelong.modules.layers.TransformerEncoder` (an additive ``(B, 1, L, L)`` mask) with
   SDPA restricted to its memory-efficient kernel; SKUT runs
   :func:`~lifelong.ops.triton_encoder.skut_encode` (two launches). Grids: L = 64..2048 at
   B = 256, and B = 16..2048 at L = 192. Columns: median latency and the peak memory the call
   allocates above what was already allocated, each with SKUT's change (the paper reports
   -85% latency at B = 256, L = 192), and the largest |difference| at real positions.
2. **Fused vs unfused NN search**: one user with L int8 tokens (d = 32), N candidates, k = 64.
   Unfused is :func:`unfused_nn_search`, the ops of :func:`~lifelong.ops.nn_search_naive` on
   the GPU (a sequence copy per candidate, then separate dequantize, normalise, batched dot and
   ``torch.topk``); fused is the ``triton`` backend of :func:`~lifelong.ops.nn_search` (one
   kernel over the de-duplicated sequence). "Same tokens" compares the chosen positions
   (random tokens: no exact ties). The paper's mark (-20%) is for the whole model's latency;
   this grid times the op alone.

Latency: CUDA events, median of ``--repeats`` after warm-up. Prints the device, torch and triton
versions and markdown tables.

``--dry-run`` runs every grid's code path at tiny shapes on the CPU through the Triton
interpreter (``TRITON_INTERPRET=1``, set here before the kernels are imported) and PyTorch's
default CPU attention: a smoke check that the script still works, not a speed figure (the
interpreter is orders of magnitude slower than compiled kernels; memory is not measured).

    .venv/bin/python benchmarks/bench_gpu_kernels.py [--repeats 20] [--dtype float16]
    .venv/bin/python benchmarks/bench_gpu_kernels.py --dry-run
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import os
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch

from lifelong.bench.machine import cpu_model
from lifelong.core.quantization import dequantize_int8
from lifelong.data.schema import EMBED_DIM
from lifelong.modules.layers import TransformerEncoder, causal_attention_mask
from lifelong.ops.nn_select import l2_normalize


@dataclass(frozen=True)
class Grid:
    """The shapes one run sweeps."""

    lengths_at_batch: tuple[int, ...]
    batch_for_lengths: int
    batches_at_length: tuple[int, ...]
    length_for_batches: int
    nn_lengths: tuple[int, ...]
    nn_candidates: tuple[int, ...]
    nn_k: int


PAPER = Grid(lengths_at_batch=(64, 128, 192, 256, 512, 1024, 2048), batch_for_lengths=256,
             batches_at_length=(16, 32, 64, 128, 256, 512, 1024, 2048), length_for_batches=192,
             nn_lengths=(1_000, 10_000), nn_candidates=(100, 500, 1_000), nn_k=64)
DRY_RUN = Grid(lengths_at_batch=(16, 40), batch_for_lengths=3, batches_at_length=(1, 4), length_for_batches=24,
               nn_lengths=(40,), nn_candidates=(3, 20), nn_k=4)


class Clock:
    """Median latency (ms) and peak extra memory (MB) of a call: CUDA events on a GPU, else wall time."""

    def __init__(self, device: torch.device, repeats: int):
        self.cuda = device.type == "cuda"
        self.repeats = repeats

    def time(self, fn: Callable[[], Any]) -> tuple[float, float | None, Any]:
        out = fn()  # warm-up: compilation, autotuning-free kernel selection, allocator growth
        times = []
        for _ in range(self.repeats):
            if self.cuda:
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                fn()
                end.record()
                torch.cuda.synchronize()
                times.append(start.elapsed_time(end))
            else:
                t0 = time.perf_counter()
                fn()
                times.append(1e3 * (time.perf_counter() - t0))
        return statistics.median(times), self._peak_mb(fn), out

    def _peak_mb(self, fn: Callable[[], Any]) -> float | None:
        if not self.cuda:
            return None
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        fn()
        torch.cuda.synchronize()
        return (torch.cuda.max_memory_allocated() - before) / 2**20


@contextlib.contextmanager
def efficient_sdpa(device: torch.device) -> Iterator[str]:
    """SDPA limited to the memory-efficient kernel on CUDA; PyTorch's default choice on the CPU."""
    if device.type != "cuda":
        yield "default (CPU)"
        return
    from torch.nn.attention import SDPBackend, sdpa_kernel

    with sdpa_kernel(SDPBackend.EFFICIENT_ATTENTION):
        yield "memory-efficient"


def _change(new: float | None, old: float | None) -> str:
    return "n/a" if new is None or old is None else f"{100 * (new / old - 1):+.0f}%"


def _mb(x: float | None) -> str:
    return "n/a" if x is None else f"{x:,.1f}"


def encoder_rows(grid: Grid, device: torch.device, dtype: torch.dtype, clock: Clock) -> list[dict[str, Any]]:
    """SKUT vs the PyTorch encoder over both sweeps."""
    skut_encode = importlib.import_module("lifelong.ops.triton_encoder").skut_encode
    torch.manual_seed(0)
    encoder = TransformerEncoder(2 * EMBED_DIM, n_layers=2, n_heads=1, ffn_dim=32, dropout=0.0).eval()
    encoder = encoder.to(device, dtype)
    shapes = ([("L", grid.batch_for_lengths, length) for length in grid.lengths_at_batch]
              + [("B", batch, grid.length_for_batches) for batch in grid.batches_at_length])
    rows = []
    for sweep, batch, length in shapes:
        g = torch.Generator().manual_seed(batch * 10_007 + length)
        x = torch.randn(batch, length, 2 * EMBED_DIM, generator=g).to(device, dtype)
        lengths = torch.randint(1, length + 1, (batch,), generator=g).to(device)
        valid = torch.arange(length, device=device) < lengths[:, None]
        allowed = causal_attention_mask(valid)
        with torch.inference_mode(), efficient_sdpa(device) as sdpa:
            torch_ms, torch_mb, ref = clock.time(lambda: encoder(x, allowed))
            skut_ms, skut_mb, out = clock.time(lambda: skut_encode(x, lengths, encoder.layers))
        rows.append({"sweep": sweep, "B": batch, "L": length, "sdpa": sdpa, "torch_ms": torch_ms,
                     "skut_ms": skut_ms, "torch_mb": torch_mb, "skut_mb": skut_mb,
                     "max_diff": float((out.float() - ref.float())[valid].abs().max())})
    return rows


def unfused_nn_search(values: torch.Tensor, starts: torch.Tensor, lengths: torch.Tensor, cand_user: torch.Tensor,
                      cand: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The baseline's separate ops on any device: positions and scores ``(N, min(k, L))``.

    :func:`~lifelong.ops.nn_search_naive` builds its index and outputs on the CPU, and breaks
    ties exactly; a GPU server without fusion runs these ops instead.
    """
    seg = lengths[cand_user]
    offsets = torch.arange(int(seg.max()), device=values.device)
    valid = offsets < seg[:, None]
    copies = values[torch.where(valid, starts[cand_user][:, None] + offsets, 0)]  # (N, L, d) int8
    tokens = l2_normalize(dequantize_int8(copies))
    s = torch.bmm(tokens, cand.unsqueeze(-1)).squeeze(-1).masked_fill(~valid, float("-inf"))
    scores, positions = torch.topk(s, min(k, s.shape[1]))
    return positions, scores


def nn_rows(grid: Grid, device: torch.device, clock: Clock) -> list[dict[str, Any]]:
    """Fused (triton) vs unfused NN search, one user per request."""
    from lifelong.ops import nn_search

    rows = []
    g = torch.Generator().manual_seed(0)
    for length in grid.nn_lengths:
        values = torch.randint(-127, 128, (length, EMBED_DIM), generator=g).to(torch.int8)
        for n in grid.nn_candidates:
            cand = l2_normalize(dequantize_int8(torch.randint(-127, 128, (n, EMBED_DIM), generator=g)))
            args = [t.to(device) for t in (values, torch.tensor([0]), torch.tensor([length]),
                                           torch.zeros(n, dtype=torch.int64), cand)]
            with torch.inference_mode():
                naive_ms, naive_mb, naive = clock.time(lambda: unfused_nn_search(*args, grid.nn_k))
                fused_ms, fused_mb, fused = clock.time(lambda: nn_search(*args, grid.nn_k, backend="triton"))
            rows.append({"L": length, "N": n, "k": grid.nn_k, "naive_ms": naive_ms, "fused_ms": fused_ms,
                         "naive_mb": naive_mb, "fused_mb": fused_mb,
                         "same_tokens": bool(torch.equal(naive[0], fused[0])),
                         "max_diff": float((naive[1] - fused[1]).nan_to_num().abs().max())})
    return rows


def render_encoder(rows: list[dict[str, Any]], sweep: str) -> str:
    lines = ["| B | L | PyTorch ms | SKUT ms | latency change | PyTorch MB | SKUT MB | memory change | max abs diff |",
             "|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        if r["sweep"] == sweep:
            lines.append(f"| {r['B']:,} | {r['L']:,} | {r['torch_ms']:.3f} | {r['skut_ms']:.3f} | "
                         f"{_change(r['skut_ms'], r['torch_ms'])} | {_mb(r['torch_mb'])} | {_mb(r['skut_mb'])} | "
                         f"{_change(r['skut_mb'], r['torch_mb'])} | {r['max_diff']:.1e} |")
    return "\n".join(lines)


def render_nn(rows: list[dict[str, Any]]) -> str:
    lines = ["| L | N | k | unfused ms | fused ms | latency change | unfused MB | fused MB | same tokens "
             "| max abs diff |", "|---:|---:|---:|---:|---:|---:|---:|---:|:---:|---:|"]
    for r in rows:
        lines.append(f"| {r['L']:,} | {r['N']:,} | {r['k']} | {r['naive_ms']:.3f} | {r['fused_ms']:.3f} | "
                     f"{_change(r['fused_ms'], r['naive_ms'])} | {_mb(r['naive_mb'])} | {_mb(r['fused_mb'])} | "
                     f"{'yes' if r['same_tokens'] else 'no'} | {r['max_diff']:.1e} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dry-run", action="store_true",
                        help="tiny shapes on the CPU through the Triton interpreter (a smoke check, "
                             "not a speed figure)")
    parser.add_argument("--repeats", type=int, default=20, help="timed calls per shape (after one warm-up)")
    parser.add_argument("--dtype", choices=("float16", "float32"), default="float16", help="encoder dtype")
    args = parser.parse_args(argv)
    cuda = torch.cuda.is_available()
    if args.dry_run and not cuda:
        if "triton" in sys.modules and os.environ.get("TRITON_INTERPRET") != "1":
            parser.error("--dry-run without CUDA needs TRITON_INTERPRET=1 before triton is imported")
        os.environ["TRITON_INTERPRET"] = "1"
    elif not cuda:
        parser.error("no CUDA device: the GPU grids need one (use --dry-run for the CPU smoke check)")
    try:
        importlib.import_module("triton")
    except ImportError:
        parser.error("triton is not installed (pip install -e '.[gpu]')")
    import triton

    grid, repeats = (DRY_RUN, 1) if args.dry_run else (PAPER, args.repeats)
    device = torch.device("cuda") if cuda else torch.device("cpu")
    clock = Clock(device, repeats)
    where = torch.cuda.get_device_name() if cuda else f"CPU ({cpu_model()}, nproc {os.cpu_count()}), Triton interpreter"
    print(f"# GPU kernels{' (DRY RUN: tiny shapes, not a speed figure)' if args.dry_run else ''}")
    print(f"device: {where}; torch {torch.__version__}, triton {triton.__version__}; encoder {args.dtype}; "
          f"median of {repeats}\n")
    enc = encoder_rows(grid, device, getattr(torch, args.dtype), clock)
    print(f"## SKUT vs PyTorch encoder ({enc[0]['sdpa']} SDPA), sequence length at B = {grid.batch_for_lengths}\n")
    print(render_encoder(enc, "L"))
    print(f"\n## SKUT vs PyTorch encoder, batch at L = {grid.length_for_batches}\n")
    print(render_encoder(enc, "B"))
    print("\n## NN search: fused (triton) vs unfused\n")
    print(render_nn(nn_rows(grid, device, clock)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
