"""MinHash signatures compiled with numba: the signature step of near-dedup (`nanoforge.data.dedup`).

    mh = MinHasher()                       # 112 permutations over word 5-grams
    sig = mh.signatures(texts)             # (n, 112) uint32, many documents per compiled call
    estimated_jaccard(sig[0], sig[1])      # fraction of equal slots

What is hashed (choices that change which documents match):
- Words: NFKC, lowercase, `[^\\w\\s]+` removed (punctuation, symbols, lone surrogates), split on whitespace
  (`str.split()`). Shingles are word n-grams joined by one space; a text of 1..n-1 words is one shingle; a
  text with no words has no shingles and gets `EMPTY` in every slot. Only the first `max_chars` characters
  are shingled, so a 100 MB document costs what a 1 MB one does.
- Word hash: MurmurHash64A (Appleby's 64-bit MurmurHash2, seed 0) of the word's UTF-8 bytes: a well-tested
  hash over 8-byte little-endian blocks, a few multiplies for a typical word, and short to write both in
  numba and in plain Python (`MinHasher.shingle_hash`).
- Shingle hash: the polynomial w1*M^(k-1) + ... + wk (mod 2^64; M = 0x9E3779B97F4A7C15, odd, so a change
  in one word always changes it) over the word hashes, then MurmurHash3's fmix64, top 32 bits.
- Permutations: datasketch's "legacy" scheme `((a*h + b) mod 2^64) mod (2^61-1)`, low 32 bits, minimum over
  the shingles, with (a, b) drawn as datasketch draws them; `datasketch.MinHash(num_perm=..., scheme="legacy",
  permutations=mh.permutations, hashfunc=mh.shingle_hash)` fed `[s.encode() for s in shingles(text)]`
  gives the same signature bit for bit.

How it runs: many documents per call of one compiled kernel, which splits, removes, hashes and permutes.
An ASCII text (most of the web) goes in as it is and is lowercased there (NFKC is the identity on ASCII);
any other text gets NFKC and lowercasing in Python first (both can depend on neighbouring characters) and
goes in as UTF-8. The kernel classifies each character as word, whitespace or removed with tables built from
Python's own `[^\\w\\s]` and `str.isspace`, so it splits exactly as `normalize_words` does. It keeps the
per-character work branch-free (word boundaries are what a branch predictor cannot guess), hashes a word of
up to 8 bytes with one load, and does the mod (2^61-1) as a Mersenne reduction (mask, shift, add) that vectorizes
over the permutations. Compiled code is cached next to this file (or in the user cache); where neither is
writable, as in a read-only install, it is compiled once per process instead (about 2 s).
"""

from __future__ import annotations

import functools
import re
import unicodedata
from collections.abc import Iterable

import numpy as np

from nanoforge.errors import NanoforgeError
from nanoforge.jit import jit

EMPTY = np.uint32(0xFFFFFFFF)  # every slot of the signature of a text with no words (never indexed)

_NONWORD = re.compile(r"[^\w\s]+")
_U64 = (1 << 64) - 1
_MURMUR_M = 0xC6A4A7935BD1E995  # MurmurHash64A's multiplier; its shift is 47
_MIX = 0x9E3779B97F4A7C15  # odd 64-bit constant (golden ratio) for combining word hashes
_FMIX_1, _FMIX_2 = 0xFF51AFD7ED558CCD, 0xC4CEB9FE1A85EC53  # MurmurHash3 fmix64
_MERSENNE = (1 << 61) - 1
_BATCH_BYTES = 1 << 20  # text bytes per kernel call: amortizes the call, keeps the buffer in memory small
_BATCH_DOCS = 1 << 14

# numba types an int literal as int64, and uint64 op int64 as float64: every constant the kernels use is uint64
_U_MURMUR_M, _U_MIX, _U_FMIX_1, _U_FMIX_2 = (np.uint64(c) for c in (_MURMUR_M, _MIX, _FMIX_1, _FMIX_2))
_U_MERSENNE, _U_LOW32 = np.uint64(_MERSENNE), np.uint64(0xFFFFFFFF)
_U0, _U1, _U3, _U7, _U8 = (np.uint64(c) for c in (0, 1, 3, 7, 8))
_U32, _U33, _U47, _U61, _U63 = (np.uint64(c) for c in (32, 33, 47, 61, 63))
_U_ALL = np.uint64(_U64)


def normalize_words(text: str) -> list[str]:
    """The words dedup compares: NFKC, lowercase, punctuation/symbols/lone surrogates removed."""
    return _NONWORD.sub("", unicodedata.normalize("NFKC", text).lower()).split()


def shingles(text: str, ngram: int = 5) -> list[str]:
    """Word n-grams of the normalized text (a 1..n-1 word text is one shingle); the reference for tests."""
    words = normalize_words(text)
    k = min(ngram, len(words))
    return [" ".join(words[i:i + k]) for i in range(len(words) - k + 1)] if words else []


def estimated_jaccard(sig_a: np.ndarray, sig_b: np.ndarray) -> np.ndarray:
    """Fraction of equal slots, row-wise (the MinHash estimate of Jaccard similarity)."""
    return (np.asarray(sig_a) == np.asarray(sig_b)).mean(axis=-1)


_WORD, _SPACE = 1, 2  # character classes for the kernel; neither: removed by normalization


def _ascii_table() -> np.ndarray:
    """For each ASCII byte: its lowercase | class << 8, from Python's own `_NONWORD` and `str.isspace`."""
    return np.array([ord(chr(c).lower()) | (_SPACE if chr(c).isspace() else 0 if _NONWORD.fullmatch(chr(c)) else _WORD)
                     << 8 for c in range(128)], dtype=np.uint64)


@functools.cache
def _char_classes() -> np.ndarray:
    """The class of every code point (uint8, 0x110000 of them; built once, ~0.1 s), for non-ASCII text.

    Straight from Python: `_NONWORD` is what normalization removes, and re's `\\s` is `str.split()`'s whitespace.
    """
    chars = "".join(map(chr, range(0x110000)))
    classes = np.full(len(chars), _WORD, dtype=np.uint8)
    for m in _NONWORD.finditer(chars):
        classes[m.start():m.end()] = 0
    classes[[m.start() for m in re.finditer(r"\s", chars)]] = _SPACE
    return classes


_ASCII = _ascii_table()
_UTF8_LEN = np.array([1] * 12 + [2, 2, 3, 4], dtype=np.uint64)  # sequence length by the lead byte's top 4 bits


# ---- compiled kernels ---------------------------------------------------------------------------------------


@jit
def _fmix64(h):
    h ^= h >> _U33
    h *= _U_FMIX_1
    h ^= h >> _U33
    h *= _U_FMIX_2
    return h ^ (h >> _U33)


@jit
def _load8(s64, p):
    """The 8 bytes at byte offset p of the uint64 buffer s64, little-endian (two aligned loads)."""
    q = p >> _U3
    sh = (p & _U7) << _U3
    return (s64[q] >> sh) | ((s64[q + _U1] << _U1) << (_U63 - sh))


@jit
def _account(cls, n, j, nw, in_word, ends):
    """One character of class `cls` and n bytes seen: the new (bytes kept, words ended, inside a word).

    No branch on the class, since word boundaries are what a branch predictor cannot guess.
    """
    is_word = cls & _U1
    is_space = cls >> _U1
    j += is_word * n
    ends[nw] = j
    nw += is_space & in_word
    return j, nw, is_word | (in_word & (is_space ^ _U1))  # a removed character does not end a word


@jit
def _split_words(buf, start, end, classes, s, ends):
    """The words of the UTF-8 text buf[start:end]: their bytes back to back in `s`, word i ending at ends[i];
    returns how many. ASCII is lowercased here; other text comes already NFKC-normalized and lowercased."""
    j = nw = in_word = _U0  # bytes kept in s, words ended, 1 while inside a word
    ascii_only = _U0
    for i in range(np.uint64(start), np.uint64(end)):
        ascii_only |= buf[i]
    if ascii_only < 0x80:
        for i in range(np.uint64(start), np.uint64(end)):
            e = _ASCII[buf[i]]
            s[j] = e
            j, nw, in_word = _account(e >> _U8, _U1, j, nw, in_word, ends)
    else:
        i = np.uint64(start)
        while i < end:
            c = buf[i]
            if c < 0x80:
                e = _ASCII[c]
                s[j] = e
                n = _U1
                cls = e >> _U8
            else:  # a whole UTF-8 sequence: copied, and classified by its code point
                n = _UTF8_LEN[c >> 4]
                cp = np.uint64(c) & (np.uint64(0x7F) >> n)
                s[j] = c
                for t in range(_U1, n):
                    cp = (cp << np.uint64(6)) | np.uint64(buf[i + t] & 0x3F)
                    s[j + t] = buf[i + t]
                cls = np.uint64(classes[cp])
            i += n
            j, nw, in_word = _account(cls, n, j, nw, in_word, ends)
    ends[nw] = j
    return nw + in_word


@jit
def _word_hashes(s64, ends, nw, words):
    """words[i] = MurmurHash64A (seed 0) of word i of `_split_words`."""
    start = _U0
    for i in range(nw):
        end = np.uint64(ends[i])
        n = end - start
        h = n * _U_MURMUR_M
        if n <= _U8:  # the common word: one load, no loop (its tail, or for n == 8 its one block)
            t = _load8(s64, start) & (_U_ALL >> ((_U8 - n) << _U3))
            k = t * _U_MURMUR_M
            k ^= k >> _U47
            h ^= k * _U_MURMUR_M if n == _U8 else t
            h *= _U_MURMUR_M
        else:
            full = n & ~_U7
            for p in range(start, start + full, _U8):
                k = _load8(s64, p) * _U_MURMUR_M
                k ^= k >> _U47
                h ^= k * _U_MURMUR_M
                h *= _U_MURMUR_M
            if n > full:
                h ^= _load8(s64, start + full) & (_U_ALL >> ((_U8 - (n - full)) << _U3))
                h *= _U_MURMUR_M
        h ^= h >> _U47
        h *= _U_MURMUR_M
        words[i] = h ^ (h >> _U47)
        start = end


@jit
def _scratch(n):
    """Scratch space of `_doc_shingle_hashes` for a text of up to n bytes (at most (n + 1) // 2 words)."""
    return (np.empty(n // 8 + 2, np.uint64), np.empty(n // 2 + 2, np.int64), np.empty(n // 2 + 1, np.uint64),
            np.empty(n // 2 + 1, np.uint64), np.empty(n // 2 + 1, np.uint32))


@jit
def _doc_shingle_hashes(buf, start, end, ngram, classes, s64, ends, words, acc, out):
    """Shingle hashes of the text buf[start:end] into `out` (uint32, the rest is `_scratch`); returns how many."""
    nw = np.int64(_split_words(buf, start, end, classes, s64.view(np.uint8), ends))
    _word_hashes(s64, ends, nw, words)
    k = min(ngram, nw)
    ns = nw - k + 1 if nw > 0 else 0
    for i in range(ns):
        acc[i] = words[i]
    for j in range(1, k):  # Horner over the shingle's words, vectorized over the shingles
        for i in range(ns):
            acc[i] = acc[i] * _U_MIX + words[i + j]
    for i in range(ns):
        out[i] = _fmix64(acc[i]) >> _U32
    return ns


@jit
def _signatures_kernel(buf, offsets, classes, a, b, ngram, sig):
    """sig[d] = MinHash of the text buf[offsets[d]:offsets[d + 1]]; rows of texts without words are left alone."""
    longest = 0
    for d in range(len(offsets) - 1):
        longest = max(longest, offsets[d + 1] - offsets[d])
    s64, ends, words, acc, hashes = _scratch(longest)
    num_perm = len(a)
    m = np.empty(num_perm, np.uint64)
    for d in range(len(offsets) - 1):
        ns = _doc_shingle_hashes(buf, offsets[d], offsets[d + 1], ngram, classes, s64, ends, words, acc, hashes)
        if ns == 0:
            continue
        for j in range(num_perm):
            m[j] = _U_LOW32
        for s in range(ns):
            h = np.uint64(hashes[s])
            for j in range(num_perm):  # vectorized over the permutations
                x = a[j] * h + b[j]  # wraps mod 2^64, as datasketch's numpy does
                # x mod p (p = 2^61-1) is y or y - p, with y = (x & p) + (x >> 61) <= p + 7; y >= p exactly when
                # y + 1 reaches bit 61, and y - p = y + 1 - 2^61 has the low 32 bits of y + 1
                y = (x & _U_MERSENNE) + (x >> _U61)
                y += (y + _U1) >> _U61
                m[j] = min(m[j], y & _U_LOW32)
        for j in range(num_perm):
            sig[d, j] = m[j]


# ---- the hasher ---------------------------------------------------------------------------------------------


def _murmur64a_py(data: bytes) -> int:
    """MurmurHash64A, seed 0: the kernel's word hash in plain Python."""
    n = len(data)
    h = n * _MURMUR_M & _U64
    full = n - n % 8
    for i in range(0, full, 8):
        k = int.from_bytes(data[i:i + 8], "little") * _MURMUR_M & _U64
        k = (k ^ k >> 47) * _MURMUR_M & _U64
        h = (h ^ k) * _MURMUR_M & _U64
    if n > full:
        h = (h ^ int.from_bytes(data[full:], "little")) * _MURMUR_M & _U64
    h = (h ^ h >> 47) * _MURMUR_M & _U64
    return h ^ h >> 47


def _fmix64_py(h: int) -> int:
    h = (h ^ h >> 33) * _FMIX_1 & _U64
    h = (h ^ h >> 33) * _FMIX_2 & _U64
    return h ^ h >> 33


class MinHasher:
    """MinHash signatures (uint32, `num_perm` per document), many documents per compiled kernel call."""

    def __init__(self, num_perm: int = 112, ngram: int = 5, seed: int = 1, max_chars: int = 1_000_000):
        if num_perm < 1 or ngram < 1 or max_chars < 1:
            raise NanoforgeError("MinHasher: num_perm, ngram and max_chars must be positive")
        self.num_perm, self.ngram, self.seed, self.max_chars = num_perm, ngram, seed, max_chars
        # the same draw as datasketch's legacy scheme, so MinHash(seed=seed, scheme="legacy") agrees too
        gen = np.random.RandomState(seed)
        mersenne = np.uint64(_MERSENNE)
        ab = np.array([(gen.randint(1, mersenne, dtype=np.uint64), gen.randint(0, mersenne, dtype=np.uint64))
                       for _ in range(num_perm)], dtype=np.uint64)
        self.a, self.b = ab[:, 0].copy(), ab[:, 1].copy()

    @property
    def permutations(self) -> tuple[np.ndarray, np.ndarray]:
        """(a, b) of the permutations, for `datasketch.MinHash(permutations=..., scheme="legacy")`."""
        return self.a, self.b

    def _kernel_bytes(self, text: str) -> bytes:
        """What the kernel reads (UTF-8): an ASCII text as it is, any other NFKC-normalized and lowercased."""
        text = text[:self.max_chars]
        if text.isascii():
            return text.encode("ascii")
        return unicodedata.normalize("NFKC", text).lower().encode("utf-8", "surrogatepass")

    def shingle_hashes(self, text: str) -> np.ndarray:
        """32-bit hashes (in uint64) of the text's shingles, in order; empty if it has no words."""
        buf = np.frombuffer(self._kernel_bytes(text), dtype=np.uint8)
        scratch = _scratch(len(buf))
        ns = _doc_shingle_hashes(buf, 0, len(buf), self.ngram, _char_classes(), *scratch)
        return scratch[-1][:ns].astype(np.uint64)

    def shingle_hash(self, shingle: bytes | str) -> int:
        """The hash of one shingle (its words joined by spaces): a `hashfunc` for datasketch."""
        data = shingle if isinstance(shingle, bytes) else shingle.encode("utf-8", "surrogatepass")
        h = 0
        for w in data.split(b" "):
            h = (h * _MIX + _murmur64a_py(w)) & _U64
        return _fmix64_py(h) >> 32

    def signatures(self, texts: Iterable[str]) -> np.ndarray:
        """(n, num_perm) uint32 signatures; a text with no words gets all `EMPTY`."""
        parts: list[np.ndarray] = []
        batch: list[bytes] = []
        size = 0
        for text in texts:
            batch.append(self._kernel_bytes(text))
            size += len(batch[-1])
            if size >= _BATCH_BYTES or len(batch) >= _BATCH_DOCS:
                parts.append(self._batch_signatures(batch))
                batch, size = [], 0
        parts.append(self._batch_signatures(batch))
        return np.concatenate(parts)

    def _batch_signatures(self, batch: list[bytes]) -> np.ndarray:
        sig = np.full((len(batch), self.num_perm), EMPTY, dtype=np.uint32)
        if batch:
            offsets = np.zeros(len(batch) + 1, dtype=np.int64)
            np.cumsum([len(t) for t in batch], out=offsets[1:])
            buf = np.frombuffer(b"".join(batch), dtype=np.uint8)
            _signatures_kernel(buf, offsets, _char_classes(), self.a, self.b, self.ngram, sig)
        return sig
