import pytest

from model.corpus import EmptyCorpusError, build_corpus, is_val
from model.tokenizer import EOS, train_tokenizer


@pytest.mark.slow
def test_builtin_corpus_split_is_deterministic_and_disjoint():
    a, b = build_corpus(max_bytes=300_000), build_corpus(max_bytes=300_000)
    assert a.train == b.train and a.val == b.val
    assert a.train and a.val
    assert not set(a.train) & set(a.val)
    # a larger read keeps every file on the same side of the split
    bigger = build_corpus(max_bytes=600_000)
    assert set(a.val) <= set(bigger.val) and set(a.train) <= set(bigger.train)


def test_split_rule_depends_only_on_the_name():
    assert is_val("json/decoder.py") == is_val("json/decoder.py")
    names = [f"pkg/mod{i}.py" for i in range(2000)]
    share = sum(map(is_val, names)) / len(names)
    assert 0.02 < share < 0.09


@pytest.mark.parametrize("held_out", [False, True])
def test_user_files_and_single_file_split(tmp_path, held_out):
    # a single file splits 95/5 whichever side of the split its name hashes to
    name = next(n for n in (f"f{i}.txt" for i in range(1000)) if is_val((tmp_path / n).as_posix()) == held_out)
    f = tmp_path / name
    f.write_text("The quick brown fox jumps over the lazy dog. " * 200)
    c = build_corpus([f])
    assert c.train and c.val and c.val[0] in f.read_text() and c.train[0] in f.read_text()


def test_empty_corpus_is_refused(tmp_path):
    f = tmp_path / "empty.txt"
    f.write_text("   \n")
    with pytest.raises(EmptyCorpusError):
        build_corpus([f])
    with pytest.raises(FileNotFoundError):
        build_corpus([tmp_path / "nope.txt"])


def test_byte_level_bpe_round_trips_any_text():
    tok = train_tokenizer(["def add(a, b):\n    return a + b\n"] * 100, vocab_size=300)
    assert tok.get_vocab_size() <= 300 and tok.token_to_id(EOS) is not None
    for text in ["def add(a, b):\n    return a + b\n", "ünïcödé ✓ 日本語\t\x00", ""]:
        assert tok.decode(tok.encode(text).ids) == text
    assert len(tok.encode("    return a + b").ids) < len("    return a + b")  # merges learned
