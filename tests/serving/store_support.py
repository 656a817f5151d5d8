"""For the store version and chaos tests: two datasets, a model, the scores each version must give,
and a loader process that switches a store back and forth between the datasets."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from lifelong.data.world import load_config, simulate_to
from lifelong.serving.ranking import RankRequest
from lifelong.store.feature_store import load_store, open_store
from lifelong.transact.sequence_layout import SequenceLayout
from lifelong.transact.serving import Ranker
from lifelong.transact.trainer import TrainConfig, load_model, train
from lifelong.transact.training_rows import BuildConfig, build_rows

LAYOUT = SequenceLayout(ll_nn=8, rt=8, rt_nn=4, imp_nn=4)
N_USERS = 30
CANDIDATES = 8  # item rows 0..7 (the same ids in both datasets: the tiny preset's items)
TOLERANCE = 1e-5  # batching may change float sums in the last bits (the parity tests' bound)


@dataclass
class Fixture:
    """Datasets ``a`` and ``b`` (two worlds), another layout's ``other``, a TransAct V2 run on ``a``
    and, per dataset, the probabilities and cold-start flag each user's request must get."""

    root: Path
    a: Path
    b: Path
    other: Path
    run: Path
    item_ids: np.ndarray
    expected: dict[str, list[tuple[np.ndarray, bool]]]

    def request(self, user: int) -> RankRequest:
        return RankRequest(user, np.arange(CANDIDATES), 0, None)

    def body(self, user: int) -> dict:
        return {"user_id": user, "candidates": self.item_ids.tolist(), "surface": "homefeed"}

    def wrong(self, dataset: str | None, user: int, probs: np.ndarray, cold: bool) -> bool:
        """Whether an answer read from ``dataset`` differs from what that dataset's store gives."""
        if dataset is None:
            return True
        want, want_cold = self.expected[dataset][user]
        return cold != want_cold or probs.shape != want.shape or float(np.abs(probs - want).max()) > TOLERANCE


def make_fixture(root: Path) -> Fixture:
    cfg = BuildConfig(layout=LAYOUT, ll_cap=40, imp_cap=10, nal_negatives=6)
    for name, seed in (("a", 0), ("b", 1)):
        simulate_to(load_config("tiny", overrides=[f"users.n_users={N_USERS}", f"seed={seed}"]), root / f"world_{name}")
        build_rows(root / f"world_{name}", root / name, cfg)
    build_rows(root / "world_a", root / "other", BuildConfig(layout=SequenceLayout(4, 4, 2, 2), ll_cap=40,
                                                             imp_cap=10, nal_negatives=6))
    torch.set_num_threads(1)
    train(root / "a", root / "run", TrainConfig(model="transact_v2", nal="impression", epochs=1, max_rows=400,
                                                batch_size=128))
    net, _ = load_model(root / "run")
    expected, ids = {}, {}
    for name in ("a", "b"):
        url = str(root / f"static_{name}")
        load_store(root / name, url, progress=False)
        with open_store(url) as store:
            ranker = Ranker(net, store)
            ids[name] = ranker.items.item_id[:CANDIDATES].copy()
            expected[name] = [((res := ranker.rank([RankRequest(u, np.arange(CANDIDATES), 0, None)])[0]).probs.copy(),
                               res.cold_start) for u in range(N_USERS)]
    differ = sum(float(np.abs(expected["a"][u][0] - expected["b"][u][0]).max()) > 100 * TOLERANCE for u in range(N_USERS))
    assert differ >= N_USERS // 2, "the two datasets must give distinguishable scores"
    assert np.array_equal(ids["a"], ids["b"]), "the candidates must be the same items in both datasets"
    return Fixture(root, root / "a", root / "b", root / "other", root / "run", ids["a"], expected)


LOADER = """
import json, sys, time
from lifelong.store.feature_store import load_store
url, seconds, datasets = sys.argv[1], float(sys.argv[2]), sys.argv[3:]
deadline, i = time.monotonic() + seconds, 0
while time.monotonic() < deadline:
    name = datasets[i % len(datasets)]
    s = load_store(name, url, progress=False)
    print(json.dumps({"version": s["version"], "dataset": name, "seconds": s["seconds"]}), flush=True)
    i += 1
"""


def start_loader(url: str, seconds: float, datasets: list[Path], cli: bool = False) -> subprocess.Popen:
    """A process loading ``datasets`` into ``url`` in turn, back to back, for ``seconds``; with
    ``cli`` through ``lifelong store load`` (one process per load), else one Python process."""
    if not cli:
        return subprocess.Popen([sys.executable, "-c", LOADER, url, str(seconds), *map(str, datasets)],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    script = ("import subprocess, sys, time\n"
              "url, seconds, datasets = sys.argv[1], float(sys.argv[2]), sys.argv[3:]\n"
              "deadline, i = time.monotonic() + seconds, 0\n"
              "while time.monotonic() < deadline:\n"
              "    r = subprocess.run([sys.executable, '-m', 'lifelong.cli', 'store', 'load', '--data', datasets[i % len(datasets)],\n"
              "                        '--store', url], capture_output=True, text=True, env={'LIFELONG_QUIET': '1', 'COLUMNS': '400', 'PATH': '/usr/bin:/bin'})\n"
              "    if r.returncode: print(r.stdout + r.stderr, file=sys.stderr); sys.exit(1)\n"
              "    v = r.stdout.split(' version ')[1].split()[0].rstrip(':;')\n"
              "    print('{\"version\": \"%s\", \"dataset\": \"%s\"}' % (v, datasets[i % len(datasets)]), flush=True)\n"
              "    i += 1\n")
    return subprocess.Popen([sys.executable, "-c", script, url, str(seconds), *map(str, datasets)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def finish_loader(proc: subprocess.Popen, fixture: Fixture) -> dict[str, str]:
    """Wait for the loader; the dataset (``a`` or ``b``) of every version it loaded."""
    out, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err
    names = {str(fixture.a): "a", str(fixture.b): "b"}
    return {rec["version"]: names[rec["dataset"]] for rec in map(json.loads, out.splitlines())}


def wait_for(predicate, timeout_s: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.002)
    return False
