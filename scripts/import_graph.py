"""Draw lifelong's layers from its real import graph (docs/architecture.md).

Reads the import graph with grimp (the library import-linter checks the layers with), folds it
to subpackages and writes:

- a Mermaid block between the ``<!-- import-graph -->`` markers of docs/architecture.md
  (``--check`` fails instead when the block there is out of date: tests/test_architecture.py);
- ``docs/img/architecture.png``: the same graph drawn layer by layer with matplotlib.

Usage: ``python scripts/import_graph.py [--check]``
"""

from __future__ import annotations

import argparse
import sys
from collections import defaultdict
from pathlib import Path

import grimp

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "architecture.md"
PNG = ROOT / "docs" / "img" / "architecture.png"
BEGIN, END = "<!-- import-graph -->", "<!-- /import-graph -->"
# Top to bottom, as the import-linter contract in pyproject.toml lists them.
LAYERS = [["cli"], ["bench"], ["transact", "dv365", "monolith", "loop"], ["serving", "store"], ["ops"], ["modules"],
          ["tables"], ["data"], ["core"]]


def subpackage_edges() -> dict[str, set[str]]:
    """``{importer: {imported}}`` between lifelong's subpackages, function-level imports included."""
    graph = grimp.build_graph("lifelong")
    edges: dict[str, set[str]] = defaultdict(set)
    for module in graph.modules:
        parts = module.split(".")
        if len(parts) < 2:
            continue
        for imported in graph.find_modules_directly_imported_by(module):
            target = imported.split(".")
            if len(target) >= 2 and target[1] != parts[1]:
                edges[parts[1]].add(target[1])
    return edges


def transitive_reduction(edges: dict[str, set[str]]) -> dict[str, set[str]]:
    """Only the edges not implied by a longer path, so that the picture stays readable."""

    def reachable(start: str, skip: str) -> set[str]:
        seen, todo = set(), [n for n in edges.get(start, ()) if n != skip]
        while todo:
            node = todo.pop()
            if node not in seen:
                seen.add(node)
                todo.extend(edges.get(node, ()))
        return seen

    return {a: {b for b in bs if b not in reachable(a, b)} for a, bs in edges.items()}


def mermaid(edges: dict[str, set[str]]) -> str:
    lines = ["```mermaid", "flowchart TD"]
    for depth, layer in enumerate(LAYERS):
        lines.append(f"  subgraph L{depth}[\" \"]")
        lines.extend(f"    {name}" for name in layer)
        lines.append("  end")
    for a in sorted(edges):
        lines.extend(f"  {a} --> {b}" for b in sorted(edges[a]))
    lines.append("```")
    return "\n".join(lines)


def draw(edges: dict[str, set[str]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    pos = {}
    for depth, layer in enumerate(LAYERS):
        for i, name in enumerate(layer):
            pos[name] = ((i + 1) / (len(layer) + 1), 1 - depth / (len(LAYERS) - 1))
    fig, ax = plt.subplots(figsize=(7, 8))
    for a, bs in edges.items():
        for b in bs:
            ax.annotate("", xy=pos[b], xytext=pos[a],
                        arrowprops={"arrowstyle": "->", "color": "0.55", "shrinkA": 14, "shrinkB": 14,
                                    "connectionstyle": "arc3,rad=0.12"})
    for name, (x, y) in pos.items():
        ax.text(x, y, name, ha="center", va="center", fontsize=11,
                bbox={"boxstyle": "round", "fc": "#e8f0fe" if name in LAYERS[2] else "white", "ec": "0.3"}, zorder=3)
    ax.set_axis_off()
    ax.set_ylim(-0.06, 1.06)
    ax.set_title("lifelong: who imports whom (arrows point down only)", pad=12)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="fail when docs/architecture.md's graph is stale")
    args = parser.parse_args()
    edges = transitive_reduction(subpackage_edges())
    block = mermaid(edges)
    doc = DOC.read_text()
    start, end = doc.index(BEGIN) + len(BEGIN), doc.index(END)
    current = doc[start:end].strip()
    if args.check:
        if current != block:
            print("docs/architecture.md's import graph is stale: run python scripts/import_graph.py", file=sys.stderr)
            return 1
        return 0
    DOC.write_text(doc[:start] + "\n" + block + "\n" + doc[end:])
    draw(edges, PNG)
    print(f"wrote the graph into {DOC} and {PNG}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
