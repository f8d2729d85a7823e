import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from nanoforge.data import minhash
from nanoforge.data.minhash import EMPTY, MinHasher, estimated_jaccard, normalize_words, shingles
from nanoforge.errors import NanoforgeError

U64 = 2**64 - 1

# ---- the reference: the same hash written plainly, word by word and shingle by shingle -------------------


def ref_murmur64a(data: bytes) -> int:
    m = 0xC6A4A7935BD1E995
    h = len(data) * m & U64
    blocks, tail = divmod(len(data), 8)
    for i in range(blocks):
        k = int.from_bytes(data[8 * i:8 * i + 8], "little") * m & U64
        k ^= k >> 47
        h ^= k * m & U64
        h = h * m & U64
    if tail:
        h ^= int.from_bytes(data[8 * blocks:], "little")
        h = h * m & U64
    h ^= h >> 47
    h = h * m & U64
    return h ^ (h >> 47)


def ref_shingle_hash(shingle: str) -> int:
    h = 0
    for w in shingle.split(" "):
        h = (h * 0x9E3779B97F4A7C15 + ref_murmur64a(w.encode("utf-8"))) & U64
    h ^= h >> 33
    h = h * 0xFF51AFD7ED558CCD & U64
    h ^= h >> 33
    h = h * 0xC4CEB9FE1A85EC53 & U64
    return (h ^ (h >> 33)) >> 32


def ref_signature(mh: MinHasher, text: str) -> list[int]:
    hv = np.array([ref_shingle_hash(s) for s in shingles(text[:mh.max_chars], mh.ngram)], dtype=np.uint64)
    if len(hv) == 0:
        return [int(EMPTY)] * mh.num_perm
    a, b = mh.permutations
    return ((hv[:, None] * a[None, :] + b[None, :]) % np.uint64(2**61 - 1) & np.uint64(0xFFFFFFFF)).min(axis=0).tolist()


# ---- test texts: everything normalization has an opinion on -----------------------------------------------

PIECES = [
    "alpha", "Beta", "GAMMA", "d3lta", "snake_case", "x", "ab", "abcdefgh", "abcdefghi", "supercalifragilistic",
    "antidisestablishmentarianism1234", "don't", "e-mail", "3.14", "(paren)", "U.S.A.", "!!!", "--", "...", "#tag",
    "café", "CAFÉ", "cafe\u0301", "naïve", "Straße", "İstanbul", "ﬁne", "ＡＢＣ", "\u212a", "Ωmega", "日本語", "中文字",
    "😀", "a😀b", "\ud800", "x\udfffy", "€5", "½", "ǅ", "\u200b", "\x00", "\x7f", "Привет", "ΟΔΟΣ", "𠀀𠀁", "x\u0307",
    "١٢٣", "\u0301", "a\u00a8b", "’quoted’", "—",
]
SEPARATORS = [" ", " ", " ", "  ", "\t", "\n", "\v", "\f", "\r", "\x1c", "\x1d", "\x1e", "\x1f", ", ", ". ", "",
              "\u00a0", "\u2028", "\u2029", "\u0085", "\u1680", "\u3000", "\u202f"]
ASCII_PIECES = [p for p in PIECES if p.isascii()]
ASCII_SEPARATORS = [s for s in SEPARATORS if s.isascii()]


def random_text(rng: random.Random, words: int) -> str:
    return "".join(rng.choice(PIECES) + rng.choice(SEPARATORS) for _ in range(words))


def ascii_text(rng: random.Random, words: int) -> str:
    return "".join(rng.choice(ASCII_PIECES) + rng.choice(ASCII_SEPARATORS) for _ in range(words))


def test_word_hash_is_murmurhash64a():
    # values from the C reference (smhasher's MurmurHash64A, seed 0)
    vectors = {b"": 0x0, b"a": 0x071717D2D36B6B11, b"hello": 0x1E68D17C457BF117, b"abcdefgh": 0xAFDB0257FF41AA98,
               b"abcdefghi": 0xC9B9D84356146AC2, "café".encode(): 0x5F7A16B901085D2A,
               b"the quick brown fox jumps": 0x7ABCF0ACF218F0C8, b"0123456789abcdef": 0x93A92D1A91A24BC7}
    for data, h in vectors.items():
        assert ref_murmur64a(data) == h
    mh = MinHasher()
    for n in range(1, 41):  # every block/tail split, through the kernel's one-word shingle
        word = "".join(random.Random(n).choice("abcdefghijklmnopqrstuvwxyz0123456789_") for _ in range(n))
        assert mh.shingle_hashes(word).tolist() == [ref_shingle_hash(word)] == [mh.shingle_hash(word)]


def test_kernel_matches_reference_on_random_texts():
    rng = random.Random(0)
    texts = [random_text(rng, rng.randint(0, 60)) for _ in range(150)]
    texts += [ascii_text(rng, rng.randint(0, 60)) for _ in range(100)]
    texts += ["".join(chr(c) for c in range(128)), "".join(chr(c) + " " for c in range(128))]
    mh = MinHasher()
    sig = mh.signatures(texts)
    assert sig.dtype == np.uint32 and sig.shape == (len(texts), 112)
    for text, row in zip(texts, sig, strict=True):
        assert row.tolist() == ref_signature(mh, text), repr(text)
        assert mh.shingle_hashes(text).tolist() == [ref_shingle_hash(s) for s in shingles(text)], repr(text)


def test_every_kind_of_code_point():
    rng = random.Random(6)
    mh = MinHasher(num_perm=8, ngram=2)
    points = [chr(rng.randrange(0x80, 0x110000)) for _ in range(1500)] + [chr(c) for c in range(0x80, 0x800, 7)]
    texts = [f"a{c}b {c} c{c}{c} d" for c in points]
    for text, row in zip(texts, mh.signatures(texts), strict=True):
        assert row.tolist() == ref_signature(mh, text), repr(text)


def test_permutation_at_the_edges_of_the_mersenne_reduction():
    # a*h + b steered onto the values where `mod 2^61-1` needs its final subtraction or wraps mod 2^64
    p = 2**61 - 1
    targets = [0, 1, p - 1, p, p + 1, p + 6, p + 7, p + 8, 2**61, 2 * p, 2 * p + 7, 2**62 - 1, 2**63, U64 - 7, U64]
    mh = MinHasher(num_perm=2 * len(targets))
    h = mh.shingle_hash("word")
    odd = 0xFFFFFFFFFFFFFFC5  # a large a: a*h wraps mod 2^64
    mh.a = np.array([1] * len(targets) + [odd] * len(targets), dtype=np.uint64)
    mh.b = np.array([(t - a * h) % 2**64 for a in (1, odd) for t in targets], dtype=np.uint64)
    expected = [t % p & 0xFFFFFFFF for t in targets] * 2
    assert mh.signatures(["word"])[0].tolist() == expected


def test_short_empty_and_long_texts():
    mh = MinHasher()
    for text in ["one", "One two", "one, two three", "1 2 3 4", "a b c d e", "ÉTÉ été", "日本 語"]:
        assert mh.signatures([text])[0].tolist() == ref_signature(mh, text)
        assert len(mh.shingle_hashes(text)) == max(1, len(normalize_words(text)) - 4)
    empties = ["", "   ", " ,; ", "...!?", "\ud800", "\ud800\udfff", "😀 €", "\t\v\f\x1c"]
    sig = mh.signatures(empties)
    assert (sig == EMPTY).all()
    assert mh.shingle_hashes("").dtype == np.uint64 and len(mh.shingle_hashes(" ; ")) == 0
    rng = random.Random(1)
    for text in [ascii_text(rng, 3000), random_text(rng, 3000)]:
        capped = MinHasher(max_chars=len(text) // 3)
        assert capped.signatures([text])[0].tolist() == capped.signatures([text[:len(text) // 3]])[0].tolist()
        assert capped.signatures([text])[0].tolist() == ref_signature(capped, text)
        assert capped.signatures([text])[0].tolist() != mh.signatures([text])[0].tolist()


def test_ascii_and_unicode_paths_agree():
    rng = random.Random(2)
    mh = MinHasher()
    for _ in range(20):
        text = ascii_text(rng, rng.randint(1, 80))
        # the same words reached through normalization: NBSP for a space, fullwidth letters, a removed symbol
        other = text.replace(" ", "\u00a0", 1).replace("a", "\uff41") + " ©"
        assert not other.isascii() and normalize_words(other) == normalize_words(text)
        assert mh.signatures([text]).tolist() == mh.signatures([other]).tolist()


def test_bit_identical_to_datasketch():
    import datasketch  # a dev dependency: a missing one must fail, not skip
    mh = MinHasher()
    assert all((x == y).all() for x, y in zip(datasketch.MinHash(num_perm=112, seed=1, scheme="legacy").permutations,
                                              mh.permutations, strict=True))
    rng = random.Random(3)
    for text in [ascii_text(rng, 200), random_text(rng, 200), "one two", "Grüße aus 日本 😀"]:
        m = datasketch.MinHash(num_perm=112, scheme="legacy", permutations=mh.permutations, hashfunc=mh.shingle_hash)
        m.update_batch([s.encode() for s in shingles(text)])
        assert m.hashvalues.astype(np.uint32).tolist() == mh.signatures([text])[0].tolist()
        assert [mh.shingle_hash(s) for s in shingles(text)] == mh.shingle_hashes(text).tolist()


def test_estimate_tracks_exact_jaccard():
    rng = random.Random(4)
    vocab = [f"w{i}" for i in range(3000)]
    mh = MinHasher()
    errors = []
    for _ in range(60):
        a = [rng.choice(vocab) for _ in range(300)]
        b = list(a)
        for i in rng.sample(range(len(b)), rng.randint(0, 80)):
            b[i] = rng.choice(vocab)
        ta, tb = " ".join(a), " ".join(b)
        sa, sb = set(shingles(ta)), set(shingles(tb))
        sig = mh.signatures([ta, tb])
        errors.append(abs(float(estimated_jaccard(sig[0], sig[1])) - len(sa & sb) / len(sa | sb)))
    assert np.mean(errors) < 0.05


def test_batching_does_not_change_signatures(monkeypatch):
    rng = random.Random(5)
    texts = [random_text(rng, rng.randint(0, 40)) if i % 3 else ascii_text(rng, rng.randint(0, 40)) for i in range(60)]
    mh = MinHasher(num_perm=16, ngram=3)
    whole = mh.signatures(texts)
    one_by_one = np.concatenate([mh.signatures([t]) for t in texts])
    monkeypatch.setattr(minhash, "_BATCH_BYTES", 100)
    monkeypatch.setattr(minhash, "_BATCH_DOCS", 7)
    small_batches = mh.signatures(iter(texts))
    assert whole.tolist() == one_by_one.tolist() == small_batches.tolist()
    assert mh.signatures([]).shape == (0, 16)


def test_bad_parameters():
    with pytest.raises(NanoforgeError):
        MinHasher(num_perm=0)


def test_imports_where_no_cache_can_be_written(tmp_path):
    # a read-only install: no __pycache__ next to the module and no user cache dir -> compile per process
    (tmp_path / "__pycache__").write_text("")
    (tmp_path / "minhash_ro.py").write_text(Path(minhash.__file__).read_text())
    env = {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path / "__pycache__"),
           "XDG_CACHE_HOME": str(tmp_path / "__pycache__" / "cache")}
    code = "import minhash_ro; print(type(minhash_ro._signatures_kernel._cache).__name__)"
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "NullCache"
