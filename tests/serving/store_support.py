"""For the store version and chaos tests: two datasets, a model, the scores each version must give,
and a loader process that switches a store back and forth between the datasets; for the Redis
Cluster tests, a throwaway cluster of local redis-server processes."""

from __future__ import annotations

import json
import random
import shutil
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import redis
import torch

from lifelong.core.processes import stop_process
from lifelong.data.world import load_config, simulate_to
from lifelong.serving.ranking import RankRequest
from lifelong.store.feature_store import load_store, open_store
from lifelong.transact.sequence_layout import SequenceLayout
from lifelong.transact.serving import Ranker
from lifelong.transact.trainer import TrainConfig, load_model, train
from lifelong.transact.training_rows import BuildConfig, build_rows
from tests.conftest import wait_ready

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


@dataclass
class LocalCluster:
    """A Redis Cluster of ``redis-server`` processes on 127.0.0.1, one primary per node, no
    replicas (:func:`start_redis_cluster`). Each node appends every write to an append-only file
    in its directory before it replies, so a node killed and started again comes back with its
    data, as a production node with persistence does (no fsync: the kernel keeps what a killed
    process wrote; only a machine crash needs it)."""

    root: Path
    ports: list[int]
    node_timeout_ms: int
    procs: list[subprocess.Popen] = field(default_factory=list)

    @property
    def url(self) -> str:
        return "redis-cluster://" + ",".join(f"127.0.0.1:{p}" for p in self.ports)

    def node_dir(self, i: int) -> Path:
        return self.root / f"node-{self.ports[i]}"

    def start_node(self, i: int) -> subprocess.Popen:
        """Start node ``i`` with its config file (``nodes-PORT.conf``, its identity and slots) and data."""
        port, work = self.ports[i], self.node_dir(i)
        work.mkdir(parents=True, exist_ok=True)
        proc = subprocess.Popen(
            [shutil.which("redis-server"), "--port", str(port), "--bind", "127.0.0.1", "--dir", str(work),
             "--cluster-enabled", "yes", "--cluster-config-file", f"nodes-{port}.conf",
             "--cluster-node-timeout", str(self.node_timeout_ms), "--appendonly", "yes", "--appendfsync", "no",
             "--save", ""], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        if i < len(self.procs):
            self.procs[i] = proc
        else:
            self.procs.append(proc)
        return proc

    def kill_node(self, i: int) -> None:
        """SIGKILL node ``i`` (by pid), as a crash would."""
        self.procs[i].kill()
        self.procs[i].wait()

    def client(self, i: int) -> redis.Redis:
        return redis.Redis(host="127.0.0.1", port=self.ports[i], socket_connect_timeout=0.5, socket_timeout=2)

    def state(self, i: int) -> str | None:
        """``cluster_state`` as node ``i`` sees it (``ok``, ``fail``), None when it does not answer."""
        client = self.client(i)
        try:
            return client.cluster("INFO")["cluster_state"]
        except redis.RedisError:
            return None
        finally:
            client.close()

    def node_of(self, slot: int) -> int:
        """The node serving ``slot``."""
        client = self.client(0)
        try:
            nodes = client.cluster("NODES")
        finally:
            client.close()
        for addr, info in nodes.items():
            if any(int(r[0]) <= slot <= int(r[-1]) for r in info["slots"]):
                return self.ports.index(int(addr.split(":")[1]))
        raise AssertionError(f"no node serves slot {slot}")

    def stop(self) -> None:
        for proc in self.procs:
            stop_process(proc)


def cluster_port() -> int:
    """A port for a cluster node: free together with its cluster bus port (port + 10000) a moment ago.

    An ephemeral port from the kernel is no good: Linux hands out 32768-60999, and a node on a
    port above 55535 refuses to start because its bus port would pass 65535. So pick from below
    the ephemeral range, where ``port + 10000`` is still a valid port.
    """
    for _ in range(100):
        port = random.randrange(12000, 22000)
        try:
            with socket.socket() as a, socket.socket() as b:
                a.bind(("127.0.0.1", port))
                b.bind(("127.0.0.1", port + 10000))
            return port
        except OSError:
            continue
    raise RuntimeError("no free port pair (port, port + 10000) in 12000-32000 after 100 tries")


def start_redis_cluster(root: Path, nodes: int = 3, node_timeout_ms: int = 2000,
                        timeout_s: float = 30.0) -> LocalCluster:
    """Start ``nodes`` cluster-mode redis-servers on free ports, join them with ``redis-cli
    --cluster create`` (no replicas) and wait until every node reports ``cluster_state:ok``.

    Stop it with :meth:`LocalCluster.stop` (by pid). A port taken between picking and binding it
    (another test process) makes a node exit: then every node is stopped and new ports are tried.
    """
    for _ in range(3):
        cluster = LocalCluster(root, [cluster_port() for _ in range(nodes)], node_timeout_ms)
        for i in range(nodes):
            cluster.start_node(i)
        if all(wait_ready(cluster.procs[i], cluster.ports[i], 10.0) for i in range(nodes)):
            break
        cluster.stop()
    else:
        raise RuntimeError("the Redis Cluster nodes did not answer PING on three sets of ports")
    try:
        subprocess.run([shutil.which("redis-cli"), "--cluster", "create", *(f"127.0.0.1:{p}" for p in cluster.ports),
                        "--cluster-replicas", "0", "--cluster-yes"], check=True, capture_output=True, timeout=60)
        if not poll_until(lambda: all(cluster.state(i) == "ok" for i in range(nodes)), timeout_s):
            raise RuntimeError(f"the Redis Cluster did not reach cluster_state:ok within {timeout_s:.0f} s")
    except BaseException:
        cluster.stop()
        raise
    return cluster


def poll_until(predicate, timeout_s: float, pause_s: float = 0.1) -> bool:
    """Whether ``predicate()`` became true within ``timeout_s``, asked every ``pause_s`` (for
    checks that cost a connection or a store read, unlike :func:`wait_for`'s)."""
    deadline = time.monotonic() + timeout_s
    while True:
        if predicate():
            return True
        if time.monotonic() > deadline:
            return False
        time.sleep(pause_s)
