"""Document filters: each rule just inside and just outside its published threshold, stats, robustness."""

import random
import string

import pytest

from nanoforge.data.documents import Document
from nanoforge.data.filters import (
    C4Filter,
    FineWebQualityFilter,
    GopherQualityFilter,
    GopherRepetitionFilter,
    HarmfulContentFilter,
    LanguageFilter,
    detect_language,
    load_list,
)
from nanoforge.data.pii import PIIRedactor
from nanoforge.errors import NanoforgeError


def rand_words(n: int, seed: int = 0, length: int = 5) -> list[str]:
    """n distinct lowercase words of `length` letters (no stop words: they are random letters)."""
    rng = random.Random(seed)
    out: list[str] = []
    seen: set[str] = set()
    while len(out) < n:
        w = "".join(rng.choice(string.ascii_lowercase) for _ in range(length))
        if w not in seen:
            seen.add(w)
            out.append(w)
    return out


def doc(text: str, url: str = "", id: str = "d") -> Document:
    return Document(id, text, url)


# ------------------------------------------------------------------------------------- Gopher quality

def gq_words(n: int) -> list[str]:
    return ["the", "and"] + rand_words(n - 2)


def test_gopher_word_count_bounds():
    f = GopherQualityFilter()
    assert f.keep(doc(" ".join(gq_words(50)))) == (True, None)
    assert f.keep(doc(" ".join(gq_words(49)))) == (False, "gopher_short_doc")
    assert f.keep(doc(" ".join(gq_words(100_000)))) == (True, None)
    assert f.keep(doc(" ".join(gq_words(100_001)))) == (False, "gopher_long_doc")


def test_gopher_mean_word_length():
    f = GopherQualityFilter()
    assert f.keep(doc(" ".join(["the", "and"] * 50))) == (True, None)  # mean exactly 3.0
    assert f.keep(doc(" ".join(["the", "and"] * 49 + ["the", "a1"]))) == (False, "gopher_below_avg_word_length")
    long10 = rand_words(47, length=10)
    assert f.keep(doc(" ".join(["the", "and", *long10, "x" * 24]))) == (True, None)  # 500 / 50 = 10.0
    assert f.keep(doc(" ".join(["the", "and", *long10, "x" * 25]))) == (False, "gopher_above_avg_word_length")


def test_gopher_stop_words_are_counted_once_each():
    """The paper asks for "at least two of the following words": "the" ten times is one of them."""
    f = GopherQualityFilter()
    words = rand_words(60, length=5)
    assert f.keep(doc(" ".join([*words, *["the"] * 10]))) == (False, "gopher_enough_stop_words")
    assert f.keep(doc(" ".join([*words, "The", "and."]))) == (True, None)  # any case, punctuation stripped


@pytest.mark.parametrize("mark,reason", [("#", "gopher_too_many_hashes"), ("...", "gopher_too_many_ellipsis")])
def test_gopher_symbol_ratio(mark, reason):
    f = GopherQualityFilter()
    words = gq_words(100)

    def with_marks(k):
        return " ".join(("#" + w if mark == "#" else w + mark) if 2 <= i < 2 + k else w for i, w in enumerate(words))

    assert f.keep(doc(with_marks(10))) == (True, None)  # 10 / 100 = 0.1
    assert f.keep(doc(with_marks(11))) == (False, reason)


def test_gopher_bullets_and_end_ellipsis():
    f = GopherQualityFilter()
    lines = [" ".join(["the", "and", *rand_words(8, seed=i)]) for i in range(10)]
    bullets = lambda k: "\n".join(("- " + ln if i < k else ln) for i, ln in enumerate(lines))  # noqa: E731
    assert f.keep(doc(bullets(9))) == (True, None)
    assert f.keep(doc(bullets(10))) == (False, "gopher_too_many_bullets")
    ellipsis = lambda k: "\n".join((ln + "..." if i < k else ln) for i, ln in enumerate(lines))  # noqa: E731
    assert f.keep(doc(ellipsis(3))) == (True, None)
    assert f.keep(doc(ellipsis(4))) == (False, "gopher_too_many_end_ellipsis")


def test_gopher_alpha_and_stop_words():
    f = GopherQualityFilter()
    words = gq_words(100)
    numeric = lambda k: " ".join("12345" if 2 <= i < 2 + k else w for i, w in enumerate(words))  # noqa: E731
    assert f.keep(doc(numeric(20))) == (True, None)
    assert f.keep(doc(numeric(21))) == (False, "gopher_below_alpha_threshold")
    assert f.keep(doc(" ".join(["with", *rand_words(99)]))) == (False, "gopher_enough_stop_words")
    assert f.keep(doc(" ".join(["with", "The,", *rand_words(98)]))) == (True, None)


# --------------------------------------------------------------------------------- Gopher repetition

def repeated(gram: list[str], k: int, n_words: int = 100) -> str:
    """k copies of `gram`, each followed by fresh random words, n_words words in all (5 letters each)."""
    filler = iter(rand_words(n_words, seed=7))
    out: list[str] = []
    for _ in range(k):
        out += gram
        out += [next(filler) for _ in range(n_words // k - len(gram))]
    out += [next(filler) for _ in range(n_words - len(out))]
    return " ".join(out)


@pytest.mark.parametrize("n,keep_k,drop_k,reason", [
    (2, 10, 11, "top_2_gram"),  # 10·10 / 500 = 0.20 vs 0.22
    (3, 6, 7, "top_3_gram"),  # 6·15 / 500 = 0.18 vs 0.21
    (4, 4, 5, "top_4_gram"),  # 4·20 / 500 = 0.16 vs 0.20
    (5, 3, 4, "duplicated_5_n_grams"),  # 3·25 / 500 = 0.15 vs 0.20
])
def test_gopher_ngram_thresholds(n, keep_k, drop_k, reason):
    f = GopherRepetitionFilter()
    gram = [w.upper() for w in rand_words(n, seed=99)]
    assert f.keep(doc(repeated(gram, keep_k))) == (True, None)
    assert f.keep(doc(repeated(gram, drop_k))) == (False, reason)


def test_gopher_duplicate_lines_and_paragraphs():
    f = GopherRepetitionFilter()
    unique = [" ".join(rand_words(12, seed=i)) for i in range(7)]
    assert f.keep(doc("\n".join(unique + ["ok fine"] * 4))) == (True, None)  # 3 repeats in 10 lines = 0.3
    assert f.keep(doc("\n".join(unique[:6] + ["ok fine"] * 5))) == (False, "dup_line_frac")  # 4 in 11 = 0.36
    paras = "\n\n".join(unique[:6] + ["ok fine"] * 5)  # 4 repeats of 11 paragraphs
    assert f.keep(doc(paras)) == (False, "dup_para_frac")
    # character fraction: one long single-word line repeated once (no n-gram repetition)
    long_word = "x" * 120
    text = "\n".join([*unique[:3], long_word, long_word])
    assert 120 / len(text) > 0.2
    assert f.keep(doc(text)) == (False, "dup_line_char_frac")
    text = "\n".join([*unique, long_word, long_word])
    assert 120 / len(text) <= 0.2
    assert f.keep(doc(text)) == (True, None)


# ------------------------------------------------------------------------------------------------ C4

SENT = "This is a perfectly ordinary sentence number {}."


def test_c4_line_rules_and_sentences():
    f = C4Filter()
    body = [SENT.format(i) for i in range(5)]
    text = "\n".join([*body[:2], "Menu", "Two words.", "Please enable JavaScript to view this page.",
                      "This site uses cookies to improve things.", "No terminal punctuation here",
                      "An ellipsis line goes on...", "A citation here.[1]", *body[2:]])
    out, reason = f.process(doc(text))
    assert reason is None
    assert out.text.split("\n") == [*body[:2], "A citation here.", *body[2:]]
    assert f.stats["modified"] == 1
    assert f.process(doc("\n".join(body)))[0].text == "\n".join(body)  # unchanged document is returned as is
    assert f.process(doc("\n".join(body[:4]) + "\nshort one"))[1] == "too_few_sentences"
    assert f.process(doc("\n".join(body) + "\nLorem ipsum dolor sit amet."))[1] == "lorem_ipsum"
    assert f.process(doc("\n".join(body) + "\nThe set {1, 2} has two elements."))[1] == "curly_bracket"
    # as C4 was built (TFDS clean_page): the document checks look at the kept lines, so code lines that the
    # line rules dropped do not drop the page, and a lorem ipsum line without a full stop neither
    code = ["function f() {", "  return 1;", "}", "Lorem ipsum dolor sit amet"]
    assert f.process(doc("\n".join([*body, *code])))[0].text == "\n".join(body)
    # every kept line is at least one sentence (TFDS counts sentences line by line): a line ending in a quote
    quoted = [f"Then the number {i} of them went 'home'" for i in range(5)]
    assert f.process(doc("\n".join(quoted)))[1] is None
    assert f.process(doc("\n".join(quoted[:4])))[1] == "too_few_sentences"


# ------------------------------------------------------------------------------------------- FineWeb

def fw_lines(n: int, punct: int, short: int) -> list[str]:
    """n unique lines; the first `punct` end in '.', the last `short` are ≤ 30 characters."""
    lines = []
    for i in range(n):
        ws = rand_words(3 if i >= n - short else 8, seed=1000 + i)
        lines.append(" ".join(ws) + ("." if i < punct else ""))
    return lines


def test_fineweb_punctuation_and_short_lines():
    f = FineWebQualityFilter()
    assert f.keep(doc("\n".join(fw_lines(100, 12, 0)))) == (True, None)
    assert f.keep(doc("\n".join(fw_lines(100, 11, 0)))) == (False, "line_punct_ratio")
    # short lines: 3 words of 5 letters = 17 chars; keep every line long enough in words for the list ratio
    assert f.keep(doc("\n".join(fw_lines(100, 100, 67)))) == (True, None)
    assert f.keep(doc("\n".join(fw_lines(100, 100, 68)))) == (False, "short_line_ratio")


def test_fineweb_line_ends_are_datatroves_stop_chars():
    f = FineWebQualityFilter()
    for end in (":", ";", "\u2026", "\u201d", "\u2019", "\u3002"):  # not in (".", "'", '"', "!", "?")
        assert f.keep(doc("\n".join(line + end for line in fw_lines(100, 0, 0)))) == (False, "line_punct_ratio")
    for end in (".", "'", '"', "!", "?"):
        assert f.keep(doc("\n".join(line + end for line in fw_lines(100, 0, 0)))) == (True, None)


def test_fineweb_duplicate_chars_and_list_ratio():
    f = FineWebQualityFilter()
    lines = fw_lines(100, 100, 0)
    chars = sum(len(ln) for ln in lines)
    dup = "z" * (chars // 100 - 2) + "."  # just under 1 % of the characters
    assert f.keep(doc("\n".join([*lines, dup, dup]))) == (True, None)
    dup = "z" * (chars // 100 + 10) + "."
    assert f.keep(doc("\n".join([*lines, dup, dup]))) == (False, "char_dup_ratio")
    # words as a word tokenizer counts them, the full stop one too: 3 per line, 0.33 newlines per word
    long2 = [" ".join(rand_words(2, seed=i, length=16)) + "." for i in range(50)]
    assert f.keep(doc("\n".join(long2))) == (False, "list_ratio")
    long3 = [" ".join(rand_words(3, seed=i, length=12)) + "." for i in range(50)]  # 4 per line: 0.245
    assert f.keep(doc("\n".join(long3))) == (True, None)
    long4 = [" ".join(rand_words(4, seed=i, length=12)) + "." for i in range(50)]  # 0.245
    assert f.keep(doc("\n".join(long4))) == (True, None)


# ------------------------------------------------------------------------------------------ language

EN = ("The committee met on Tuesday to discuss the new budget, and the members agreed that the proposal "
      "should be revised before the next meeting.")
FR = "Le comité s'est réuni mardi pour discuter du nouveau budget, et les membres ont convenu de le réviser."
DE = "Der Ausschuss traf sich am Dienstag, um den neuen Haushalt zu besprechen, und der Vorschlag wird überarbeitet."


def test_language_filter_keeps_english_drops_french_german():
    f = LanguageFilter()
    out = f(doc(EN))
    assert out is not None and out.meta["language"] == "en" and float(out.meta["language_score"]) >= 0.65
    assert f.process(doc(FR))[1] == "language_not_kept"
    assert f.process(doc(DE))[1] == "language_not_kept"
    assert LanguageFilter(languages=["en", "fr"])(doc(FR)).meta["language"] == "fr"
    assert f.stats["dropped/language_not_kept"] == 2


def test_language_threshold():
    _, score = detect_language(EN)
    assert LanguageFilter(threshold=score - 0.01)(doc(EN)) is not None
    assert LanguageFilter(threshold=score + 0.01).process(doc(EN))[1] == "language_low_score"
    assert LanguageFilter().process(doc("  \n "))[1] == "empty"


# ----------------------------------------------------------------------------------- harmful content

def test_domain_blocklist_with_subdomains(tmp_path):
    lst = tmp_path / "domains.txt"
    lst.write_text("# comment\n\nBlocked.example  # trailing comment\n")
    f = HarmfulContentFilter(domains_file=lst, hard_words_file=None, soft_words_file=None)
    assert f.blocked_domain("https://blocked.example/page")
    assert f.blocked_domain("http://a.b.blocked.example:8080/x?q=1")
    assert f.blocked_domain("BLOCKED.EXAMPLE/path")
    assert not f.blocked_domain("https://notblocked.example/")
    assert not f.blocked_domain("https://blocked.example.org/")
    assert not f.blocked_domain("http://[bad")
    assert f.keep(doc("text", url="https://www.blocked.example/")) == (False, "blocked_domain")


def test_banned_words_hard_soft_and_classifier():
    f = HarmfulContentFilter(domains_file=None, hard_words_file=None, soft_words_file=None,
                             hard_words=["badword", "very bad phrase"], soft_words=["spam", "cheap pills"])
    assert f.keep(doc("A BadWord appears.")) == (False, "banned_word_hard")
    assert f.keep(doc("It was a very bad phrase.")) == (False, "banned_word_hard")
    assert f.keep(doc("badwords and unbadword are other words")) == (True, None)  # whole words only
    assert f.keep(doc("spam spam and cheap pills")) == (False, "banned_words_soft")  # 3 hits
    assert f.keep(doc("spam and cheap pills, spammer")) == (True, None)  # 2 hits
    strict = HarmfulContentFilter(domains_file=None, hard_words_file=None, soft_words_file=None,
                                  classifier=lambda d: 0.9 if "toxic" in d.text else 0.1, classifier_threshold=0.8)
    assert strict.keep(doc("toxic")) == (False, "classifier")
    assert strict.keep(doc("fine")) == (True, None)


def test_default_lists_load_and_missing_file():
    f = HarmfulContentFilter()
    assert f.blocked_domain("http://sub.blocked.test/")
    assert f.keep(doc("casino jackpot casino")) == (False, "banned_words_soft")
    assert all(e and not e.startswith("#") for e in load_list(f.soft_words_file))
    with pytest.raises(NanoforgeError, match="cannot read list file"):
        HarmfulContentFilter(domains_file="/nonexistent/domains.txt")


# ------------------------------------------------------------------------------ stats and robustness

def test_stats_counts_and_examples():
    f = GopherQualityFilter(max_examples=2)
    good = " ".join(gq_words(60))
    docs = [doc(good, id="g1"), doc("too short", id="s1", url="u1"), doc("x" * 500, id="s2"),
            doc("short again", id="s3"), doc(good, id="g2")]
    dropped: list[tuple[str, str]] = []
    kept = list(f.run(docs, on_drop=lambda d, r: dropped.append((d.id, r))))
    assert [d.id for d in kept] == ["g1", "g2"]
    assert dropped == [("s1", "gopher_short_doc"), ("s2", "gopher_short_doc"), ("s3", "gopher_short_doc")]
    assert f.stats["kept"] == 2 and f.stats["dropped"] == 3 and f.stats["dropped/gopher_short_doc"] == 3
    ex = f.examples["gopher_short_doc"]
    assert len(ex) == 2 and ex[0] == {"id": "s1", "url": "u1", "text": "too short"} and len(ex[1]["text"]) == 200
    rep = f.report()
    assert rep["step"] == "gopher_quality" and rep["reasons"] == {"gopher_short_doc": 3} and rep["kept"] == 2


def test_error_in_step_drops_with_reason():
    f = HarmfulContentFilter(domains_file=None, hard_words_file=None, soft_words_file=None,
                             classifier=lambda d: 1 / 0)
    assert f.process(doc("anything")) == (None, "error:ZeroDivisionError")
    assert f.stats["dropped/error:ZeroDivisionError"] == 1


ALL_STEPS = [GopherQualityFilter, GopherRepetitionFilter, C4Filter, FineWebQualityFilter, LanguageFilter,
             HarmfulContentFilter, PIIRedactor]


@pytest.mark.parametrize("text", ["", " \n\n ", "\ud800 lone \udfff surrogates \ud83d", "\x00\u200b\ufeff\u202e",
                                  "é" * 10 + "\n" * 1000])
def test_odd_inputs_never_crash(text):
    for cls in ALL_STEPS:
        step = cls()
        out, reason = step.process(doc(text))
        assert (out is None) == (reason is not None)
        assert reason is None or not reason.startswith("error:"), (cls.__name__, reason)


def test_huge_document_is_bounded():
    """A ~100 MB document gets a decision from every filter (work is capped at `max_chars`)."""
    big = doc("lorem word 12. " * 7_000_000)
    reasons = {cls.__name__: cls().process(big)[1] for cls in ALL_STEPS[:-1]}
    assert reasons == {"GopherQualityFilter": "gopher_too_long", "GopherRepetitionFilter": "top_2_gram",
                       "C4Filter": "c4_too_long", "FineWebQualityFilter": "line_punct_ratio",
                       "LanguageFilter": "language_low_score", "HarmfulContentFilter": None}
