"""Train and load the tokenizer: byte-level BPE by default, or Unigram, whole words or characters.

    nanoforge tokenizer train docs/ --vocab-size 4096 --out tok/
    tok = Tokenizer.load("tok/"); ids = tok.encode("hello"); tok.decode(ids) == "hello"

The artifact is a `tokenizer.json` (HF `tokenizers`) with `tokenizer_config.json` and
`special_tokens_map.json` beside it, so `transformers.AutoTokenizer.from_pretrained("tok/")` loads it with
bos/eos/pad set, plus `heldout_sample.jsonl` (a little held-out text the fast path is checked on).

Special tokens sit at fixed ids 0..8 in every vocabulary, in this order:

    0 <|bos|>              begins every document; also the end-of-text / separator token
    1 <|pad|>              padding
    2 <|system_start|>     3 <|system_end|>       a system message
    4 <|user_start|>       5 <|user_end|>         a user message
    6 <|assistant_start|>  7 <|assistant_end|>    an assistant message (the end marks the turn's end)
    8 <|unk|>              a word outside the vocabulary (used only by `kind="word"`)

Text that happens to contain "<|bos|>" is encoded as ordinary text, never as the special token, so a
document cannot forge a chat turn; specials enter only through `render_chat` or by id.

Kinds. All of them cut text into pieces with a regex (GPT-4's cl100k split; single code points for
`char`) and map each piece to a byte-level string (each byte one printable character), so the
vocabulary is made of byte strings:

- `bpe`: byte-level BPE over all 256 bytes; any byte sequence round-trips.
- `unigram`: a Unigram language model over the same byte-level pieces; the 256 bytes are always in
  the vocabulary, so it is lossless too.
- `word`: one token per whole piece (a word with its leading space, a run of digits, punctuation …);
  pieces outside the vocabulary become `<|unk|>`. Lossy: `decode(encode(s))` writes "<|unk|>" there.
- `char`: one token per Unicode character. It is BPE whose pre-tokens are single code points, so no
  merge crosses a character boundary: the most frequent characters become whole tokens, a rare one is
  spelled as its UTF-8 bytes (occasionally a frequent byte pair of it), and the round trip is lossless.

Fast path. `tokenizers` merges a pair by the rank of the *merge*, tiktoken by the rank of the merged
*token*; for a BPE trained here the two agree except in rare corner cases, and tiktoken is several
times faster. So `Tokenizer` builds a `tiktoken.Encoding` with the same ids and regex and uses it only
after checking, on every vocabulary entry and on sample text, that both give identical ids; otherwise it
stays on `tokenizers` (`tok.fast` says which). `nanoforge tokenize` checks the corpus's first documents
too.
"""

from __future__ import annotations

import hashlib
import json
import sys
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import tiktoken
from tokenizers import Regex, decoders, models, pre_tokenizers, trainers
from tokenizers import Tokenizer as HFTokenizer

from nanoforge.artifacts import atomic_dir, atomic_write_json, write_manifest
from nanoforge.data.documents import iter_documents
from nanoforge.errors import NanoforgeError

SPECIAL_TOKENS: tuple[str, ...] = (
    "<|bos|>", "<|pad|>", "<|system_start|>", "<|system_end|>", "<|user_start|>", "<|user_end|>",
    "<|assistant_start|>", "<|assistant_end|>", "<|unk|>",
)
KINDS = ("bpe", "unigram", "word", "char")
# GPT-4's split: contractions, words with one leading non-letter, numbers of ≤3 digits, punctuation
# runs, newlines, and whitespace that leaves its last space to the next word.
SPLIT_PATTERN = (r"'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]++[\r\n]*"
                 r"|\s*[\r\n]|\s+(?!\S)|\s+")
CHAR_PATTERN = r"[\s\S]"  # exactly one code point (`.` would not match a newline)
HELDOUT_SAMPLE = "heldout_sample.jsonl"
_SAMPLE_BYTES = 64 << 10  # held-out text shipped with the tokenizer for the fast-path check at load
_ROLES = {"system": ("<|system_start|>", "<|system_end|>"), "user": ("<|user_start|>", "<|user_end|>"),
          "assistant": ("<|assistant_start|>", "<|assistant_end|>")}


@dataclass
class TokenizerConfig:
    """What `nanoforge tokenizer train` builds: kind, size, and which text it learns from."""

    kind: str = "bpe"  # bpe | unigram | word | char
    vocab_size: int = 4096  # including the special tokens
    heldout_fraction: float = 0.05  # documents held out to measure bytes/token
    max_train_bytes: int | None = 1 << 30  # training text beyond this is not read (None: all)
    max_heldout_bytes: int = 16 << 20  # held-out text measured, at most
    min_frequency: int = 2  # a merge (bpe, char) or word (word) must occur this often
    seed: int = 0  # picks the held-out documents


def doc_fraction(doc_id: str, seed: int) -> float:
    """A number in [0, 1) fixed by a document's id and a seed: below a split's fraction → that split.

    Hashing the id (not the position) keeps a document on the same side when the corpus grows.
    """
    digest = hashlib.blake2b(f"{seed}\0{doc_id}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") / 2**64


def text_key(text: str) -> str:
    """The key that puts a corpus document on a side of a split (`doc_fraction(text_key(text), seed)`): its
    text's hash. A document id names one fetch (URL and date), so a page crawled again, or the demo's site
    served on another port, would move sides; the text stays, and equal texts never straddle the split."""
    return hashlib.blake2b(text.encode("utf-8"), digest_size=16).hexdigest()


def _byte_to_char() -> dict[int, str]:
    """The byte-level alphabet: each byte as one printable character (the GPT-2 convention HF uses).

    Printable Latin-1 bytes stand for themselves; the others (controls, space, …) are shifted to
    code points 256 and up, in byte order.
    """
    printable = [*range(0x21, 0x7F), *range(0xA1, 0xAD), *range(0xAE, 0x100)]
    table = {b: chr(b) for b in printable}
    shifted = 0
    for b in range(256):
        if b not in table:
            table[b] = chr(256 + shifted)
            shifted += 1
    return table


_CHAR_TO_BYTE = {c: b for b, c in _byte_to_char().items()}


def _piece_bytes(piece: str) -> bytes:
    """The raw bytes a byte-level vocabulary entry stands for."""
    return bytes(_CHAR_TO_BYTE[c] for c in piece)


def _check_config(cfg: TokenizerConfig) -> None:
    if cfg.kind not in KINDS:
        raise NanoforgeError(f"tokenizer: unknown kind {cfg.kind!r} (expected one of {', '.join(KINDS)})")
    # unigram needs one piece beyond the bytes (at exactly 265, tokenizers' trainer overshoots the size)
    floor = len(SPECIAL_TOKENS) + {"word": 1, "unigram": 257}.get(cfg.kind, 256)
    if cfg.vocab_size < floor:
        what = {"word": "one word", "unigram": "the 256 bytes + one piece"}.get(cfg.kind, "the 256 bytes")
        raise NanoforgeError(f"tokenizer: vocab_size {cfg.vocab_size} is too small for kind {cfg.kind!r}: "
                             f"it needs at least {floor} ({len(SPECIAL_TOKENS)} special tokens + {what})")
    if cfg.vocab_size > 1 << 31:
        raise NanoforgeError(f"tokenizer: vocab_size {cfg.vocab_size} is larger than 2^31")
    if not 0.0 <= cfg.heldout_fraction < 1.0:
        raise NanoforgeError(f"tokenizer: heldout_fraction must be in [0, 1), got {cfg.heldout_fraction}")


def _new_hf_tokenizer(cfg: TokenizerConfig) -> tuple[HFTokenizer, Any]:
    """An untrained HF tokenizer of `cfg.kind` and the trainer that fills it."""
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    common = {"vocab_size": cfg.vocab_size, "special_tokens": list(SPECIAL_TOKENS),
              "show_progress": sys.stderr.isatty()}  # its bars print blank lines into logs
    if cfg.kind in ("bpe", "char"):
        tok = HFTokenizer(models.BPE())
        trainer = trainers.BpeTrainer(min_frequency=cfg.min_frequency, initial_alphabet=alphabet, **common)
    elif cfg.kind == "unigram":
        tok = HFTokenizer(models.Unigram())
        trainer = trainers.UnigramTrainer(unk_token="<|unk|>", initial_alphabet=alphabet, **common)
    else:
        tok = HFTokenizer(models.WordLevel(unk_token="<|unk|>"))
        trainer = trainers.WordLevelTrainer(min_frequency=cfg.min_frequency, **common)
    pattern = CHAR_PATTERN if cfg.kind == "char" else SPLIT_PATTERN
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(pattern), behavior="isolated"),
        # the regex already split the text: ByteLevel only maps bytes to its printable alphabet
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    return tok, trainer


def _split_corpus(cfg: TokenizerConfig, docs: Path) -> tuple[list[str], list[str]]:
    """Training and held-out texts, held-out documents picked by `doc_fraction(text_key(text), seed)`.

    With two or more documents at least one is held out (the one with the lowest fraction), so
    bytes/token is always measured on text the tokenizer did not see.
    """
    train: list[str] = []
    fracs: list[float] = []
    heldout: list[str] = []
    train_bytes = heldout_bytes = 0
    for doc in iter_documents(docs):
        if not doc.text.strip():
            continue
        size = len(doc.text.encode("utf-8"))
        frac = doc_fraction(text_key(doc.text), cfg.seed)
        if frac < cfg.heldout_fraction:
            if heldout_bytes < cfg.max_heldout_bytes:
                heldout.append(doc.text)
                heldout_bytes += size
            continue
        train.append(doc.text)
        fracs.append(frac)
        train_bytes += size
        if cfg.max_train_bytes is not None and train_bytes >= cfg.max_train_bytes:
            break
    if not train and not heldout:
        raise NanoforgeError(f"{docs}: the corpus is empty (no document has any text)")
    if not heldout and len(train) >= 2:
        heldout.append(train.pop(int(np.argmin(fracs))))
    if not train:  # everything was held out (a tiny corpus with a large fraction): train on it all
        train, heldout = heldout, []
    return train, heldout


def _canonical_unigram(hf: HFTokenizer) -> None:
    """Give a trained Unigram model a reproducible vocabulary: the same ids and scores on every run.

    tokenizers' Unigram trainer is not reproducible: it sums floats in hash-map order (scores vary in
    their last digits), and it adds the characters missing from the trained pieces (here: bytes) in
    hash-set order with scores min + 0·1e-4, min + 1·1e-4, … So those filler bytes (single characters
    on that grid) are re-scored in byte order, as sentencepiece does with its sorted required characters;
    every score is rounded to 1e-6, far below what changes a segmentation; and pieces are sorted by
    (score, piece). Only a score that rounds apart in two runs (odds ~1e-8 per piece) can still differ.
    """
    vocab = json.loads(hf.to_str())["model"]["vocab"]
    specials = [(p, score) for p, score in vocab[: len(SPECIAL_TOKENS)]]
    pieces = [(p, score) for p, score in vocab[len(SPECIAL_TOKENS) :]]
    low = min(score for _, score in pieces)
    grid = [(p, (score - low) / 1e-4) for p, score in pieces if len(p) == 1]
    fillers = sorted((p for p, k in grid if k < 256.5 and abs(k - round(k)) < 1e-5), key=_CHAR_TO_BYTE.get)
    rescored = {p: low + 1e-4 * k for k, p in enumerate(fillers)}
    canonical = sorted(((p, round(rescored.get(p, score), 6)) for p, score in pieces),
                       key=lambda ps: (-ps[1], ps[0]))
    hf.model = models.Unigram(specials + canonical, unk_id=SPECIAL_TOKENS.index("<|unk|>"),
                              byte_fallback=False)


def _hf_configs() -> tuple[dict[str, Any], dict[str, Any]]:
    """`tokenizer_config.json` and `special_tokens_map.json` for `transformers`."""
    specials = {"bos_token": "<|bos|>", "eos_token": "<|bos|>", "pad_token": "<|pad|>",
                "unk_token": "<|unk|>", "additional_special_tokens": list(SPECIAL_TOKENS[2:8])}
    config = {"tokenizer_class": "PreTrainedTokenizerFast", **specials,
              "clean_up_tokenization_spaces": False, "add_bos_token": False, "model_max_length": 1 << 30}
    return config, specials


def train_tokenizer(cfg: TokenizerConfig, docs: Path, out: Path) -> dict[str, Any]:
    """Train a tokenizer on the documents in `docs`; write the tokenizer artifact into `out`.

    Returns the manifest; its figures include bytes/token on held-out documents.
    """
    _check_config(cfg)
    docs, out = Path(docs), Path(out)
    t0 = time.perf_counter()
    train_texts, heldout = _split_corpus(cfg, docs)
    hf, trainer = _new_hf_tokenizer(cfg)
    hf.train_from_iterator(train_texts, trainer, length=len(train_texts))
    if cfg.kind == "unigram":
        _canonical_unigram(hf)
    sample = _take_bytes(heldout or train_texts, _SAMPLE_BYTES)
    tok = Tokenizer(hf, sample=sample)
    measured = heldout or train_texts
    n_bytes = sum(len(t.encode("utf-8")) for t in measured)
    n_tokens = sum(len(ids) for ids in tok.encode_batch(measured))
    figures = {
        "kind": cfg.kind, "vocab_size": tok.vocab_size,
        "train_documents": len(train_texts), "train_bytes": sum(len(t.encode("utf-8")) for t in train_texts),
        "heldout_documents": len(heldout), "heldout_bytes": n_bytes if heldout else 0,
        "heldout_tokens": n_tokens if heldout else 0,
        # a one-document corpus has nothing to hold out: then this is measured on the training text
        "bytes_per_token": n_bytes / max(1, n_tokens),
        "bytes_per_token_on": "heldout" if heldout else "train",
        "fast_path": tok.fast, "seconds": round(time.perf_counter() - t0, 3),
    }
    config, specials = _hf_configs()
    with atomic_dir(out) as tmp:
        hf.save(str(tmp / "tokenizer.json"))
        atomic_write_json(tmp / "tokenizer_config.json", config)
        atomic_write_json(tmp / "special_tokens_map.json", specials)
        (tmp / HELDOUT_SAMPLE).write_text("".join(json.dumps({"text": t}) + "\n" for t in sample))
        manifest = write_manifest(tmp, stage="tokenizer", config=cfg, inputs={"docs": docs}, figures=figures)
    return manifest


def _take_bytes(texts: Sequence[str], limit: int) -> list[str]:
    """Leading texts up to about `limit` UTF-8 bytes (the last one cut on a character boundary)."""
    out, size = [], 0
    for t in texts:
        if size >= limit:
            break
        piece = t.encode("utf-8")[: limit - size].decode("utf-8", errors="ignore")
        out.append(piece)
        size += len(piece.encode("utf-8"))
    return out


def _model_vocab(hf: HFTokenizer) -> dict[str, int]:
    """The byte-level entries of the vocabulary (the trainers also put the specials in the model's)."""
    vocab = hf.get_vocab(with_added_tokens=False)
    return {piece: i for piece, i in vocab.items() if i >= len(SPECIAL_TOKENS)}


def _tiktoken_encoding(hf: HFTokenizer) -> tiktoken.Encoding | None:
    """A tiktoken Encoding with `hf`'s ids and split regex, or None if `hf` is not byte-level BPE."""
    spec = json.loads(hf.to_str())
    pre = spec.get("pre_tokenizer") or {}
    steps = pre.get("pretokenizers") or []
    if (spec["model"]["type"] != "BPE" or spec.get("normalizer") is not None or len(steps) != 2
            or steps[0].get("type") != "Split" or "Regex" not in steps[0].get("pattern", {})
            or steps[1].get("type") != "ByteLevel" or steps[1].get("use_regex")):
        return None  # not the shape tiktoken reproduces: regex split, then bytes, then BPE
    specials = {t["content"]: t["id"] for t in spec.get("added_tokens", [])}
    ranks = {_piece_bytes(piece): i for piece, i in _model_vocab(hf).items()}
    if any(bytes([b]) not in ranks for b in range(256)):
        return None  # tiktoken needs every single byte in the vocabulary
    return tiktoken.Encoding("nanoforge", pat_str=steps[0]["pattern"]["Regex"], mergeable_ranks=ranks,
                             special_tokens=specials)


class Tokenizer:
    """A trained tokenizer: encode/decode without special tokens, chat rendering with loss masks.

        tok = Tokenizer.load("runs/demo/04-tokenizer")
        ids, mask = tok.render_chat([{"role": "user", "content": "hi"},
                                     {"role": "assistant", "content": "hello"}])
    """

    def __init__(self, hf: HFTokenizer, *, sample: Iterable[str] = ()) -> None:
        self._hf = hf
        # special-token strings inside text are ordinary text (a document cannot forge a chat turn)
        self._hf.encode_special_tokens = True
        if [hf.id_to_token(i) for i in range(len(SPECIAL_TOKENS))] != list(SPECIAL_TOKENS):
            raise NanoforgeError("tokenizer: special tokens are not at ids 0..8 (not a nanoforge tokenizer)")
        self._tt = _tiktoken_encoding(hf)
        if self._tt is not None:
            self.check_fast(list(sample), vocabulary=True)

    @classmethod
    def load(cls, path: Path | str, *, sample: Iterable[str] = ()) -> Tokenizer:
        """Load `path/tokenizer.json`; the fast path is checked on the shipped held-out sample + `sample`."""
        path = Path(path)
        file = path / "tokenizer.json" if path.is_dir() else path
        if not file.exists():
            raise NanoforgeError(f"{path}: no tokenizer.json (train one with `nanoforge tokenizer train`)")
        try:
            hf = HFTokenizer.from_file(str(file))
        except Exception as e:  # tokenizers raises a bare Exception for a malformed file
            raise NanoforgeError(f"{file}: not a readable tokenizer.json ({e})") from None
        shipped = file.parent / HELDOUT_SAMPLE
        texts = []
        if shipped.exists():
            texts = [json.loads(line)["text"] for line in shipped.read_text().splitlines()]
        return cls(hf, sample=[*texts, *sample])

    @property
    def fast(self) -> bool:
        """True when encoding goes through tiktoken (proven to give the same ids as `tokenizers`)."""
        return self._tt is not None

    def check_fast(self, texts: Sequence[str], *, vocabulary: bool = False) -> bool:
        """Keep the tiktoken path only if it gives `tokenizers`' ids on `texts` (and, with `vocabulary`,
        on every vocabulary entry taken as one piece); returns whether it is kept.
        """
        if self._tt is None:
            return False
        agree = True
        if vocabulary:
            for piece in _model_vocab(self._hf):
                # an entry that tokenizers' merges cannot reach but tiktoken's ranks can shows up here
                # (tiktoken's public API always applies its regex first, hence the private single-piece call)
                hf_ids = [t.id for t in self._hf.model.tokenize(piece)]
                if hf_ids != self._tt._encode_single_piece(_piece_bytes(piece)):
                    agree = False
                    break
        if agree and texts:
            hf_ids = [e.ids for e in self._hf.encode_batch_fast(list(texts), add_special_tokens=False)]
            agree = hf_ids == [self._tt.encode_ordinary(t) for t in texts]
        if not agree:
            self._tt = None
        return agree

    def encode(self, text: str) -> list[int]:
        """Token ids of `text`; no special token is added, and none is recognised inside the text."""
        if self._tt is not None:
            return self._tt.encode_ordinary(text)
        return self._hf.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        """`encode` over many texts (`tokenizers` uses threads; `nanoforge tokenize` uses processes)."""
        if self._tt is not None:
            # tiktoken holds the GIL while it builds each id list, so its thread pool gains nothing
            return [self._tt.encode_ordinary(t) for t in texts]
        return [e.ids for e in self._hf.encode_batch_fast(list(texts), add_special_tokens=False)]

    def decode(self, ids: Sequence[int]) -> str:
        """The text of `ids`; special tokens are written out ("<|bos|>"); broken UTF-8 becomes U+FFFD."""
        return self._hf.decode(list(ids), skip_special_tokens=False)

    @property
    def vocab_size(self) -> int:
        return self._hf.get_vocab_size(with_added_tokens=True)

    @property
    def bos_id(self) -> int:
        return SPECIAL_TOKENS.index("<|bos|>")

    @property
    def pad_id(self) -> int:
        return SPECIAL_TOKENS.index("<|pad|>")

    def special_id(self, name: str) -> int:
        """The id of a special token, by its text ("<|user_start|>") or bare name ("user_start")."""
        token = name if name.startswith("<|") else f"<|{name}|>"
        if token not in SPECIAL_TOKENS:
            raise NanoforgeError(f"unknown special token {name!r} (known: {', '.join(SPECIAL_TOKENS)})")
        return SPECIAL_TOKENS.index(token)

    @property
    def bytes_exact(self) -> bool:
        """Whether the tokens of a text stand for all its bytes (`token_bytes` sums to its length): not for a
        `word` tokenizer, whose <|unk|> stands for any word outside the vocabulary and for no bytes, so bits
        per byte would silently leave those words out."""
        return not isinstance(self._hf.model, models.WordLevel)

    def token_bytes(self) -> np.ndarray:
        """(vocab_size,) int64: the number of text bytes each id stands for, 0 for special tokens.

        Dividing a summed loss (in bits) by the summed bytes of its targets gives bits per byte, a
        figure that compares models across tokenizers.
        """
        out = np.zeros(self.vocab_size, dtype=np.int64)
        for piece, i in _model_vocab(self._hf).items():
            out[i] = len(_piece_bytes(piece))
        return out

    def render_chat(self, messages: Sequence[dict[str, Any]]) -> tuple[list[int], list[int]]:
        """Ids of a conversation and its loss mask (1 where the model learns to write the token).

        `<|bos|>`, then each message as `<|role_start|> content <|role_end|>`. The mask is 1 on an
        assistant message's content and its `<|assistant_end|>` (so the model learns to stop), else 0.
        """
        ids, mask = [self.bos_id], [0]
        for i, message in enumerate(messages):
            role, content = message.get("role"), message.get("content")
            if role not in _ROLES:
                raise NanoforgeError(f"message {i}: unknown role {role!r} "
                                     f"(expected system, user or assistant)")
            if not isinstance(content, str):
                raise NanoforgeError(f"message {i} ({role}): content must be a string, "
                                     f"got {type(content).__name__}")
            start, end = (self.special_id(t) for t in _ROLES[role])
            body = self.encode(content)
            learn = 1 if role == "assistant" else 0
            ids += [start, *body, end]
            mask += [0, *[learn] * len(body), learn]
        return ids, mask

    def render_prompt(self, messages: Sequence[dict[str, Any]]) -> list[int]:
        """Ids to generate the next assistant turn from: the conversation, then `<|assistant_start|>`."""
        ids, _ = self.render_chat(messages)
        return [*ids, self.special_id("assistant_start")]

    def __getstate__(self) -> dict[str, Any]:
        # what a worker process needs: the fast path was already proven in the parent
        return {"json": self._hf.to_str(), "fast": self.fast}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self._hf = HFTokenizer.from_str(state["json"])
        self._hf.encode_special_tokens = True
        self._tt = _tiktoken_encoding(self._hf) if state["fast"] else None
