import json

import pytest

from nanoforge.data.stats import StatsConfig, corpus_stats, stats_table
from nanoforge.errors import NanoforgeError
from nanoforge.tokenizer import Tokenizer


def _jsonl(path, texts):
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    return path


def test_counts_tokens_with_the_tokenizer_and_projects_the_seed_figure(tiny_corpus, tiny_tokenizer, tmp_path):
    m = corpus_stats(StatsConfig(), tiny_corpus, tmp_path / "s", tiny_tokenizer)
    f = m["figures"]
    tok = Tokenizer.load(tiny_tokenizer)
    from nanoforge.data.documents import read_texts

    texts = read_texts(tiny_corpus)
    assert f["documents"] == len(texts) and f["bytes"] == sum(len(t.encode()) for t in texts)
    assert f["tokens"] == sum(len(tok.encode(t)) for t in texts) and f["tokens_measured"]
    assert f["bytes_per_token"] == pytest.approx(f["bytes"] / f["tokens"])
    # the seed's figure: 30 trillion tokens at 4 bytes/token ≈ 109 TiB (120 TB)
    p4 = f["projection_4_bytes_per_token"]
    assert p4["tb"] == pytest.approx(120.0) and p4["tib"] == pytest.approx(109.14, abs=0.01)
    assert json.loads((tmp_path / "s" / "stats.json").read_text())["tokens"] == f["tokens"]
    assert "109.1 TiB" in stats_table(f)


def test_estimates_without_a_tokenizer_and_counts_empty_documents(tmp_path):
    # a lone surrogate reads as U+FFFD (3 bytes in UTF-8), as every stage reads it
    docs = _jsonl(tmp_path / "d.jsonl", ["one two three", "   ", "\ud800 lone", "x" * 4000])
    f = corpus_stats(StatsConfig(target_tokens=1e9), docs, tmp_path / "s")["figures"]
    assert (f["documents"], f["empty_documents"]) == (3, 1)
    assert f["tokens"] == round((13 + 8 + 4000) / 4) and not f["tokens_measured"] and f["words"] == 6


def test_empty_corpus_is_refused(tmp_path):
    with pytest.raises(NanoforgeError, match="empty"):
        corpus_stats(StatsConfig(), _jsonl(tmp_path / "d.jsonl", ["", " "]), tmp_path / "s")
    assert not (tmp_path / "s").exists()
