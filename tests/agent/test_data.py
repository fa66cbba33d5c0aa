"""The stdlib corpus (byte tokens, fixed order, train/val split) and the seeded batch sampler."""

import doctest

import pytest
import torch

import logitwatch.agent.reference.data as data_mod
from logitwatch.agent.reference.data import BatchSampler, build_corpus, decode, stdlib_files


@pytest.fixture(scope="module")
def corpus():
    return build_corpus(max_bytes=300_000)


def test_doctests():
    assert doctest.testmod(data_mod).failed == 0


def test_stdlib_files_skip_tests_and_installed_packages():
    files = stdlib_files()
    assert len(files) > 100
    assert files == stdlib_files()  # deterministic order
    parts = {part for f in files for part in f.parts}
    assert "site-packages" not in parts and "__pycache__" not in parts
    assert not any(p.startswith("test") for f in files for p in f.parent.parts[-2:])
    assert all(f.suffix == ".py" for f in files)


def test_corpus_is_capped_split_and_reproducible(corpus):
    n = len(corpus.train) + len(corpus.val)
    assert n == 300_000
    assert len(corpus.val) == pytest.approx(0.1 * n, abs=1)
    assert corpus.train.dtype == torch.uint8 and corpus.vocab_size == 256
    again = build_corpus(max_bytes=300_000)
    assert torch.equal(again.train, corpus.train) and torch.equal(again.val, corpus.val)


def test_tokens_are_the_source_bytes(corpus):
    text = decode(corpus.train[:2000])
    assert "def " in text or "import " in text
    first = stdlib_files()[0].read_bytes()
    assert bytes(corpus.train[: len(first)].tolist()) == first


def test_own_tree(tmp_path):
    (tmp_path / "pkg").mkdir()
    (tmp_path / "site-packages").mkdir()
    (tmp_path / "test").mkdir()
    (tmp_path / "pkg" / "a.py").write_text("x = 1\n" * 3000)
    (tmp_path / "site-packages" / "b.py").write_text("SKIPPED\n" * 3000)
    (tmp_path / "test" / "c.py").write_text("SKIPPED\n" * 3000)
    (tmp_path / "notes.txt").write_text("SKIPPED\n" * 3000)
    corpus = build_corpus(max_bytes=100_000, root=tmp_path)
    assert corpus.files == ["a.py"]
    assert "SKIPPED" not in decode(torch.cat([corpus.train, corpus.val]))


def test_sampler_batches_are_shifted_windows(corpus):
    x, y = BatchSampler(corpus.train, batch_size=4, seq_len=32, seed=3).sample()
    assert x.shape == y.shape == (4, 32) and x.dtype == torch.int64
    assert torch.equal(x[:, 1:], y[:, :-1])
    assert int(x.max()) < 256


def test_sampler_is_seeded_and_resumable(corpus):
    a = BatchSampler(corpus.train, 4, 16, seed=7)
    b = BatchSampler(corpus.train, 4, 16, seed=7)
    c = BatchSampler(corpus.train, 4, 16, seed=8)
    xa, xb, xc = a.sample()[0], b.sample()[0], c.sample()[0]
    assert torch.equal(xa, xb) and not torch.equal(xa, xc)
    state = a.state_dict()
    expected = [a.sample()[0] for _ in range(3)]
    d = BatchSampler(corpus.train, 4, 16, seed=0)
    d.load_state_dict(state)
    assert all(torch.equal(d.sample()[0], e) for e in expected)


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"batch_size": 0}, "batch_size"),
        ({"seq_len": 0}, "seq_len"),
        ({"seq_len": 10**9}, "seq_len"),
    ],
)
def test_sampler_bad_values(corpus, kwargs, field):
    with pytest.raises(ValueError, match=field):
        BatchSampler(corpus.train, **{"batch_size": 2, "seq_len": 8, **kwargs})


def test_corpus_bad_values():
    with pytest.raises(ValueError, match="corpus_bytes"):
        build_corpus(max_bytes=10)
    with pytest.raises(ValueError, match="val_fraction"):
        build_corpus(val_fraction=0.9)
