import random

from nanoforge.data.dedup import (
    EXACT_DUPLICATE,
    ExactDeduplicator,
    LSHConfig,
    filter_shards,
    near_duplicates,
    near_duplicates_partitioned,
)
from nanoforge.data.documents import Document, iter_documents, write_document_shards
from nanoforge.data.minhash import MinHasher, shingles

VOCAB = [f"w{i}" for i in range(3000)]


def random_doc(rng: random.Random, n: int = 500) -> list[str]:
    return [rng.choice(VOCAB) for _ in range(n)]


def edit(rng: random.Random, words: list[str], k: int) -> list[str]:
    words = list(words)
    for i in rng.sample(range(len(words)), k):
        words[i] = rng.choice(VOCAB)
    return words


def jaccard(a: str, b: str) -> float:
    sa, sb = set(shingles(a)), set(shingles(b))
    return len(sa & sb) / len(sa | sb)


def test_planted_near_duplicates_recall_precision():
    rng = random.Random(3)
    docs, truth = [], set()
    for i in range(300):
        docs.append(Document(f"r{i:04d}", " ".join(random_doc(rng))))
    for i in range(60):
        base = random_doc(rng)
        docs.append(Document(f"p{i:04d}a", " ".join(base)))
        docs.append(Document(f"p{i:04d}b", " ".join(edit(rng, base, rng.randint(1, 5)))))
        truth.add(f"p{i:04d}b")  # "a" < "b": the smaller id is kept
    drops = near_duplicates(docs)
    found = set(drops)
    assert len(found & truth) / len(truth) >= 0.95
    assert len(found & truth) / max(len(found), 1) >= 0.95
    assert all(drops[d] == d[:-1] + "a" for d in found & truth)


def test_cluster_of_three_keeps_exactly_one():
    rng = random.Random(4)
    a = random_doc(rng, 400)
    b = edit(rng, a, 3)
    c = edit(rng, b, 3)
    docs = [Document("c", " ".join(c)), Document("a", " ".join(a)), Document("b", " ".join(b)),
            Document("z", " ".join(random_doc(rng)))]
    assert near_duplicates(docs) == {"b": "a", "c": "a"}


def test_chain_through_middle_document_only():
    # force the A~B, B~C, A!~C shape with a config where each band is one slot and signatures are crafted
    rng = random.Random(5)
    a = random_doc(rng, 100)
    b = a[:50] + random_doc(rng, 50)
    c = b[50:] + random_doc(rng, 50)
    ta, tb, tc = (" ".join(x) for x in (a, b, c))
    assert jaccard(ta, tc) == 0
    cfg = LSHConfig(num_perm=112, bands=112, rows=1, threshold=0.0)
    drops = near_duplicates([Document("a", ta), Document("b", tb), Document("c", tc)], cfg)
    assert drops == {"b": "a", "c": "a"}


def test_exact_dedup():
    docs = [Document("3", "Hello, World!"), Document("1", "hello world"), Document("2", "HELLO   world."),
            Document("4", "something else"), Document("5", ""), Document("6", " ... ")]
    assert ExactDeduplicator().duplicates(docs) == {"3": "1", "2": "1", "6": "5"}
    assert ExactDeduplicator.reason == EXACT_DUPLICATE
    assert ExactDeduplicator().duplicates(reversed(docs)) == {"3": "1", "2": "1", "6": "5"}


def test_empty_and_huge_documents():
    mh = MinHasher(max_chars=10_000)
    sig = mh.signatures(["", "\ud800\udfff", "a b", " ".join(random_doc(random.Random(6), 200_000))])
    assert (sig[0] == 0xFFFFFFFF).all() and (sig[1] == 0xFFFFFFFF).all()
    assert (sig[2] != 0xFFFFFFFF).any()
    huge = " ".join(random_doc(random.Random(7), 20_000))
    capped = MinHasher(max_chars=len(huge) // 2)
    assert capped.signatures([huge])[0].tolist() == capped.signatures([huge[:len(huge) // 2]])[0].tolist()
    docs = [Document("e1", ""), Document("e2", "  "), Document("s", "one two")]
    assert near_duplicates(docs) == {}


def _corpus(seed: int = 8) -> list[Document]:
    rng = random.Random(seed)
    docs = [Document(f"d{i:03d}", " ".join(random_doc(rng, 200))) for i in range(80)]
    for i in range(0, 80, 8):
        docs.append(Document(f"n{i:03d}", " ".join(edit(rng, docs[i].text.split(), 1))))
    docs.append(Document("empty", ""))
    return docs


def test_deterministic_under_shuffle():
    docs = _corpus()
    ref = near_duplicates(docs)
    assert len(ref) == 10
    shuffled = list(docs)
    random.Random(0).shuffle(shuffled)
    assert near_duplicates(shuffled) == ref


def test_partitioned_equals_in_memory(tmp_path):
    docs = _corpus()
    shuffled = list(docs)
    random.Random(1).shuffle(shuffled)
    for k in range(3):  # three shards, in another order than the in-memory list
        write_document_shards(shuffled[k::3], tmp_path / "docs", prefix=f"part{k}")
    drops = near_duplicates_partitioned(tmp_path / "docs", tmp_path / "work")
    assert drops == near_duplicates(docs)
    counts = filter_shards(tmp_path / "docs", drops, tmp_path / "out")
    assert counts == {"kept": len(docs) - len(drops), "removed": len(drops)}
    removed = list(iter_documents(tmp_path / "out" / "removed"))
    assert {d.id: d.meta["duplicate_of"] for d in removed} == drops
    assert {d.meta["reason"] for d in removed} == {"near-duplicate"}
    kept = [d.id for f in sorted((tmp_path / "out").glob("docs-*.parquet")) for d in iter_documents(f)]
    assert sorted(kept) == sorted({d.id for d in docs} - set(drops))
