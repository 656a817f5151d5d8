"""Reading built rows and assembling :class:`~lifelong.transact.batch.RankBatch` mini-batches.

The rows directory written by :func:`lifelong.transact.training_rows.build_rows` is memory
mapped; a batch gathers its rows' logged tokens, concatenates the S_all blocks, and dequantizes
token and candidate embeddings from the int8 item table. With ``user_emb`` (a DV365 export's
store), every batch also carries each row's user embedding, read once from the store's served
version and frozen (``RankBatch.user_emb``), for models that prepend it as tokens.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import torch

from lifelong.core.errors import DataError
from lifelong.core.quantization import dequantize_int8
from lifelong.store.embeddings import EmbeddingReader, decode_records
from lifelong.transact.batch import RankBatch
from lifelong.transact.sequence_layout import SequenceLayout


def split_window_ms(directory: str | os.PathLike[str], split: str) -> tuple[int, int]:
    """``[start, end)`` in ms of a rows directory's split, from the protocol it was built with.

    Example::

        start, _ = split_window_ms("datasets/small", "train")  # export an embedding as of ``start``
    """
    meta_path = Path(directory) / "build.json"
    try:
        protocol = json.loads(meta_path.read_text())["protocol"]
    except (OSError, ValueError, KeyError):
        raise DataError(directory, "not a rows directory (no build.json with a protocol); run `lifelong transact build` first") from None
    windows = {"train": ("train_start_ms", "cutoff_ms"), "eval": ("eval_start_ms", "eval_end_ms")}
    if split not in windows:
        raise DataError(directory, f"no split {split!r}; choose train or eval")
    lo, hi = windows[split]
    return int(protocol[lo]), int(protocol[hi])


class RankData:
    """One split (``train`` or ``eval``) of a rows directory.

    Args:
        directory: the rows directory (``lifelong transact build --out``).
        split: ``train`` or ``eval``.
        user_emb: a store holding a ``lifelong dv365 export`` (URL or path). Its served version
            is read for the split's users when the data is opened; a user it lacks (not active
            at the export's time) reads zeros. None: batches carry no user embedding.

    Example::

        data = RankData("datasets/small", "train")
        batch = data.batch(np.arange(512))
        with_emb = RankData("datasets/small", "train", user_emb="lmdb:///tmp/dv365")
        with_emb.batch(np.arange(4)).user_emb.shape  # (4, rows, dim) of the export
    """

    def __init__(self, directory: str | os.PathLike[str], split: str, user_emb: str | os.PathLike[str] | None = None):
        self.directory = Path(directory)
        meta_path = self.directory / "build.json"
        if not meta_path.is_file():
            raise DataError(self.directory, "not a rows directory (no build.json); run `lifelong transact build` first")
        self.meta = json.loads(meta_path.read_text())
        if split not in self.meta["splits"]:
            raise DataError(self.directory, f"no split {split!r}")
        self.split = split
        self.layout = SequenceLayout(**self.meta["layout"])
        self.heads: tuple[str, ...] = tuple(self.meta["heads"])
        d = self.directory / split
        try:
            self.arrays = {p.stem: np.load(p, mmap_mode="r") for p in sorted(d.glob("*.npy"))}
            items = self.directory / "items"
            emb = dequantize_int8(torch.from_numpy(np.load(items / "emb_int8.npy")))
            # A zero row after the items: padding (-1) gathers it, in one index_select per batch.
            self._emb_table = torch.cat([emb, emb.new_zeros(1, emb.shape[1])])
            self.item_emb = self._emb_table[:-1]
            self.item_author = torch.from_numpy(np.load(items / "author_id.npy").astype(np.int64))
            self.item_topic = torch.from_numpy(np.load(items / "topic_id.npy").astype(np.int64))
            self.item_id = torch.from_numpy(np.load(items / "item_id.npy").astype(np.int64))
        except (OSError, ValueError) as exc:
            raise DataError(d, f"unreadable rows ({exc})") from None
        missing = {"user_id", "item", "labels", "request"} - set(self.arrays)
        if missing:
            raise DataError(d, f"missing arrays {sorted(missing)}")
        self.user_emb_info: dict | None = None
        self._users = self._user_words = self._user_found = None
        if user_emb is not None:
            self._attach_user_embeddings(user_emb)

    def _attach_user_embeddings(self, store: str | os.PathLike[str]) -> None:
        users = np.unique(np.asarray(self.arrays["user_id"]))
        with EmbeddingReader(store) as reader:
            # Kept as the export's 4-bit words (5x smaller than float32), decoded per batch.
            words, found, pointer = reader.get_words(users)
        self._users, self._user_words, self._user_found = users, words, found
        self.user_emb_info = {"store": str(store), "version": int(pointer["version"]),
                              "shape": [int(pointer["rows"]), int(pointer["dim"])], "as_of_ms": pointer.get("as_of_ms"),
                              "users": int(users.size), "users_found": int(found.sum())}

    def _user_embedding(self, user: np.ndarray) -> torch.Tensor:
        """(B, rows, dim) float32 embeddings of the users ``user``, zeros for those the export lacks."""
        k = np.searchsorted(self._users, user)
        return torch.from_numpy(decode_records(self._user_words[k], self._user_found[k], self.user_emb_info["shape"][1], 0.0))

    @property
    def user_tokens(self) -> tuple[int, int] | None:
        """``(rows, dim)`` of the attached user embedding, None without one."""
        return None if self.user_emb_info is None else tuple(self.user_emb_info["shape"])

    def __len__(self) -> int:
        return int(self.arrays["user_id"].shape[0])

    @property
    def oracle(self) -> np.ndarray | None:
        """(n, H) true head probabilities (simulated worlds), else None."""
        return None if "oracle" not in self.arrays else np.asarray(self.arrays["oracle"])

    def _emb(self, item: torch.Tensor) -> torch.Tensor:
        """Dequantized embeddings of item indices, zeros for padding (-1)."""
        pad = self._emb_table.shape[0] - 1
        flat = torch.where(item >= 0, item, pad).reshape(-1)
        return self._emb_table.index_select(0, flat).view(*item.shape, self._emb_table.shape[1])

    def batch(self, rows: np.ndarray) -> RankBatch:
        """Assemble the rows ``rows`` (indices into this split) into a RankBatch."""
        rows = np.sort(np.asarray(rows, dtype=np.int64))
        a = self.arrays
        req = np.asarray(a["request"][rows]).astype(np.int64)
        parts = {f: [] for f in ("item", "action", "surface")}
        for block in SequenceLayout.BLOCKS:
            src = req if block == "rt" else rows
            for f in parts:
                parts[f].append(np.asarray(a[f"{block}_{f}"][src]))
        seq_item = torch.from_numpy(np.concatenate(parts["item"], axis=1).astype(np.int64))
        item = torch.from_numpy(np.asarray(a["item"][rows]).astype(np.int64))
        pos_item = torch.from_numpy(np.asarray(a["nal_pos_item"][req]).astype(np.int64))
        neg_item = torch.from_numpy(np.asarray(a["nal_neg_item"][req]).astype(np.int64))
        user = np.asarray(a["user_id"][rows]).astype(np.int64)
        return RankBatch(
            user_id=torch.from_numpy(user),
            item_id=self.item_id[item],
            author_id=self.item_author[item],
            topic_id=self.item_topic[item],
            surface=torch.from_numpy(np.asarray(a["surface"][rows]).astype(np.int64)),
            cand_emb=self.item_emb[item],
            seq_emb=self._emb(seq_item),
            seq_item=torch.where(seq_item >= 0, self.item_id[seq_item.clamp_min(0)], -1),
            seq_action=torch.from_numpy(np.concatenate(parts["action"], axis=1).astype(np.int64)),
            seq_surface=torch.from_numpy(np.concatenate(parts["surface"], axis=1).astype(np.int64)),
            seq_valid=seq_item >= 0,
            nal_pos_emb=self._emb(pos_item),
            nal_pos_item=torch.where(pos_item >= 0, self.item_id[pos_item.clamp_min(0)], -1),
            nal_pos_valid=pos_item >= 0,
            nal_neg_emb=self._emb(neg_item),
            nal_neg_item=torch.where(neg_item >= 0, self.item_id[neg_item.clamp_min(0)], -1),
            nal_neg_valid=neg_item >= 0,
            labels=torch.from_numpy(np.asarray(a["labels"][rows]).astype(np.float32)),
            request_id=torch.from_numpy(np.asarray(a["req_id"][req]).astype(np.int64)),
            user_emb=None if self._users is None else self._user_embedding(user),
            counters=torch.from_numpy(np.asarray(a["counters"][rows], dtype=np.float32)) if "counters" in a else None,
        )

