"""One-shot GPU suite: every figure that needs a GPU, in one run, as one markdown table.

``benchmarks/gpu_suite.sh`` runs it (docs/benchmarks.md, "One-shot GPU suite"). Sections:

a. **SKUT vs PyTorch's encoder** over the paper's sequence grid (B = 256, L = 64..2048, fp16,
   ragged rows; TransAct V2 Tables 5 and 8): latency and peak memory, through
   ``bench_gpu_kernels.encoder_rows`` (PyTorch's SDPA limited to its memory-efficient kernel).
b. **Fused int8 NN search vs unfused** (L in {10^3, 10^4}, N in {100, 500, 1000}, k = 64),
   through ``bench_gpu_kernels.nn_rows``.
c. **Serving, naive vs optimized, model on the GPU** (the paper's Figure 7): ``Ranker.rank``
   of one batch (4 users of a ``bench`` world, LL = 10^4, |S_all| = 192, random TransAct V2
   weights) on both paths, with the model on the GPU behind :class:`OnDevice`. Naive: per
   request, a copy of the user's sequence per candidate for the NN search (host), then the
   request's gathered rows (a copy of ``S_all`` per candidate) to the GPU. Optimized: the
   batch's de-duplicated token table in the pinned arena, the ``triton`` NN search and SKUT,
   and the compact token table with its index to the GPU. Figures: ms per batch and the bytes
   copied host to device per batch (:class:`HostToDevice`, counted in a separate, untimed call).
d. **Training throughput**: TransAct V2 forward + backward + AdamW at batch 512, the Next
   Action Loss added, as ``benchmarks/bench_train.py`` steps it on the CPU.

Parity: each kernel's outputs against its PyTorch reference, a stated tolerance per kernel
(:data:`TOLERANCE`): SKUT's largest difference at real positions from the fp16 PyTorch encoder;
the NN search's largest score difference from the unfused ops (its top-k, in order); serving's
99th percentile, over candidates, of the probability difference between the optimized and the
naive path (a near-tie in the NN search, within float rounding, may pick another token of the
same score on the GPU, so the largest difference is reported but not bounded). Any failure is
named on stderr and the exit status is 1. The figures are written to ``--out`` either way.

``--dry-run`` runs every section at tiny shapes on the CPU (the Triton kernels in the
interpreter, ``TRITON_INTERPRET=1`` set before triton is imported; a tiny world), writing the
table marked as a dry run: a smoke check of the code paths, not figures. Without triton the
kernel sections are reported as skipped there. Without CUDA and without ``--dry-run`` it says
so in one line and exits 2.

``LIFELONG_GPU_SUITE_BREAK=skut`` (or ``nn_search``) is for the suite's own test: that kernel's
outputs are perturbed wherever it runs, and the parity check must fail.

    benchmarks/gpu_suite.sh [--out gpu_suite.md] [--sections abcd] [--repeats 20]
    benchmarks/gpu_suite.sh --dry-run --out /tmp/gpu_suite.md
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import os
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

sys.path[:0] = [str(Path(__file__).resolve().parents[1]), str(Path(__file__).resolve().parent)]
import bench_gpu_kernels as kernels  # noqa: E402

from lifelong.bench.machine import cpu_model  # noqa: E402
from lifelong.bench.serve import eval_requests  # noqa: E402
from lifelong.data.schema import SURFACE_CODES  # noqa: E402
from lifelong.data.world import load_config, simulate_to  # noqa: E402
from lifelong.modules.heads import ranking_loss  # noqa: E402
from lifelong.ops.dispatch import triton_unavailable_reason  # noqa: E402
from lifelong.serving.ranking import RankRequest  # noqa: E402
from lifelong.store.feature_store import load_store, open_store  # noqa: E402
from lifelong.transact.nal import next_action_loss  # noqa: E402
from lifelong.transact.registry import build_model  # noqa: E402
from lifelong.transact.sequence_layout import SequenceLayout  # noqa: E402
from lifelong.transact.serving import PATHS, Ranker  # noqa: E402
from lifelong.transact.training_rows import BuildConfig, build_rows  # noqa: E402
from tests.transact.fixtures import random_batch  # noqa: E402

BREAK_ENV = "LIFELONG_GPU_SUITE_BREAK"
SECTIONS = {"a": "a. encoder: PyTorch (memory-efficient SDPA) → SKUT",
            "b": "b. NN search: unfused → fused int8 kernel",
            "c": "c. serving, Ranker.rank: naive → optimized (model on the device)",
            "d": "d. training: TransAct V2 + NAL, forward + backward + AdamW"}
TOLERANCE = {"skut": 5e-2, "nn_search": 1e-4, "serving": 1e-4}
"""Parity bounds. SKUT: both sides fp16 (a unit in the last place of a layer-normed output near 4
is 4e-3, and the two round differently over two layers); a broken kernel is off by O(1). NN
search: float32 scores of unit vectors. Serving: float32 probabilities (SKUT runs fp32 there)."""


@dataclass(frozen=True)
class Sizes:
    """What one run measures."""

    grid: kernels.Grid  # sections a and b
    repeats: int  # timed calls per kernel shape
    world: tuple[str, tuple[str, ...]]  # preset and overrides of the served world
    build: BuildConfig
    requests: int  # requests (distinct users) in the served batch
    candidates: tuple[int, ...]  # candidates per request, one batch each
    serve_repeats: int
    train_batch: int
    train_steps: int


FULL = Sizes(grid=dataclasses.replace(kernels.PAPER, batches_at_length=()), repeats=20,
             world=("bench", ("users.n_users=8", "items.n_items=20000")), build=BuildConfig(protocol_days=(1, 0, 1)),
             requests=4, candidates=(100, 500), serve_repeats=3, train_batch=512, train_steps=20)
DRY_RUN = Sizes(grid=dataclasses.replace(kernels.DRY_RUN, batches_at_length=()), repeats=1,
                world=("tiny", ("users.n_users=12",)),
                build=BuildConfig(layout=SequenceLayout(ll_nn=8, rt=8, rt_nn=4, imp_nn=4), ll_cap=40, imp_cap=10,
                                  nal_negatives=6),
                requests=3, candidates=(5,), serve_repeats=1, train_batch=8, train_steps=1)


@dataclass(frozen=True)
class Parity:
    """One kernel's agreement with its reference: ``value`` (the bounded statistic) against ``tolerance``."""

    kernel: str
    value: float
    tolerance: float
    detail: str = ""

    @property
    def ok(self) -> bool:
        return self.value <= self.tolerance  # NaN fails too

    def cell(self) -> str:
        verdict = "ok" if self.ok else "**FAIL**"
        return f"{self.value:.1e} ≤ {self.tolerance:.0e} {verdict}{f' ({self.detail})' if self.detail else ''}"


@dataclass(frozen=True)
class Row:
    """One line of the table: one figure of one shape, baseline and new side by side."""

    section: str
    shape: str
    figure: str
    baseline: float | None
    new: float | None
    parity: Parity | None = None
    fmt: str = ",.3f"

    def cells(self) -> list[str]:
        def num(x: float | None) -> str:
            return "n/a" if x is None else format(x, self.fmt)

        change = "" if self.baseline is None or self.new is None or self.baseline == 0 else \
            f"{100 * (self.new / self.baseline - 1):+.0f}%"
        return [self.section, self.shape, self.figure, num(self.baseline), num(self.new), change,
                "n/a" if self.parity is None else self.parity.cell()]


# -- a, b: the kernels, through bench_gpu_kernels ------------------------------------------------


def encoder_section(sizes: Sizes, device: torch.device, clock: kernels.Clock) -> list[Row]:
    name = SECTIONS["a"]
    rows = []
    for r in kernels.encoder_rows(sizes.grid, device, torch.float16, clock):
        shape = f"B {r['B']:,}, L {r['L']:,}, fp16"
        rows.append(Row(name, shape, "latency ms", r["torch_ms"], r["skut_ms"],
                        Parity("skut", r["max_diff"], TOLERANCE["skut"])))
        if r["torch_mb"] is not None:  # measured on a GPU only
            rows.append(Row(name, shape, "peak memory MB", r["torch_mb"], r["skut_mb"], fmt=",.1f"))
    return rows


def nn_section(sizes: Sizes, device: torch.device, clock: kernels.Clock) -> list[Row]:
    name = SECTIONS["b"]
    rows = []
    for r in kernels.nn_rows(sizes.grid, device, clock):
        shape = f"L {r['L']:,}, N {r['N']:,}, k {r['k']}"
        same = "same tokens" if r["same_tokens"] else "other tokens at equal scores"
        rows.append(Row(name, shape, "latency ms", r["naive_ms"], r["fused_ms"],
                        Parity("nn_search", r["max_diff"], TOLERANCE["nn_search"], same)))
        if r["naive_mb"] is not None:
            rows.append(Row(name, shape, "peak memory MB", r["naive_mb"], r["fused_mb"], fmt=",.1f"))
    return rows


# -- c: serving ------------------------------------------------------------------------------------


class OnDevice(nn.Module):
    """A ranker's model on ``device`` behind :class:`~lifelong.transact.serving.Ranker`, which
    assembles its inputs on the host: each call copies them there and the logits back.

    ``forward`` takes the naive path's gathered rows; ``score_token_table`` the optimized path's
    token table. The Ranker reads ``cfg`` and ``abilities`` of the model it serves.
    """

    def __init__(self, model: nn.Module, device: torch.device):
        super().__init__()
        self.inner = model.to(device).eval()
        self.device = device

    @property
    def cfg(self) -> Any:
        return self.inner.cfg

    @property
    def abilities(self) -> Any:
        return self.inner.abilities

    def forward(self, batch: Any) -> Any:
        out = self.inner(batch.to(self.device))
        return dataclasses.replace(out, logits=out.logits.cpu())

    def score_token_table(self, tok_emb: torch.Tensor, tok_action: torch.Tensor, tok_surface: torch.Tensor,
                          tok_index: torch.Tensor, cand_emb: torch.Tensor, rows: Any,
                          backend: str | None = None) -> torch.Tensor:
        to = partial(torch.Tensor.to, device=self.device)
        rows = dataclasses.replace(rows, ids=to(rows.ids), cand_emb=to(rows.cand_emb))
        return self.inner.score_token_table(to(tok_emb), to(tok_action), to(tok_surface), to(tok_index),
                                            to(cand_emb), rows, backend=backend).cpu()


class HostToDevice(TorchDispatchMode):
    """Counts the bytes of every copy from host memory to a ``device`` tensor while active
    (``Tensor.to``, ``.cuda()``, ``copy_``), whoever makes it. It runs Python per op: a
    measuring pass of its own, never timed.

    Example::

        >>> with HostToDevice(torch.device("meta")) as h2d:
        ...     _ = torch.ones(10).to("meta")
        >>> h2d.bytes
        40
    """

    def __init__(self, device: torch.device):
        super().__init__()
        self.device_type = device.type
        self.bytes = 0

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        out = func(*args, **(kwargs or {}))
        if func in (torch.ops.aten._to_copy.default, torch.ops.aten.copy_.default):
            src = args[1] if func is torch.ops.aten.copy_.default else args[0]
            if src.device.type == "cpu" and out.device.type == self.device_type != "cpu":
                self.bytes += src.numel() * src.element_size()
        return out


def serving_section(sizes: Sizes, device: torch.device, backend: str) -> list[Row]:
    """Both paths over one store (a world built, its rows and its store loaded in a temporary directory)."""
    with tempfile.TemporaryDirectory(prefix="gpu_suite_") as tmp:
        root = Path(tmp)
        preset, overrides = sizes.world
        simulate_to(load_config(preset, overrides=list(overrides)), root / "world")
        build_rows(root / "world", root / "ds", sizes.build)
        url = f"lmdb://{root / 'store'}"
        load_store(root / "ds", url, progress=False)
        first: dict[int, dict] = {}
        for body in eval_requests(root / "ds"):
            first.setdefault(body["user_id"], body)
        with open_store(url) as store:
            return _serve(sizes, device, backend, store, list(first.values())[:sizes.requests])


def _serve(sizes: Sizes, device: torch.device, backend: str, store: Any, chosen: list[dict]) -> list[Row]:
    torch.manual_seed(0)
    model = OnDevice(build_model("transact_v2", layout=sizes.build.layout), device)
    rankers = {path: Ranker(model, store, path=path, backend=backend) for path in PATHS}
    clock = kernels.Clock(device, sizes.serve_repeats)
    rows = []
    for n in sizes.candidates:
        ids = np.random.default_rng(n).choice(rankers["optimized"].items.item_id, n, replace=False)
        ms, peak, moved, results = {}, {}, {}, {}
        for path, ranker in rankers.items():
            requests = [RankRequest(b["user_id"], ranker.item_rows(ids)[0], SURFACE_CODES[b["surface"]],
                                    b["request_time"]) for b in chosen]
            ms[path], peak[path], results[path] = clock.time(partial(ranker.rank, requests))
            with HostToDevice(device) as h2d:
                ranker.rank(requests)
            moved[path] = h2d.bytes / 1e6
        diff = np.concatenate([np.abs(o.probs - r.probs).max(axis=1) if o.cold_start == r.cold_start
                               else np.full(len(o.probs), np.inf)
                               for o, r in zip(results["optimized"], results["naive"])])
        shape = (f"{len(chosen)} requests × {n:,} candidates, {rankers['optimized'].n_tokens:,} history tokens, "
                 f"{backend} ops")
        parity = Parity("serving", float(np.percentile(diff, 99)), TOLERANCE["serving"],
                        f"p99 over candidates; max {diff.max():.1e}")
        rows += [Row(SECTIONS["c"], shape, "ms per batch", ms["naive"], ms["optimized"], parity),
                 Row(SECTIONS["c"], shape, "MB host → device per batch", moved["naive"], moved["optimized"],
                     fmt=",.2f")]
        if peak["naive"] is not None:
            rows.append(Row(SECTIONS["c"], shape, "peak memory MB", peak["naive"], peak["optimized"], fmt=",.1f"))
    return rows


# -- d: training -----------------------------------------------------------------------------------


def training_section(sizes: Sizes, device: torch.device) -> list[Row]:
    """TransAct V2's training step of ``benchmarks/bench_train.py`` (batch, loss, optimizer), on ``device``."""
    batch = random_batch(sizes.train_batch, seed=0, n_items=100_000, n_users=128, n_neg=32).to(device)
    torch.manual_seed(0)
    model = build_model("transact_v2").to(device).train()
    opt = torch.optim.AdamW(model.parameters(), 1e-3)

    def step() -> None:
        out = model(batch)
        loss = ranking_loss(out.logits, batch.labels) + 0.01 * next_action_loss(out.rt_states, batch)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    ms, mb, _ = kernels.Clock(device, sizes.train_steps).time(step)
    shape = f"batch {sizes.train_batch:,}, S {model.cfg.seq_len}"
    rows = [Row(SECTIONS["d"], shape, "examples/s", None, sizes.train_batch / (ms / 1e3), fmt=",.0f")]
    if mb is not None:
        rows.append(Row(SECTIONS["d"], shape, "peak memory MB", None, mb, fmt=",.1f"))
    return rows


# -- the run ---------------------------------------------------------------------------------------


def break_kernel(kernel: str) -> None:
    """For the suite's test: add 1 to every output of ``kernel`` wherever it is called from now on."""
    if kernel == "skut":
        module = importlib.import_module("lifelong.ops.triton_encoder")
        real_skut = module.skut_encode
        module.skut_encode = lambda *a, **kw: real_skut(*a, **kw) + 1
    else:  # nn_search: the dispatcher section b calls (bench_gpu_kernels imports it at each call)
        module = importlib.import_module("lifelong.ops")
        real_nn = module.nn_search

        def nn_search(*a: Any, **kw: Any) -> tuple[torch.Tensor, torch.Tensor]:
            positions, scores = real_nn(*a, **kw)
            return positions, scores + 1

        module.nn_search = nn_search


def render(rows: list[Row], caption: str) -> str:
    header = ["section", "shape", "figure", "baseline", "new", "change", "parity: max abs Δ ≤ tolerance"]
    lines = [caption, "", "| " + " | ".join(header) + " |", "|---|---|---|---:|---:|---:|---|"]
    lines += ["| " + " | ".join(row.cells()) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("gpu_suite.md"), help="markdown file to write the table to")
    parser.add_argument("--dry-run", action="store_true",
                        help="every section at tiny shapes on the CPU (Triton interpreter): a smoke check, no figures")
    parser.add_argument("--sections", default="".join(SECTIONS), help="which of a, b, c, d to run (default: all)")
    parser.add_argument("--repeats", type=int, help="timed calls per kernel shape (default 20; 1 in a dry run)")
    args = parser.parse_args(argv)
    if not args.sections or set(args.sections) - set(SECTIONS):
        parser.error(f"--sections takes letters of {''.join(SECTIONS)}, got {args.sections!r}")
    if args.repeats is not None and args.repeats < 1:
        parser.error(f"--repeats must be at least 1, got {args.repeats}")
    broken = os.environ.get(BREAK_ENV)
    if broken not in (None, "skut", "nn_search"):
        parser.error(f"{BREAK_ENV} names skut or nn_search, got {broken!r}")
    cuda = torch.cuda.is_available()
    if not cuda and not args.dry_run:
        print("gpu_suite: no CUDA device here, and every section needs one "
              "(--dry-run checks the code paths on the CPU)", file=sys.stderr)
        return 2
    if not cuda:  # before anything imports triton: its kernels then run in the interpreter, on the CPU
        os.environ["TRITON_INTERPRET"] = "1"
    no_triton = triton_unavailable_reason()
    if no_triton is not None and not args.dry_run:
        print(f"gpu_suite: {no_triton}", file=sys.stderr)
        return 2
    if broken is not None and no_triton is None:
        break_kernel(broken)

    sizes = DRY_RUN if args.dry_run else FULL
    sizes = dataclasses.replace(sizes, repeats=args.repeats or sizes.repeats)
    device = torch.device("cuda") if cuda else torch.device("cpu")
    clock = kernels.Clock(device, sizes.repeats)
    sections: dict[str, Callable[[], list[Row]]] = {
        "a": partial(encoder_section, sizes, device, clock),
        "b": partial(nn_section, sizes, device, clock),
        "c": partial(serving_section, sizes, device, "cpu" if no_triton else "triton"),
        "d": partial(training_section, sizes, device),
    }
    start = time.perf_counter()
    rows: list[Row] = []
    for letter in sorted(set(args.sections)):
        t0 = time.perf_counter()
        if letter in "ab" and no_triton is not None:
            rows.append(Row(SECTIONS[letter], "—", f"skipped: {no_triton}", None, None))
        else:
            rows += sections[letter]()
        print(f"gpu_suite: section {letter} took {time.perf_counter() - t0:.1f} s", file=sys.stderr, flush=True)

    triton_version = "unavailable" if no_triton else importlib.import_module("triton").__version__
    where = (torch.cuda.get_device_name() if cuda
             else f"CPU ({cpu_model()}, nproc {os.cpu_count()}), Triton interpreter")
    caption = (f"{'**DRY RUN: tiny shapes, not figures.** ' if args.dry_run else ''}`benchmarks/gpu_suite.sh` "
               f"{time.strftime('%Y-%m-%d')}: {where}; torch {torch.__version__}, triton {triton_version}; "
               f"kernel latency median of {sizes.repeats}, serving of {sizes.serve_repeats}, training of "
               f"{sizes.train_steps} steps; {time.perf_counter() - start:.0f} s in all")
    table = render(rows, caption)
    args.out.write_text(table)
    print(table)
    failed = [row for row in rows if row.parity is not None and not row.parity.ok]
    for row in failed:
        print(f"gpu_suite: parity FAILED: {row.parity.kernel} ({row.section}; {row.shape}): "
              f"{row.parity.value:.1e} > {row.parity.tolerance:.0e}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
