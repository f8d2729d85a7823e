"""The tokenizer stage and `Tokenizer`: lossless round trips, fixed special ids, the tiktoken fast path
proven equal to `tokenizers` (and refused when it is not), `transformers` loading, chat masks, errors."""

from __future__ import annotations

import json
import pickle
import random
from pathlib import Path

import numpy as np
import pytest
import tiktoken
from tokenizers import Regex, decoders, models, pre_tokenizers
from tokenizers import Tokenizer as HFTokenizer

from nanoforge.errors import NanoforgeError
from nanoforge.tokenizer import (
    SPECIAL_TOKENS,
    SPLIT_PATTERN,
    Tokenizer,
    TokenizerConfig,
    _tiktoken_encoding,
    doc_fraction,
    text_key,
    train_tokenizer,
)

ODD_TEXTS = [
    "",
    "Hello, world! It's 2024; we'll see.",
    "emoji 🎉👩‍👩‍👧 flags 🇫🇷 and skin tones 👍🏽",
    "CJK 日本語のテキスト，中文标点。한국어",
    "combining e\u0301 a\u0308 \u0915\u094d\u0937 and Arabic مرحبا بالعالم",
    "NUL \x00 bell \x07 DEL \x7f tabs\t\tCRLF\r\n\r\nlone CR\r trailing spaces   ",
    "\ufeffBOM, zero-width\u200bspace, private use \ue000, max BMP \uffff, astral \U0010fffd",
    "specials as text: <|bos|><|user_start|>hi<|user_end|><|assistant_end|> <|unk|>",
    "numbers 1234567890 3.14159 -0x1F",
    "    indented code:\n        return x  # comment\n\n\n",
]


def _words(rng: random.Random, n: int) -> list[str]:
    syllables = ["ka", "to", "ri", "mu", "sen", "dal", "or", "ph", "qu", "ex", "ing", "tion", "a", "e"]
    return ["".join(rng.choice(syllables) for _ in range(rng.randint(1, 4))) for _ in range(n)]


def make_corpus(path: Path, n_docs: int = 160, seed: int = 0) -> list[str]:
    """A JSONL corpus (~250 KB) of random sentences with some Unicode mixed in; returns the texts."""
    rng = random.Random(seed)
    vocab = _words(rng, 400) + ["naïve", "café", "日本", "語", "Привет", "🎉", "ü", "ß", "東京"]
    texts = []
    for i in range(n_docs):
        sentences = []
        for _ in range(rng.randint(5, 25)):
            words = rng.choices(vocab, k=rng.randint(3, 12))
            sentences.append(" ".join(words).capitalize() + rng.choice([".", "!", "?", ",", ";"]))
        texts.append(f"Document {i}.\n" + " ".join(sentences) + rng.choice(["\n", "\n\n", ""]))
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        for i, t in enumerate(texts):
            f.write(json.dumps({"id": f"doc-{i}", "text": t}) + "\n")
    return texts


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> tuple[Path, list[str]]:
    path = tmp_path_factory.mktemp("corpus") / "docs.jsonl"
    return path, make_corpus(path)


VOCAB = {"bpe": 600, "unigram": 500, "word": 300, "char": 300}


@pytest.fixture(scope="module")
def trained(corpus, tmp_path_factory) -> dict[str, tuple[Path, dict]]:
    """One small tokenizer of each kind, trained once for the module."""
    root = tmp_path_factory.mktemp("tok")
    return {kind: (root / kind, train_tokenizer(TokenizerConfig(kind=kind, vocab_size=v, min_frequency=1),
                                                corpus[0], root / kind))
            for kind, v in VOCAB.items()}


def _random_unicode(seed: int, n: int = 400) -> str:
    rng = random.Random(seed)
    out = []
    while len(out) < n:
        cp = rng.choice([rng.randint(0, 0x7F), rng.randint(0x80, 0x7FF), rng.randint(0x800, 0xFFFF),
                         rng.randint(0x10000, 0x10FFFF)])
        if not 0xD800 <= cp <= 0xDFFF:  # surrogates are not valid in a str that encodes to UTF-8
            out.append(chr(cp))
    return "".join(out)


@pytest.mark.parametrize("kind", ["bpe", "unigram", "char"])
def test_lossless_kinds_round_trip_any_text_and_never_emit_specials(trained, kind):
    tok = Tokenizer.load(trained[kind][0])
    for text in [*ODD_TEXTS, _random_unicode(1), _random_unicode(2)]:
        ids = tok.encode(text)
        assert tok.decode(ids) == text
        assert min(ids, default=len(SPECIAL_TOKENS)) >= len(SPECIAL_TOKENS)  # special text stays text
    assert tok.encode_batch(ODD_TEXTS) == [tok.encode(t) for t in ODD_TEXTS]


def test_word_kind_is_lossy_unknown_words_become_unk(trained):
    tok = Tokenizer.load(trained["word"][0])
    ids = tok.encode("Document zzqxv.\n")  # pieces "Document", " zzqxv", ".\n": the first and last are common
    assert len(ids) == 3 and ids[1] == tok.special_id("unk")
    assert tok.decode(ids) == "Document<|unk|>.\n"


@pytest.mark.parametrize("kind", list(VOCAB))
def test_special_tokens_sit_at_fixed_ids_and_stand_for_no_bytes(trained, kind):
    tok = Tokenizer.load(trained[kind][0])
    hf = HFTokenizer.from_file(str(trained[kind][0] / "tokenizer.json"))
    assert [hf.id_to_token(i) for i in range(len(SPECIAL_TOKENS))] == list(SPECIAL_TOKENS)
    assert tok.vocab_size <= VOCAB[kind] and trained[kind][1]["figures"]["vocab_size"] == tok.vocab_size
    ids = (tok.bos_id, tok.pad_id, tok.special_id("<|assistant_end|>"), tok.special_id("unk"))
    assert ids == (0, 1, 7, 8)
    tb = tok.token_bytes()
    assert tb.shape == (tok.vocab_size,) and (tb[: len(SPECIAL_TOKENS)] == 0).all()
    if kind != "word":  # byte counts of the tokens of a text add up to its UTF-8 length
        for text in ODD_TEXTS:
            assert int(tb[tok.encode(text)].sum()) == len(text.encode("utf-8"))
    with pytest.raises(NanoforgeError, match="unknown special token"):
        tok.special_id("eos")


def test_manifest_counts_documents_and_measures_held_out_text(trained, corpus):
    path, manifest = trained["bpe"]
    f = manifest["figures"]
    assert f["vocab_size"] == VOCAB["bpe"] and f["kind"] == "bpe"
    assert f["train_documents"] + f["heldout_documents"] == len(corpus[1])
    assert f["heldout_documents"] >= 1
    heldout = [t for t in corpus[1] if doc_fraction(text_key(t), 0) < 0.05]
    tok = Tokenizer.load(path)
    assert f["heldout_tokens"] == sum(len(tok.encode(t)) for t in heldout)
    assert f["bytes_per_token"] == pytest.approx(f["heldout_bytes"] / f["heldout_tokens"])


@pytest.mark.parametrize("kind", list(VOCAB))
def test_training_is_reproducible(trained, corpus, tmp_path, kind):
    path, manifest = trained[kind]
    again = train_tokenizer(TokenizerConfig(kind=kind, vocab_size=VOCAB[kind], min_frequency=1),
                            corpus[0], tmp_path / "again")
    assert (tmp_path / "again" / "tokenizer.json").read_bytes() == (path / "tokenizer.json").read_bytes()
    assert again["content_hash"] == manifest["content_hash"]


def test_tiktoken_fast_path_gives_the_hf_ids(trained, corpus):
    path = trained["bpe"][0]
    tok = Tokenizer.load(path)
    assert tok.fast
    hf = HFTokenizer.from_file(str(path / "tokenizer.json"))
    hf.encode_special_tokens = True
    texts = [*ODD_TEXTS, _random_unicode(3, 3000), *corpus[1][:20]]
    assert tok.encode_batch(texts) == [hf.encode(t, add_special_tokens=False).ids for t in texts]
    clone = pickle.loads(pickle.dumps(tok))  # how the tokenize workers receive it
    assert clone.fast and clone.encode_batch(texts) == tok.encode_batch(texts)


def _divergent_bpe(path: Path) -> HFTokenizer:
    """A byte-level BPE where tiktoken and tokenizers disagree on "abc".

    Merges in rank order: b+c, a+b, ab+c. tokenizers merges b+c first, then has no merge for a+bc:
    [a, bc]. tiktoken sees that "abc" is in the vocabulary and merges a+bc: [abc].
    """
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {t: i for i, t in enumerate([*SPECIAL_TOKENS, *alphabet, "bc", "ab", "abc"])}
    hf = HFTokenizer(models.BPE(vocab=vocab, merges=[("b", "c"), ("a", "b"), ("ab", "c")]))
    hf.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(SPLIT_PATTERN), "isolated"),
                                                pre_tokenizers.ByteLevel(add_prefix_space=False,
                                                                         use_regex=False)])
    hf.decoder = decoders.ByteLevel()
    hf.add_special_tokens(list(SPECIAL_TOKENS))
    path.mkdir()
    hf.save(str(path / "tokenizer.json"))
    return hf


def test_fast_path_is_refused_when_tiktoken_would_differ(tmp_path):
    hf = _divergent_bpe(tmp_path / "tok")
    hf_ids = hf.encode("abc").ids
    assert hf_ids == [hf.token_to_id("a"), hf.token_to_id("bc")]
    assert _tiktoken_encoding(hf).encode_ordinary("abc") == [hf.token_to_id("abc")]  # the trap is real
    tok = Tokenizer.load(tmp_path / "tok")
    assert not tok.fast
    assert tok.encode("abc") == hf_ids and tok.decode(tok.encode("abc xyz")) == "abc xyz"


def test_fast_path_is_refused_when_sample_text_differs(trained, monkeypatch):
    real = tiktoken.Encoding.encode_ordinary
    monkeypatch.setattr(tiktoken.Encoding, "encode_ordinary",
                        lambda self, text: real(self, text)[::-1])  # wrong on any multi-token text
    tok = Tokenizer.load(trained["bpe"][0])
    assert not tok.fast
    hf = HFTokenizer.from_file(str(trained["bpe"][0] / "tokenizer.json"))
    assert tok.encode(ODD_TEXTS[1]) == hf.encode(ODD_TEXTS[1]).ids


def test_transformers_loads_the_tokenizer(trained):
    import transformers  # a dev dependency: a missing one must fail, not skip
    path = trained["bpe"][0]
    tok = Tokenizer.load(path)
    fast = transformers.PreTrainedTokenizerFast(tokenizer_file=str(path / "tokenizer.json"))
    auto = transformers.AutoTokenizer.from_pretrained(str(path))
    texts = [t for t in ODD_TEXTS if "<|" not in t]  # transformers would read those as special tokens
    for text in texts:
        assert fast.encode(text) == tok.encode(text) == auto.encode(text)
        assert auto.decode(auto.encode(text)) == text
    assert (auto.bos_token_id, auto.eos_token_id, auto.pad_token_id, auto.unk_token_id) == (0, 0, 1, 8)


def test_render_chat_masks_only_what_the_assistant_writes(trained):
    tok = Tokenizer.load(trained["bpe"][0])
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi there"},
                {"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "Bye"},
                {"role": "assistant", "content": "Bye, café 🎉"}]
    ids, mask = tok.render_chat(messages)
    assert len(ids) == len(mask) and ids[0] == tok.bos_id
    assert tok.decode(ids) == ("<|bos|><|system_start|>Be brief.<|system_end|>"
                               "<|user_start|>Hi there<|user_end|><|assistant_start|>Hello!<|assistant_end|>"
                               "<|user_start|>Bye<|user_end|>"
                               "<|assistant_start|>Bye, café 🎉<|assistant_end|>")
    learned = [i for i, m in zip(ids, mask, strict=True) if m]
    end = tok.special_id("assistant_end")
    assert learned == [*tok.encode("Hello!"), end, *tok.encode("Bye, café 🎉"), end]
    prompt = tok.render_prompt(messages[:2])
    assert prompt == [*tok.render_chat(messages[:2])[0], tok.special_id("assistant_start")]
    with pytest.raises(NanoforgeError, match="message 1: unknown role 'tool'"):
        tok.render_chat([messages[0], {"role": "tool", "content": "x"}])


def test_bad_settings_and_corpora_are_refused_without_touching_out(corpus, tmp_path):
    out = tmp_path / "tok"
    out.mkdir()
    (out / "keep.txt").write_text("earlier artifact")
    empty = tmp_path / "empty.jsonl"
    empty.write_text('{"text": "   "}\n{"text": ""}\n')
    bad_utf8 = tmp_path / "bad.txt"
    bad_utf8.write_bytes(b"caf\xe9")
    cases = [
        (TokenizerConfig(vocab_size=264), corpus[0], "too small for kind 'bpe'.*at least 265"),
        (TokenizerConfig(kind="unigram", vocab_size=265), corpus[0], "at least 266"),
        (TokenizerConfig(kind="word", vocab_size=9), corpus[0], "at least 10"),
        (TokenizerConfig(kind="sentencepiece"), corpus[0], "unknown kind 'sentencepiece'"),
        (TokenizerConfig(), empty, "corpus is empty"),
        (TokenizerConfig(), bad_utf8, "not valid UTF-8"),
    ]
    for cfg, docs, message in cases:
        with pytest.raises(NanoforgeError, match=message):
            train_tokenizer(cfg, docs, out)
    assert [p.name for p in out.iterdir()] == ["keep.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.txt", "empty.jsonl", "tok"]  # no temp dirs


def test_a_lone_surrogate_in_jsonl_does_not_stop_training(corpus, tmp_path):
    docs = tmp_path / "docs.jsonl"  # json.dumps writes the lone surrogate as the escape "\udfff"
    docs.write_text("".join(json.dumps({"text": t + (" \udfff" if i == 3 else "")}) + "\n"
                            for i, t in enumerate(corpus[1][:20])))
    manifest = train_tokenizer(TokenizerConfig(vocab_size=265), docs, tmp_path / "tok")
    f = manifest["figures"]
    assert f["train_documents"] + f["heldout_documents"] == 20


def test_smallest_byte_level_vocabulary_is_pure_bytes(corpus, tmp_path):
    train_tokenizer(TokenizerConfig(vocab_size=265), corpus[0], tmp_path / "tok")
    tok = Tokenizer.load(tmp_path / "tok")
    text = ODD_TEXTS[2]
    assert tok.vocab_size == 265 and len(tok.encode(text)) == len(text.encode("utf-8"))
    assert np.array_equal(tok.token_bytes()[len(SPECIAL_TOKENS):], np.ones(256, dtype=np.int64))
