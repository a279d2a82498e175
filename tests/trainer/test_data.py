"""Byte-level data: the embedded corpus, the fixed train/val split, pure (seed, step) batches, user files."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from trainer import data
from trainer.data import DataConfig, TokenData, load_tokens
from trainer.errors import ConfigError

SEQ = 16
CHUNK = 256  # small split granularity for the synthetic token files


def identity_token_file(tmp_path, n: int, dtype=np.uint32):
    """tokens[i] == i: every window's first token *is* its start index in the file."""
    path = tmp_path / f"ids_{np.dtype(dtype).name}.bin"
    np.arange(n, dtype=dtype).tofile(path)
    return path


# --- the embedded corpus ----------------------------------------------------------------------------


def test_embedded_corpus_is_several_mb_of_plain_english(corpus_text):
    raw = corpus_text.encode("utf-8")
    assert len(raw) > 3e6
    for play in ("Hamlet", "Romeo", "Macbeth"):
        assert play in corpus_text
    assert "To be, or not to be" in corpus_text
    # Markdown markup is stripped: no bold markers, headings or hard-break trailing spaces.
    assert "**" not in corpus_text and "__" not in corpus_text
    assert not any(line.startswith("#") for line in corpus_text.splitlines())
    assert "  \n" not in corpus_text
    # Mostly letters and spaces, as English prose is.
    letters = sum(c.isalpha() or c.isspace() for c in corpus_text[:200_000])
    assert letters / 200_000 > 0.9


def test_builtin_tokens_are_the_utf8_bytes(corpus_text):
    tokens = load_tokens(DataConfig())
    assert tokens.dtype == np.uint8
    assert tokens.tobytes() == corpus_text.encode("utf-8")


# --- the split ----------------------------------------------------------------------------------------


def test_builtin_split_is_disjoint_and_fixed():
    a, b = TokenData(DataConfig(), 32), TokenData(DataConfig(), 64)
    assert not set(a.train_chunks) & set(a.val_chunks)
    n_chunks = len(a.tokens) // a.chunk
    assert sorted([*a.train_chunks, *a.val_chunks]) == [i * a.chunk for i in range(n_chunks)]
    assert 0.03 < len(a.val_chunks) / n_chunks < 0.07  # val_fraction 0.05
    # The split does not depend on the run (seq_len here; nothing takes the run's seed).
    np.testing.assert_array_equal(a.val_chunks, b.val_chunks)


def test_windows_never_leave_their_split(tmp_path):
    n = CHUNK * 40
    cfg = DataConfig(source=str(identity_token_file(tmp_path, n)), token_dtype="uint32", vocab_size=n,
                     chunk_tokens=CHUNK)
    data = TokenData(cfg, SEQ)
    val_starts = {int(s) for s in data.val_chunks}
    train_starts = {int(s) for s in data.train_chunks}

    def chunk_of(window: torch.Tensor) -> int:
        start = int(window[0])
        # The identity file makes each window a run of consecutive ids, starting at its file offset.
        assert torch.equal(window, torch.arange(start, start + SEQ + 1))
        c = start // CHUNK * CHUNK
        assert start + SEQ < c + CHUNK, "window crosses a chunk boundary"
        return c

    for step in range(50):
        for w in data.train_batch(seed=7, step=step, batch_size=8):
            assert chunk_of(w) in train_starts
    for b in data.val_batches(5, 8):
        for w in b:
            assert chunk_of(w) in val_starts
    for w in data.probe_batch(8):
        assert chunk_of(w) in val_starts


def test_val_batches_are_fixed():
    a, b = TokenData(DataConfig(), 32), TokenData(DataConfig(), 32)
    for x, y in zip(a.val_batches(3, 4), b.val_batches(3, 4)):
        assert torch.equal(x, y)
    assert torch.equal(a.probe_batch(4), b.probe_batch(4))
    assert not torch.equal(a.probe_batch(4, seed=0), a.probe_batch(4, seed=1))


# --- batches as a function of (seed, step) --------------------------------------------------------------


def test_train_batch_is_a_pure_function_of_seed_and_step(small_text_file):
    data = TokenData(DataConfig(source=str(small_text_file)), 32)
    first = data.train_batch(seed=3, step=5, batch_size=8)
    assert first.shape == (8, 33) and first.dtype == torch.int64
    # Other calls in between (and torch's global RNG) do not matter.
    data.train_batch(seed=3, step=6, batch_size=8)
    torch.manual_seed(123)
    torch.rand(10)
    assert torch.equal(data.train_batch(seed=3, step=5, batch_size=8), first)
    # A fresh instance (a resumed run) gives the same batch.
    again = TokenData(DataConfig(source=str(small_text_file)), 32)
    assert torch.equal(again.train_batch(seed=3, step=5, batch_size=8), first)
    # Different step or seed: different windows.
    assert not torch.equal(data.train_batch(seed=3, step=4, batch_size=8), first)
    assert not torch.equal(data.train_batch(seed=4, step=5, batch_size=8), first)
    # Targets are inputs shifted by one (each row is seq_len + 1 consecutive bytes of the file).
    raw = small_text_file.read_bytes()
    row = bytes(first[0].tolist())
    assert row in raw


@pytest.mark.parametrize("world", [2, 4])
def test_rank_slices_concatenate_to_the_global_batch(small_text_file, world):
    data = TokenData(DataConfig(source=str(small_text_file)), 32)
    whole = data.train_batch(seed=1, step=9, batch_size=8)
    parts = [data.train_batch(seed=1, step=9, batch_size=8, rank=r, world=world) for r in range(world)]
    assert all(p.shape == (8 // world, 33) for p in parts)
    assert torch.equal(torch.cat(parts), whole)


# --- user files ------------------------------------------------------------------------------------------


def test_user_text_file(tmp_path):
    text = "ab\u00e9c\n" * 5000  # non-ASCII: tokens are UTF-8 bytes
    path = tmp_path / "t.txt"
    path.write_text(text, encoding="utf-8")
    data = TokenData(DataConfig(source=str(path), chunk_tokens=CHUNK), SEQ)
    assert data.tokens.tobytes() == text.encode("utf-8")
    assert int(data.tokens.max()) == 0xC3  # first byte of é
    assert data.train_batch(0, 0, 4).max() < 256


@pytest.mark.parametrize(("dtype", "n"), [(np.uint16, 60_000), (np.uint32, 70_000)])
def test_token_files(tmp_path, dtype, n):
    path = identity_token_file(tmp_path, n, dtype)
    cfg = DataConfig(source=str(path), token_dtype=np.dtype(dtype).name, vocab_size=n, chunk_tokens=CHUNK)
    data = TokenData(cfg, SEQ)
    assert isinstance(data.tokens, np.memmap) and data.tokens.dtype == dtype and len(data.tokens) == n
    b = data.train_batch(seed=0, step=0, batch_size=4)
    assert b.dtype == torch.int64 and int(b.max()) < n
    assert torch.equal(b[:, 1:] - b[:, :-1], torch.ones(4, SEQ, dtype=torch.int64))


# --- bad input ------------------------------------------------------------------------------------------


def test_missing_file(tmp_path):
    missing = tmp_path / "nope.txt"
    with pytest.raises(ConfigError, match="nope.txt"):
        TokenData(DataConfig(source=str(missing)), SEQ)


def test_directory_is_not_a_file(tmp_path):
    with pytest.raises(ConfigError, match=str(tmp_path)):
        TokenData(DataConfig(source=str(tmp_path)), SEQ)


@pytest.mark.parametrize("token_dtype", ["", "uint16"])
def test_empty_file(tmp_path, token_dtype):
    path = tmp_path / "empty.bin"
    path.write_bytes(b"")
    with pytest.raises(ConfigError, match="empty.bin"):
        TokenData(DataConfig(source=str(path), token_dtype=token_dtype), SEQ)


def test_too_small_file(tmp_path):
    path = tmp_path / "small.txt"
    path.write_text("x" * 10_000)  # one 8192-token chunk: no room for a validation chunk
    with pytest.raises(ConfigError) as err:
        TokenData(DataConfig(source=str(path)), SEQ)
    assert "small.txt" in str(err.value) and "10000" in str(err.value) and "16384" in str(err.value)


def test_seq_len_larger_than_chunk_grows_the_chunk(tmp_path):
    # chunk = max(chunk_tokens, 4·(seq_len+1)): a long context still gets whole windows.
    path = tmp_path / "t.txt"
    path.write_text("y" * 50_000)
    data = TokenData(DataConfig(source=str(path), chunk_tokens=CHUNK), 1023)
    assert data.chunk == 4096
    assert data.train_batch(0, 0, 2).shape == (2, 1024)


def test_token_id_outside_vocab(tmp_path):
    path = tmp_path / "toks.bin"
    tokens = np.arange(20_000, dtype=np.uint16) % 300
    tokens[1234] = 4321
    tokens.tofile(path)
    with pytest.raises(ConfigError) as err:
        TokenData(DataConfig(source=str(path), token_dtype="uint16", vocab_size=300), SEQ)
    assert "4321" in str(err.value) and "300" in str(err.value)


def test_text_bytes_outside_vocab(small_text_file):
    with pytest.raises(ConfigError) as err:
        TokenData(DataConfig(source=str(small_text_file), vocab_size=100), SEQ)
    assert "100" in str(err.value)


def test_token_id_equal_to_vocab_size_is_rejected(tmp_path):
    path = tmp_path / "toks.bin"
    (np.arange(20_000, dtype=np.uint32) % 257).tofile(path)  # max id 256 with vocab 256
    with pytest.raises(ConfigError, match="256"):
        TokenData(DataConfig(source=str(path), token_dtype="uint32"), SEQ)


def test_truncated_token_file(tmp_path):
    path = tmp_path / "odd.bin"
    path.write_bytes(b"\x01\x00\x02\x00\x03")  # 5 bytes: not a whole number of uint16
    with pytest.raises(ConfigError, match="odd.bin"):
        TokenData(DataConfig(source=str(path), token_dtype="uint16"), SEQ)


def test_unknown_token_dtype(tmp_path):
    path = identity_token_file(tmp_path, 1000)
    with pytest.raises(ConfigError, match="int8"):
        TokenData(DataConfig(source=str(path), token_dtype="int8"), SEQ)


# --- the parsed corpus, cached on disk ----------------------------------------------------------------


@pytest.fixture
def corpus_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("COMPLETEP_CACHE", str(tmp_path / "cache"))
    data.builtin_tokens.cache_clear()
    yield tmp_path / "cache"
    data.builtin_tokens.cache_clear()  # the next test reads the real cache (or parses) again


def test_corpus_cache_is_written_read_and_replaced_when_unreadable(corpus_cache, corpus_text):
    expected = np.frombuffer(corpus_text.encode("utf-8"), dtype=np.uint8)
    first = data.builtin_tokens()
    (cached,) = corpus_cache.glob("corpus-*.npy")
    assert np.array_equal(first, expected) and np.array_equal(np.load(cached), expected)
    # A later process reads the file (shown by planting other bytes under its name) ...
    np.save(cached, expected[:1000])
    data.builtin_tokens.cache_clear()
    second = data.builtin_tokens()
    assert np.array_equal(second, expected[:1000]) and not second.flags.writeable
    # ... and a damaged file is parsed again and rewritten, never trusted.
    cached.write_bytes(b"not an npy file")
    data.builtin_tokens.cache_clear()
    assert np.array_equal(data.builtin_tokens(), expected) and np.array_equal(np.load(cached), expected)


def test_corpus_cache_file_changes_with_the_rules(corpus_cache, monkeypatch):
    before = data._corpus_cache_path()
    monkeypatch.setattr(data, "CORPUS_CACHE_VERSION", data.CORPUS_CACHE_VERSION + 1)
    assert data._corpus_cache_path() != before
    monkeypatch.setattr(data, "_MARKDOWN", data._MARKDOWN[:-1])
    assert data._corpus_cache_path() != before and before.parent == corpus_cache
