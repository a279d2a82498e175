"""Synthetic tokens for benchmarks: random batches generated once on the device.

A benchmark times the training step, not data loading: `SyntheticTokens` stands in for
`trainer.data.TokenData` (same three methods), returning a batch that already lives on the device,
so the trainer's `batch.to(device)` is a no-op and nothing touches the host inside the step.
"""

from __future__ import annotations

import torch

from trainer.model import VOCAB_SIZE


class SyntheticTokens:
    """A small pool of random (batch, seq_len + 1) token batches per batch size, made on first use."""

    def __init__(self, seq_len: int, device: torch.device | str, vocab_size: int = VOCAB_SIZE, pool: int = 4,
                 seed: int = 0):
        self.seq_len, self.device, self.vocab_size, self.pool = seq_len, torch.device(device), vocab_size, pool
        self._gen = torch.Generator().manual_seed(seed)  # host generator: the global RNG stays untouched
        self._batches: dict[int, list[torch.Tensor]] = {}

    def _make(self, batch_size: int) -> list[torch.Tensor]:
        if batch_size not in self._batches:
            shape = (batch_size, self.seq_len + 1)
            self._batches[batch_size] = [
                torch.randint(self.vocab_size, shape, generator=self._gen).to(self.device) for _ in range(self.pool)
            ]
        return self._batches[batch_size]

    def batch(self, step: int, batch_size: int) -> torch.Tensor:
        """Batch `step` of the pool (cycling), already on the device."""
        return self._make(batch_size)[step % self.pool]

    # --- the TokenData interface the Trainer and the probe recorder use -------------------------------
    def train_batch(self, seed: int, step: int, batch_size: int, rank: int = 0, world: int = 1) -> torch.Tensor:
        per_rank = batch_size // world
        return self.batch(step, batch_size)[rank * per_rank : (rank + 1) * per_rank]

    def val_batches(self, n_batches: int, batch_size: int) -> list[torch.Tensor]:
        return [self.batch(i, batch_size) for i in range(n_batches)]

    def probe_batch(self, batch_size: int, seed: int = 0) -> torch.Tensor:
        # Drawn apart from the training pool, so the probe batch is never a training batch.
        gen = torch.Generator().manual_seed(1_000_003 + seed)
        return torch.randint(self.vocab_size, (batch_size, self.seq_len + 1), generator=gen).to(self.device)
