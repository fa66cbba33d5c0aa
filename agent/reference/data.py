"""A training corpus built on the spot from the local Python standard library's source.

Nothing is downloaded: every machine that runs Python has these files. Tokens are bytes
(vocabulary 256), so there is no tokenizer to train or ship.
"""

from __future__ import annotations

import hashlib
import os
import sysconfig
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

__all__ = ["VOCAB_SIZE", "BatchSampler", "Corpus", "build_corpus", "decode", "stdlib_files"]

VOCAB_SIZE = 256
_SKIP_DIRS = {"site-packages", "dist-packages", "__pycache__", "idlelib", "turtledemo"}


def stdlib_files(root: str | os.PathLike[str] | None = None) -> list[Path]:
    """The stdlib's *.py files (no tests, no installed packages), in a fixed, well-mixed order.

    Sorting by a hash of the relative path rather than by name spreads every package over the
    corpus, so the capped prefix and the validation tail are both a mix of the whole library.
    """
    base = Path(root or sysconfig.get_paths()["stdlib"])
    found: list[Path] = []
    for dirpath, dirnames, filenames in os.walk(base):
        dirnames[:] = [d for d in dirnames if d not in _SKIP_DIRS and not d.startswith("test")]
        found.extend(Path(dirpath, f) for f in filenames if f.endswith(".py"))

    def key(path: Path) -> str:
        return hashlib.sha1(path.relative_to(base).as_posix().encode()).hexdigest()

    return sorted(found, key=key)


@dataclass
class Corpus:
    """Byte tokens: the first part for training, the tail (other files) for validation.

    >>> corpus = build_corpus(max_bytes=200_000)
    >>> corpus.train.dtype, corpus.vocab_size, len(corpus.train) > 4 * len(corpus.val) > 0
    (torch.uint8, 256, True)
    """

    train: torch.Tensor  # (N_train,) uint8
    val: torch.Tensor  # (N_val,) uint8
    files: list[str] = field(default_factory=list)
    vocab_size: int = VOCAB_SIZE


def build_corpus(
    max_bytes: int = 4_000_000,
    val_fraction: float = 0.1,
    root: str | os.PathLike[str] | None = None,
) -> Corpus:
    """Read stdlib sources up to ``max_bytes`` and keep the last ``val_fraction`` for validation."""
    if max_bytes < 10_000:
        raise ValueError(f"corpus_bytes must be >= 10000, got {max_bytes}")
    if not 0.0 < val_fraction < 0.5:
        raise ValueError(f"val_fraction must be in (0, 0.5), got {val_fraction}")
    chunks: list[bytes] = []
    names: list[str] = []
    total = 0
    for path in stdlib_files(root):
        try:
            text = path.read_bytes()
        except OSError:  # an unreadable file is no reason to stop training
            continue
        chunks.append(text + b"\n")
        names.append(path.name)
        total += len(chunks[-1])
        if total >= max_bytes:
            break
    if total < 10_000:
        raise ValueError(f"corpus: found only {total} bytes of Python source under {root!r}")
    tokens = torch.frombuffer(bytearray(b"".join(chunks)[:max_bytes]), dtype=torch.uint8)  # (N,)
    cut = int(len(tokens) * (1.0 - val_fraction))
    return Corpus(train=tokens[:cut], val=tokens[cut:], files=names)


def decode(tokens: torch.Tensor) -> str:
    """Bytes back to text (invalid UTF-8 shown as U+FFFD)."""
    return bytes(tokens.to(torch.uint8).tolist()).decode("utf-8", errors="replace")


class BatchSampler:
    """Random windows of ``seq_len + 1`` bytes: inputs and next-byte targets, reproducible by seed.

    >>> sampler = BatchSampler(torch.arange(100, dtype=torch.uint8), batch_size=2, seq_len=4, seed=0)
    >>> x, y = sampler.sample()
    >>> x.shape, bool((y[:, :-1] == x[:, 1:]).all())
    (torch.Size([2, 4]), True)
    """

    def __init__(
        self,
        data: torch.Tensor,
        batch_size: int,
        seq_len: int,
        seed: int = 0,
        device: str | torch.device = "cpu",
    ) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if not 1 <= seq_len < len(data):
            raise ValueError(
                f"seq_len must be in [1, {len(data) - 1}] for this corpus, got {seq_len}"
            )
        self.batch_size, self.seq_len = batch_size, seq_len
        self.device = torch.device(device)
        # The corpus is a few MB: keep it on the device and gather windows there, no host copy.
        self.data = data.to(self.device)
        self.window = torch.arange(seq_len + 1, device=self.device)  # (T+1,)
        self.generator = torch.Generator().manual_seed(seed)  # CPU: same draws on every device

    def sample(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(inputs, targets), each (batch_size, seq_len) int64 on the sampler's device."""
        high = len(self.data) - self.seq_len  # last start that leaves room for the target byte
        starts = torch.randint(high, (self.batch_size, 1), generator=self.generator)  # (B, 1)
        rows = self.data[starts.to(self.device) + self.window].long()  # (B, T+1)
        return rows[:, :-1], rows[:, 1:]

    def __iter__(self) -> BatchSampler:
        return self

    def __next__(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.sample()

    def state_dict(self) -> dict[str, Any]:
        return {"generator": self.generator.get_state()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.generator.set_state(state["generator"])
