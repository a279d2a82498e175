"""Shared fixtures for the trainer tests: one CPU thread, and a small real-text data file."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from trainer.data import builtin_corpus_text


@pytest.fixture(autouse=True)
def _one_thread():
    # Two shared cores: one thread keeps timings stable and CPU reductions in a fixed order, which the
    # bitwise comparisons (resume, base-shape equivalence) rely on.
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="session")
def corpus_text() -> str:
    """The embedded corpus, stripped (loaded once per session: ~1 s)."""
    return builtin_corpus_text()


@pytest.fixture(scope="session")
def small_text_file(tmp_path_factory, corpus_text) -> Path:
    """The first ~400 kB of the embedded corpus as a user text file: real English, fast to load."""
    path = tmp_path_factory.mktemp("data") / "small.txt"
    path.write_text(corpus_text[:400_000], encoding="utf-8")
    return path
