import json
import random

import pyarrow.parquet as pq
import pytest

from nanoforge.data.clean import CleanConfig, clean, report_table
from nanoforge.errors import NanoforgeError

NOUNS = ("river", "teacher", "garden", "market", "engine", "letter", "mountain", "kitchen", "library", "village",
         "bridge", "window", "forest", "harbour", "station", "painter", "doctor", "island", "castle", "meadow")
VERBS = ("watches", "follows", "carries", "remembers", "builds", "finds", "opens", "visits", "paints", "repairs")
ADJS = ("quiet", "bright", "ancient", "narrow", "gentle", "crowded", "distant", "simple", "careful", "famous")


def prose(rng: random.Random, sentences: int = 12) -> str:
    """English-looking prose that passes the quality rules: varied sentences, one per line."""
    links = ("that was near", "beside", "far from", "behind", "under", "which stood by", "across from")
    ends = ("with care", "every morning", "before the rain", "in silence", "for a while", "at dusk", "again")
    lines = []
    for _ in range(sentences):
        a, b, c, d = rng.sample(NOUNS, 4)
        lines.append(f"{rng.choice(('The', 'A', 'One', 'Every'))} {rng.choice(ADJS)} {a} {rng.choice(VERBS)} "
                     f"the {b} {rng.choice(links)} the {c}, and it {rng.choice(VERBS)} {d} {rng.choice(ends)}.")
    return "\n".join(lines)


def _read(folder, pattern="docs-*.parquet"):
    """Every row of the shards in `folder`, as one column dict, in shard order."""
    tables = [pq.read_table(f).to_pydict() for f in sorted(folder.glob(pattern))]
    return {k: [v for t in tables for v in t[k]] for k in tables[0]} if tables else {}


def _write(path, docs):
    path.write_text("".join(json.dumps({"id": i, "text": t, "url": f"https://example.org/{i}"}) + "\n"
                            for i, t in docs))


def test_chain_removes_with_reasons_redacts_and_dedups(tmp_path):
    rng = random.Random(0)
    base = prose(rng)
    near = base.replace("careful", "careless", 1)
    docs = [
        ("a-good", prose(rng)), ("b-dup", base), ("c-near", near), ("d-orig", base),
        ("e-french", "Le petit chat dort sur le canapé pendant que la pluie tombe doucement sur la ville. " * 8),
        ("f-short", "Too short."),
        ("g-pii", prose(rng) + "\nWrite to alice.smith@example.com or call +44 20 7946 0958 for the details."),
    ]
    src = tmp_path / "in"
    src.mkdir()
    _write(src / "a.jsonl", docs[:4])
    _write(src / "b.jsonl", docs[4:])
    m = clean(CleanConfig(workers=2), src, tmp_path / "out")
    kept = _read(tmp_path / "out")
    assert sorted(kept["id"]) == ["a-good", "b-dup", "g-pii"]  # b-dup: smallest id of its cluster
    assert "<EMAIL>" in kept["text"][kept["id"].index("g-pii")] and "alice" not in "".join(kept["text"])
    assert set(kept["language"]) == {"en"}
    removed = _read(tmp_path / "out" / "removed", "*.parquet")
    why = dict(zip(removed["id"], zip(removed["step"], removed["reason"], removed["duplicate_of"], strict=True),
                   strict=True))
    assert why["e-french"][0] == "language" and why["f-short"][0] in ("language", "gopher_repetition",
                                                                      "gopher_quality")
    assert why["d-orig"] == ("exact_dedup", "exact-duplicate", "b-dup")
    assert why["c-near"] == ("near_dedup", "near-duplicate", "b-dup")
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert report["documents_in"] == 7 and report["documents_out"] == 3 and report["bytes_out"] < report["bytes_in"]
    assert report["steps"]["pii"]["redacted"]["email"] == 1 and report["steps"]["pii"]["redacted"]["phone"] == 1
    assert m["figures"]["removed_by_reason"]["exact_dedup/exact-duplicate"] == 1
    assert "near_dedup" in report_table(report)
    # the same output with one worker
    clean(CleanConfig(workers=1), src, tmp_path / "out1")
    assert _read(tmp_path / "out1") == kept
    assert not (tmp_path / ".out.work").exists()  # the work directory goes once the output is in place


def test_bad_config_is_a_clear_error(tmp_path):
    _write(tmp_path / "a.jsonl", [("x", "text")])
    with pytest.raises(NanoforgeError, match="unknown step"):
        clean(CleanConfig(steps=["spellcheck"]), tmp_path / "a.jsonl", tmp_path / "o")
    with pytest.raises(NanoforgeError, match="bad options for step 'language'"):
        clean(CleanConfig(steps=["language"], options={"language": {"langs": ["en"]}}), tmp_path / "a.jsonl",
              tmp_path / "o")
    assert not (tmp_path / "o").exists()


def test_a_bad_shard_is_reported_and_the_rest_is_cleaned(tmp_path):
    import pyarrow as pa

    src = tmp_path / "in"
    src.mkdir()
    rng = random.Random(1)
    _write(src / "good.jsonl", [("a", prose(rng)), ("b", prose(rng))])
    pq.write_table(pa.table({"id": ["x"], "text": [42]}), src / "mistyped.parquet")
    pq.write_table(pa.table({"id": ["y"], "body": ["no text column"]}), src / "missing.parquet")
    (src / "broken.jsonl").write_text(json.dumps({"id": "c", "text": prose(rng)}) + "\n{not json\n")
    m = clean(CleanConfig(workers=1), src, tmp_path / "out")
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert m["figures"]["files_with_errors"] == 3
    assert any("column 'text' is int64" in e for e in report["file_errors"])
    assert any("no 'text' column" in e for e in report["file_errors"])
    assert any("broken.jsonl:2: malformed JSON" in e for e in report["file_errors"])
    kept = _read(tmp_path / "out")["id"]
    assert sorted(kept) == ["a", "b", "c"]  # c was read before its file broke


def test_a_killed_run_resumes_at_shard_granularity(tmp_path, monkeypatch):
    import nanoforge.data.clean as clean_mod

    rng = random.Random(2)
    src = tmp_path / "in"
    src.mkdir()
    base = prose(rng)
    for k in range(4):  # shard 3 holds an exact duplicate of shard 0's first document
        _write(src / f"s{k}.jsonl", [(f"s{k}-a", base if k in (0, 3) else prose(rng)), (f"s{k}-b", prose(rng))])
    real, calls, die = clean_mod._clean_shard, [], {2}

    def counted(path, index, *rest):
        calls.append(index)
        if index in die:
            raise KeyboardInterrupt  # the process is killed while this shard runs
        return real(path, index, *rest)

    monkeypatch.setattr(clean_mod, "_clean_shard", counted)
    with pytest.raises(KeyboardInterrupt):
        clean(CleanConfig(workers=1), src, tmp_path / "out")
    assert not (tmp_path / "out").exists() and calls == [0, 1, 2]
    die.clear()
    calls.clear()
    m = clean(CleanConfig(workers=1), src, tmp_path / "out")
    assert calls == [2, 3] and m["figures"]["shards_resumed"] == 2
    clean(CleanConfig(workers=1), src, tmp_path / "fresh")
    assert _read(tmp_path / "out") == _read(tmp_path / "fresh")
    assert "s3-a" not in _read(tmp_path / "out")["id"] and "s0-a" in _read(tmp_path / "out")["id"]
    # other settings: the work directory of a killed run is not reused
    die.add(2)
    with pytest.raises(KeyboardInterrupt):
        clean(CleanConfig(workers=1), src, tmp_path / "out2")
    die.clear()
    calls.clear()
    clean(CleanConfig(workers=1, steps=["exact_dedup"]), src, tmp_path / "out2")
    assert calls == [0, 1, 2, 3]


def test_local_and_ray_executors_give_identical_output(tmp_path):
    rng = random.Random(3)
    src = tmp_path / "in"
    src.mkdir()
    base = prose(rng)
    for k in range(3):
        _write(src / f"s{k}.jsonl", [(f"s{k}-a", base.replace("quiet", f"quiet{k}", 1)), (f"s{k}-b", prose(rng)),
                                     (f"s{k}-c", prose(rng) + f"\nMail bob{k}@example.com today.")])
    local = clean(CleanConfig(workers=2), src, tmp_path / "local")
    ray_run = clean(CleanConfig(workers=2), src, tmp_path / "ray", executor="ray")
    for pattern, folder in (("docs-*.parquet", ""), ("*.parquet", "removed")):
        assert _read(tmp_path / "local" / folder, pattern) == _read(tmp_path / "ray" / folder, pattern)
    assert local["figures"]["removed_by_reason"] == ray_run["figures"]["removed_by_reason"]
    assert local["figures"]["removed_by_reason"]["near_dedup/near-duplicate"] == 2


def test_reading_a_clean_artifact_gives_the_kept_documents_only(tmp_path):
    from nanoforge.data.documents import iter_documents

    rng = random.Random(4)
    french = "Le chat dort sur le canapé pendant que la pluie tombe. " * 8
    _write(tmp_path / "a.jsonl", [("a", prose(rng)), ("b", french)])
    clean(CleanConfig(workers=1), tmp_path / "a.jsonl", tmp_path / "out")
    assert [d.id for d in iter_documents(tmp_path / "out")] == ["a"]  # not the removed `b` under removed/
    assert [d.id for d in iter_documents(tmp_path / "out" / "removed")] == ["b"]


def test_files_of_one_name_in_two_folders_give_distinct_ids(tmp_path):
    rng = random.Random(5)
    twice, once = prose(rng), prose(rng)
    src = tmp_path / "in"
    for folder, texts in (("a", [twice, once]), ("b", [prose(rng)]), ("c", [twice])):
        (src / folder).mkdir(parents=True)
        (src / folder / "x.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    clean(CleanConfig(steps=["exact_dedup"], workers=1), src, tmp_path / "out")
    kept = _read(tmp_path / "out")
    assert sorted(kept["id"]) == ["a/x:1", "a/x:2", "b/x:1"]  # generated ids: path under the input, line
    removed = _read(tmp_path / "out" / "removed", "*.parquet")
    assert (removed["id"], removed["duplicate_of"]) == (["c/x:1"], ["a/x:1"])


def test_duplicate_ids_are_refused_where_dedup_keys_on_them(tmp_path):
    rng = random.Random(6)
    same = prose(rng)
    _write(tmp_path / "a.jsonl", [("1", same), ("2", prose(rng))])
    _write(tmp_path / "b.jsonl", [("1", prose(rng)), ("3", same)])  # dropping b's "3" must not drop a's "1"
    with pytest.raises(NanoforgeError, match=r"occur more than once, e.g. '1' \(in .*a.jsonl, .*b.jsonl\)"):
        clean(CleanConfig(steps=["exact_dedup"], workers=1), tmp_path, tmp_path / "out")
    assert not (tmp_path / "out").exists()
    m = clean(CleanConfig(steps=["pii"], workers=1), tmp_path, tmp_path / "out")  # no dedup: ids are not keys
    assert m["figures"]["documents_out"] == 4


def test_lone_surrogates_in_jsonl_do_not_stop_the_stage(tmp_path):
    rng = random.Random(7)
    _write(tmp_path / "a.jsonl", [("a", prose(rng) + " \ud800"), ("b\udfff", prose(rng))])
    clean(CleanConfig(steps=["pii", "exact_dedup"], workers=1), tmp_path / "a.jsonl", tmp_path / "out")
    kept = _read(tmp_path / "out")
    assert kept["id"] == ["a", "b\ufffd"] and kept["text"][0].endswith(" \ufffd")
