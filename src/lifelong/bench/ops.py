"""Serving-ops benchmark: NN search naive vs reference vs cpu, and the encoder reference vs cpu.

One request is one user with ``L`` int8 tokens and ``N`` candidates. The NN search rows time
the paper's baseline (:func:`~lifelong.ops.nn_search_naive`, a sequence copy per candidate)
against the dispatcher's ``reference`` and ``cpu`` backends, with the sequence bytes each
materialises (:func:`~lifelong.ops.bytes_moved`) and whether all three chose the same tokens.
The encoder rows time TransAct V2 (default config, random weights) over ``N`` rows of
|S_all| = 192 tokens read from a de-duplicated token table (``S_all`` assembled as serving
assembles it, :func:`~lifelong.transact.sequence_layout.assemble_s_all`), through the model's
``encode_token_table``: reference vs fused cpu.

Times are the median of ``repeats`` runs after one warm-up, in milliseconds, under
``torch.inference_mode`` with torch's current thread count.

Example::

    >>> rows = run(L_values=(40,), N_values=(3,), k=4, repeats=1)
    >>> [row["op"] for row in rows], rows[0]["identical"]
    (['nn_search', 'encoder'], True)
    >>> render(rows).splitlines()[2]
    '| L | N | naive ms | reference ms | cpu ms | cpu speedup vs naive | naive MB | optimized MB | identical |'
"""

from __future__ import annotations

import json
import os
import statistics
import time
from collections.abc import Callable, Sequence
from functools import partial
from pathlib import Path
from typing import Any

import torch

from lifelong.bench.machine import cpu_model
from lifelong.core.quantization import dequantize_int8
from lifelong.data.schema import EMBED_DIM, KNOWN_ACTION_BITS, SURFACES
from lifelong.ops import bytes_moved, nn_search, nn_search_naive
from lifelong.ops.nn_select import l2_normalize
from lifelong.transact.config import TransActConfig
from lifelong.transact.model import TransAct
from lifelong.transact.sequence_layout import SequenceLayout, assemble_s_all


def _time(fn: Callable[[], Any], repeats: int) -> tuple[float, Any]:
    """Median milliseconds of ``repeats`` calls after a warm-up one, and the warm-up's result."""
    out = fn()  # warm-up: first-call allocations and kernel selection
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return 1e3 * statistics.median(times), out


def _codes(shape: tuple[int, ...], gen: torch.Generator) -> torch.Tensor:
    return torch.randint(-127, 128, shape, generator=gen).to(torch.int8)


def _nn_rows(L_values: Sequence[int], N_values: Sequence[int], k: int, repeats: int,
             gen: torch.Generator) -> list[dict[str, Any]]:
    rows = []
    for length in L_values:
        values = _codes((length, EMBED_DIM), gen)
        starts, lengths = torch.tensor([0]), torch.tensor([length])
        for n in N_values:
            args = (values, starts, lengths, torch.zeros(n, dtype=torch.int64),
                    l2_normalize(dequantize_int8(_codes((n, EMBED_DIM), gen))), k)
            paths = {"naive": partial(nn_search_naive, *args),
                     "reference": partial(nn_search, *args, backend="reference"),
                     "cpu": partial(nn_search, *args, backend="cpu")}
            timed = {name: _time(fn, repeats) for name, fn in paths.items()}
            ms = {name: t for name, (t, _) in timed.items()}
            cpu_pos, cpu_scores = timed["cpu"][1]
            moved = bytes_moved(lengths, args[3], EMBED_DIM)
            rows.append({
                "op": "nn_search", "L": length, "N": n, "k": k,
                "naive_ms": ms["naive"], "reference_ms": ms["reference"], "cpu_ms": ms["cpu"],
                "speedup": ms["naive"] / ms["cpu"],
                "naive_bytes": moved["naive"], "optimized_bytes": moved["optimized"],
                "identical": all(torch.equal(pos, cpu_pos) and torch.equal(scores, cpu_scores)
                                 for _, (pos, scores) in timed.values()),
            })
    return rows


def _encoder_table(n: int, layout: SequenceLayout, gen: torch.Generator, n_ll: int = 1000,
                   n_imp: int = 100) -> tuple[torch.Tensor, ...]:
    """One user's token table (S_LL, S_RT[:r], S_imp) and N rows of S_all over it, selected by NN search."""
    n_tokens = n_ll + layout.rt + n_imp
    codes = _codes((n_tokens, EMBED_DIM), gen)
    tok_emb = dequantize_int8(codes)
    tok_action = torch.randint(1, KNOWN_ACTION_BITS + 1, (n_tokens,), generator=gen)
    tok_surface = torch.randint(0, len(SURFACES), (n_tokens,), generator=gen)
    cand_emb = dequantize_int8(_codes((n, EMBED_DIM), gen))
    segments = {"ll": (torch.tensor([0]), torch.tensor([n_ll])), "rt": (torch.tensor([n_ll]), torch.tensor([layout.rt])),
                "imp": (torch.tensor([n_ll + layout.rt]), torch.tensor([n_imp]))}

    def search(starts, lengths, cand_key, cand, k):
        return nn_search(codes, starts, lengths, cand_key, cand, k, backend="cpu")[0]

    tok_index = assemble_s_all(layout, segments, torch.zeros(n, dtype=torch.int64), l2_normalize(cand_emb), search)
    return tok_emb, tok_action, tok_surface, tok_index, cand_emb


def _encoder_rows(N_values: Sequence[int], repeats: int, gen: torch.Generator) -> list[dict[str, Any]]:
    torch.manual_seed(int(torch.randint(0, 2**31, (1,), generator=gen)))
    model = TransAct(TransActConfig()).eval()
    rows = []
    for n in N_values:
        args = _encoder_table(n, model.cfg.layout, gen)
        timed = {name: _time(partial(model.encode_token_table, *args, backend=name), repeats)
                 for name in ("reference", "cpu")}
        ms = {name: t for name, (t, _) in timed.items()}
        diff = (timed["reference"][1][0] - timed["cpu"][1][0]).abs().max()
        rows.append({"op": "encoder", "N": n, "S": model.cfg.seq_len, "reference_ms": ms["reference"],
                     "cpu_ms": ms["cpu"], "speedup": ms["reference"] / ms["cpu"], "max_abs_diff": float(diff)})
    return rows


def run(L_values: Sequence[int] = (1000, 10000), N_values: Sequence[int] = (100, 500, 1000), k: int = 64,
        repeats: int = 5, seed: int = 0) -> list[dict[str, Any]]:
    """Time the serving ops side by side.

    Args:
        L_values: lifelong sequence lengths (tokens of the request's user).
        N_values: candidates per request (and encoder rows).
        k: tokens selected per candidate.
        repeats: timed runs per measurement (after one warm-up); the median is reported.
        seed: seeds the random sequences, candidates and model weights.

    Returns:
        One dict per measurement: ``op="nn_search"`` rows with ``L, N, k, naive_ms,
        reference_ms, cpu_ms, speedup`` (naive over cpu), ``naive_bytes, optimized_bytes,
        identical``; ``op="encoder"`` rows with ``N, S, reference_ms, cpu_ms, speedup,
        max_abs_diff``.
    """
    gen = torch.Generator().manual_seed(seed)
    with torch.inference_mode():
        return _nn_rows(L_values, N_values, k, repeats, gen) + _encoder_rows(N_values, repeats, gen)


def write_json(rows: Sequence[dict[str, Any]], path: str | os.PathLike[str]) -> dict[str, Any]:
    """Write :func:`run`'s rows to ``path`` as JSON, with what they ran on; returns what was written.

    Every figure of :func:`render`'s tables is there, ratios included: ``speedup`` (naive over
    cpu for the NN search, reference over cpu for the encoder) and ``bytes_ratio`` (naive over
    optimized sequence bytes).

    Example::

        >>> import tempfile
        >>> with tempfile.TemporaryDirectory() as d:
        ...     doc = write_json(run(L_values=(40,), N_values=(3,), k=4, repeats=1), Path(d) / "ops.json")
        >>> sorted(doc), sorted(doc["nn_search"][0])[:3]
        (['cpu', 'encoder', 'nn_search', 'nproc', 'torch', 'torch_threads'], ['L', 'N', 'bytes_ratio'])
    """
    doc = {"cpu": cpu_model(), "nproc": os.cpu_count(), "torch": torch.__version__,
           "torch_threads": torch.get_num_threads(),
           "nn_search": [{**r, "bytes_ratio": r["naive_bytes"] / r["optimized_bytes"]}
                         for r in rows if r["op"] == "nn_search"],
           "encoder": [dict(r) for r in rows if r["op"] == "encoder"]}
    Path(path).write_text(json.dumps(doc, indent=2))
    return doc


def render(rows: Sequence[dict[str, Any]]) -> str:
    """Markdown tables of :func:`run`'s rows: NN search, then the encoder."""
    threads = torch.get_num_threads()
    nn = [r for r in rows if r["op"] == "nn_search"]
    enc = [r for r in rows if r["op"] == "encoder"]
    sections = []
    if nn:
        sections.append("\n".join([
            f"**NN search** (k={nn[0]['k']}, d={EMBED_DIM}, torch threads: {threads})", "",
            "| L | N | naive ms | reference ms | cpu ms | cpu speedup vs naive | naive MB | optimized MB | identical |",
            "|---:|---:|---:|---:|---:|---:|---:|---:|:---:|",
            *(f"| {r['L']} | {r['N']} | {r['naive_ms']:.1f} | {r['reference_ms']:.1f} | {r['cpu_ms']:.1f} | "
              f"{r['speedup']:.1f}x | {r['naive_bytes'] / 1e6:.1f} | {r['optimized_bytes'] / 1e6:.2f} | "
              f"{'yes' if r['identical'] else 'NO'} |" for r in nn)]))
    if enc:
        sections.append("\n".join([
            f"**Encoder** (TransAct V2, |S_all| = {enc[0]['S']}, torch threads: {threads})", "",
            "| N | reference ms | cpu ms | speedup | max abs diff |", "|---:|---:|---:|---:|---:|",
            *(f"| {r['N']} | {r['reference_ms']:.1f} | {r['cpu_ms']:.1f} | {r['speedup']:.2f}x | "
              f"{r['max_abs_diff']:.1e} |" for r in enc)]))
    return "\n\n".join(sections)
