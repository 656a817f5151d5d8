"""The fused TransAct V2 encoder's cost per row by rows per forward and precision.

Why the optimized serving path scores a batch in chunks (``Ranker(forward_rows=256)``) and what
``lifelong serve --precision bf16`` buys: the ``cpu`` implementation of ``transact_encode``
(default TransAct V2, random weights, |S_all| = 192) over token tables built as
``lifelong bench ops`` builds them, at each row count, in float32 and under bfloat16 autocast.
Prints milliseconds per forward and per row (median of ``--repeats`` after a warm-up), the
bfloat16 speedup, and whether this CPU has bfloat16 units.

    LIFELONG_QUIET=1 .venv/bin/python benchmarks/bench_encoder_rows.py [--rows 128,256,512,2048] [--json F]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from lifelong.bench.machine import cpu_model  # noqa: E402
from lifelong.bench.ops import _encoder_table, _time  # noqa: E402
from lifelong.core.precision import bf16_native, forward_precision  # noqa: E402
from lifelong.transact.config import TransActConfig  # noqa: E402
from lifelong.transact.model import TransAct  # noqa: E402
from lifelong.transact.sequence_layout import SequenceLayout  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", default="128,256,512,2048", help="Comma-separated rows per forward.")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--json", type=Path, default=None, help="Write the figures as JSON here.")
    args = parser.parse_args()
    gen = torch.Generator().manual_seed(0)
    model = TransAct(TransActConfig()).eval()
    results = []
    for n in (int(x) for x in args.rows.split(",")):
        table = _encoder_table(n, SequenceLayout(), gen)
        ms = {}
        for precision in ("fp32", "bf16"):
            def forward() -> None:
                with torch.inference_mode(), forward_precision(precision):
                    model.encode_token_table(*table, backend="cpu")

            ms[precision] = _time(forward, args.repeats)[0]
        results.append({"rows": n, "fp32_ms": ms["fp32"], "bf16_ms": ms["bf16"], "fp32_ms_per_row": ms["fp32"] / n,
                        "bf16_ms_per_row": ms["bf16"] / n, "bf16_speedup": ms["fp32"] / ms["bf16"]})
    print(f"{cpu_model()}, torch threads {torch.get_num_threads()}, bfloat16 units: {'yes' if bf16_native() else 'no'}")
    print("| rows | fp32 ms | bf16 ms | fp32 ms/row | bf16 ms/row | bf16 speedup |")
    print("|---:|---:|---:|---:|---:|---:|")
    for r in results:
        print(f"| {r['rows']:,} | {r['fp32_ms']:.1f} | {r['bf16_ms']:.1f} | {r['fp32_ms_per_row']:.3f} | "
              f"{r['bf16_ms_per_row']:.3f} | {r['bf16_speedup']:.2f}x |")
    if args.json is not None:
        args.json.write_text(json.dumps({"cpu": cpu_model(), "torch_threads": torch.get_num_threads(),
                                         "bf16_native": bf16_native(), "rows": results}, indent=2))


if __name__ == "__main__":
    main()
