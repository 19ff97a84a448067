"""Sliding windows over a memmapped token file, the loaders built on them, and Table 1."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from .errors import SuiteError
from .files import write_atomic
from .prepare import SPLITS, load_meta


class DataSizeError(SuiteError, ValueError):
    pass


class TokenWindowDataset(Dataset):
    """Inputs of `context_length` tokens and the targets shifted by one, a window every `stride`.

    The file is memmapped: a window is read when asked for, the corpus is never copied in RAM.
    """

    def __init__(self, path: str | Path, context_length: int, stride: int):
        self.path, self.context_length, self.stride = Path(path), context_length, stride
        size = self.path.stat().st_size // 2
        self.tokens = np.memmap(self.path, dtype=np.uint16, mode="r") if size else np.zeros(0, np.uint16)
        self.n_tokens = size
        span = context_length + 1   # a window needs one more token for its last target
        self.n_windows = 0 if size < span else (size - span) // stride + 1

    def __len__(self) -> int:
        return self.n_windows

    def __getitem__(self, i: int):
        if not 0 <= i < self.n_windows:
            raise IndexError(i)
        start = i * self.stride
        chunk = torch.from_numpy(self.tokens[start:start + self.context_length + 1].astype(np.int64))
        return chunk[:-1], chunk[1:]


class EpochBatchSampler(Sampler):
    """Batches of window indices: a fresh seeded permutation per epoch (or in order), resumable.

    `set_epoch(epoch, start_batch)` makes iteration begin at batch `start_batch` of that epoch's
    order, which is how a resumed run continues exactly where it stopped.
    """

    def __init__(self, n: int, batch_size: int, shuffle: bool, seed: int, drop_last: bool):
        self.n, self.batch_size, self.shuffle, self.seed, self.drop_last = n, batch_size, shuffle, seed, drop_last
        self.epoch, self.start_batch = 0, 0

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        self.epoch, self.start_batch = epoch, start_batch

    def __len__(self) -> int:
        return self.n // self.batch_size if self.drop_last else -(-self.n // self.batch_size)

    def __iter__(self):
        if self.shuffle:
            g = torch.Generator().manual_seed(self.seed + self.epoch)
            order = torch.randperm(self.n, generator=g).tolist()
        else:
            order = list(range(self.n))
        for b in range(self.start_batch, len(self)):
            yield order[b * self.batch_size:(b + 1) * self.batch_size]


def make_dataloader(dataset: TokenWindowDataset, batch_size: int, shuffle: bool, seed: int = 123,
                    drop_last: bool = False, num_workers: int = 0, pin_memory: bool = False) -> DataLoader:
    sampler = EpochBatchSampler(len(dataset), batch_size, shuffle, seed, drop_last)
    # A generator of its own: every new iterator draws a base seed from the loader's generator, by
    # default torch's global one, which dropout also uses. Evaluations and a resumed run open
    # iterators an uninterrupted run does not, and the dropout masks after a resume would shift.
    return DataLoader(dataset, batch_sampler=sampler, num_workers=num_workers, pin_memory=pin_memory,
                      generator=torch.Generator().manual_seed(seed))


def load_splits(data_dir: str | Path, cfg, pin_memory: bool = False) -> dict[str, DataLoader]:
    """The three loaders of a prepared data folder: train shuffled (full batches only), val/test in order."""
    data_dir = Path(data_dir)
    load_meta(data_dir)  # a clear error when the data was never prepared
    loaders = {}
    for split in SPLITS:
        ds = TokenWindowDataset(data_dir / f"{split}.bin", cfg.context_length, cfg.stride)
        train = split == "train"
        if len(ds) == 0:
            raise DataSizeError(
                f"the {split} split has {ds.n_tokens:,} tokens, fewer than the {cfg.context_length + 1} "
                f"needed for one window of context_length={cfg.context_length}. Fix: use a larger "
                "corpus or a smaller context_length.")
        if train and len(ds) < cfg.batch_size:
            raise DataSizeError(
                f"the train split has {len(ds)} windows ({ds.n_tokens:,} tokens, stride {cfg.stride}), "
                f"fewer than one batch of batch_size={cfg.batch_size}. Fix: a larger corpus, a smaller "
                "batch_size or a smaller stride.")
        loaders[split] = make_dataloader(ds, cfg.batch_size, shuffle=train, seed=cfg.seed,
                                         drop_last=train, num_workers=cfg.num_workers,
                                         pin_memory=pin_memory)
    return loaders


def table1(data_dir: str | Path, cfg, loaders: dict[str, DataLoader] | None = None) -> pd.DataFrame:
    """The study's Table 1, from the files actually written and the loaders actually used."""
    meta = load_meta(data_dir)
    loaders = loaders or load_splits(data_dir, cfg)
    cols = {"train": "train", "val": "validation", "test": "test"}
    rows = {}
    for split, col in cols.items():
        ld = loaders[split]
        counts = meta["splits"][split]
        rows[col] = {"words": counts["words"], "samples": len(ld.dataset),
                     "tokens_per_sample": ld.dataset.context_length,
                     "batch_size": ld.batch_sampler.batch_size, "batches": len(ld)}
        # What the split holds: the words of each collection of the corpus.
        names = sorted({n for s in cols for n in meta["splits"][s].get("collections", {})})
        for name in names:
            rows[col][f"words: {name}"] = counts.get("collections", {}).get(name, {}).get("words", 0)
    df = pd.DataFrame(rows)
    df.index.name = "metric"
    return df


def save_table1(df: pd.DataFrame, path: str | Path) -> Path:
    return write_atomic(path, df.to_csv())
