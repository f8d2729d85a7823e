"""The labelling app (nanoforge/feedback): store, HTTP API under concurrent load, auth, export, agreement, judge.

python -m pytest tests/test_feedback.py -q

The app runs in-process on a free port (`run_server`); clients talk to it over real HTTP with aiohttp.
Items are written straight into the store (no model needed): the web page itself is tested in
tests/test_label_web.py, sampling and the unattended stage in tests/test_reward.py.
"""

from __future__ import annotations

import asyncio
import json
import random
import sqlite3
import urllib.error
import urllib.request
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import aiohttp
import pytest
import torch

from nanoforge.cli import main
from nanoforge.errors import NanoforgeError
from nanoforge.feedback.app import create_app
from nanoforge.feedback.export import export_preferences, preference_rows
from nanoforge.feedback.items import read_prompts
from nanoforge.feedback.judge import RuleJudge, is_correct, repetition, token_f1
from nanoforge.feedback.label import read_annotators
from nanoforge.feedback.simulate import register_simulated, simulate
from nanoforge.feedback.store import Conflict, FeedbackStore, Item, NotAssigned, agreement, cohen_kappa
from nanoforge.infer.server import run_server
from nanoforge.post.preference import read_preferences

N_CLIENTS, PER_CLIENT = 20, 50


def make_items(n: int) -> list[Item]:
    return [Item([{"role": "user", "content": f"question {i}"}], (f"answer {i} zero", f"answer {i} one"),
                 ({"temperature": 0.7, "seed": 0, "row": i}, {"temperature": 1.1, "seed": 1, "row": i}),
                 reference=f"answer {i} zero" if i % 2 else None) for i in range(n)]


@pytest.fixture
def db(tmp_path: Path) -> Path:
    path = tmp_path / "labels.sqlite"
    store = FeedbackStore(path, seed=0)
    assert store.add_items(make_items(60)) == 60
    assert store.add_items(make_items(60)) == 0  # the same items again are not duplicated
    for i in range(N_CLIENTS):
        store.add_annotator(f"ann{i:02d}", f"token-{i:02d}-secret")
    store.close()
    return path


@pytest.fixture
def url(db: Path) -> Iterator[str]:
    with run_server(create_app(db, seed=0)) as base:
        yield base


def rows(db: Path, sql: str) -> list[tuple]:
    con = sqlite3.connect(db)
    try:
        return con.execute(sql).fetchall()
    finally:
        con.close()


async def client(session: aiohttp.ClientSession, url: str, token: str, n: int) -> list[int]:
    """One annotator's browser: next, judge, repeat; a random choice each time."""
    headers, rng, ids = {"Authorization": f"Bearer {token}"}, random.Random(token), []
    for _ in range(n):
        async with session.get(url + "api/next", headers=headers) as r:
            assert r.status == 200
            item = await r.json()
        body = {"item_id": item["item_id"], "choice": rng.choice(["A", "B", "tie", "skip"]), "reason": "why"}
        async with session.post(url + "api/judgements", json=body, headers=headers) as r:
            assert r.status == 201, await r.text()
            ids.append((await r.json())["id"])
    return ids


def test_concurrent_clients_store_every_judgement_exactly_once(db: Path, url: str) -> None:
    async def run() -> list[list[int]]:
        async with aiohttp.ClientSession() as session:
            return await asyncio.gather(*(client(session, url, f"token-{i:02d}-secret", PER_CLIENT)
                                          for i in range(N_CLIENTS)))

    ids = asyncio.run(run())
    assert len({i for part in ids for i in part}) == N_CLIENTS * PER_CLIENT
    assert rows(db, "SELECT COUNT(*) FROM judgements") == [(1000,)]
    assert rows(db, "SELECT COUNT(DISTINCT annotator_id || '-' || item_id) FROM judgements") == [(1000,)]
    assert sorted(n for (n,) in rows(db, "SELECT COUNT(*) FROM judgements GROUP BY annotator_id")) == [50] * 20
    assert rows(db, "SELECT SUM(assigned) FROM items") == [(1000,)]
    # items are spread evenly: 1000 assignments over 60 items, least-assigned first
    counts = [n for (n,) in rows(db, "SELECT assigned FROM items")]
    assert max(counts) - min(counts) <= 1
    # the preferred response follows the side order: A is the left response, B the other
    for choice, left, preferred in rows(db, "SELECT choice, left_response, preferred FROM judgements"):
        assert preferred == {"A": left, "B": 1 - left}.get(choice)
    assert {left for (left,) in rows(db, "SELECT left_response FROM assignments")} == {0, 1}


def test_tokens_are_required_and_nothing_is_written_without_one(db: Path, url: str) -> None:
    async def run() -> list[int]:
        statuses = []
        async with aiohttp.ClientSession() as s:
            for headers in ({}, {"Authorization": "Bearer wrong-token-xyz"}, {"Authorization": "Basic abc"}):
                for method, path in (("GET", "api/next"), ("GET", "api/me"), ("GET", "api/stats"),
                                     ("POST", "api/judgements")):
                    body = {"item_id": 1, "choice": "A"} if method == "POST" else None
                    async with s.request(method, url + path, json=body, headers=headers) as r:
                        statuses.append(r.status)
                        assert "error" in await r.json()
            async with s.get(url + "health") as r:
                statuses.append(r.status)
        return statuses

    statuses = asyncio.run(run())
    assert statuses == [401] * 4 + [403] * 4 + [401] * 4 + [200]
    assert rows(db, "SELECT COUNT(*) FROM judgements") == [(0,)]
    assert rows(db, "SELECT COUNT(*) FROM assignments") == [(0,)]
    assert all(len(h) == 64 and "secret" not in h for (h,) in rows(db, "SELECT token_sha256 FROM annotators"))


def test_resubmission_unassigned_and_bad_requests_are_refused(db: Path, url: str) -> None:
    headers = {"Authorization": "Bearer token-00-secret"}

    async def run() -> dict[str, object]:
        out: dict[str, object] = {}
        async with aiohttp.ClientSession(headers=headers) as s:
            async with s.get(url + "api/next") as r:
                item = await r.json()
            async with s.get(url + "api/next") as r:  # a reload shows the same unanswered item
                out["same"] = (await r.json())["item_id"] == item["item_id"]
            body = {"item_id": item["item_id"], "choice": "A"}
            posts = [s.post(url + "api/judgements", json=body) for _ in range(2)]
            responses = await asyncio.gather(*posts)
            out["double"] = sorted(r.status for r in responses)
            other = item["item_id"] % 60 + 1
            async with s.post(url + "api/judgements", json={"item_id": other, "choice": "A"}) as r:
                out["unassigned"] = r.status
            for bad in ({"item_id": "1", "choice": "A"}, {"item_id": 1, "choice": "C"}, [1],
                        {"item_id": 1, "choice": "A", "reason": 5}):
                async with s.post(url + "api/judgements", json=bad) as r:
                    out.setdefault("bad", []).append(r.status)
            async with s.post(url + "api/judgements", data=b"x" * (70 << 10)) as r:
                out["big"] = r.status
        return out

    out = asyncio.run(run())
    assert out == {"same": True, "double": [201, 409], "unassigned": 404, "bad": [400, 400, 400, 400], "big": 413}
    assert rows(db, "SELECT COUNT(*) FROM judgements") == [(1,)]


def test_malformed_requests_get_a_json_4xx_and_a_bug_a_json_500(db: Path, url: str,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    headers = {"Authorization": "Bearer token-00-secret"}

    async def run() -> dict[str, object]:
        out: dict[str, object] = {}
        async with aiohttp.ClientSession(headers=headers) as s:
            async with s.get(url + "api/next") as r:
                item_id = (await r.json())["item_id"]
            bodies = {"deep": b"[" * 60_000,  # deeper than json.loads recurses (and under the 64 KiB limit)
                      "digits": b'{"item_id": 1' + b"0" * 5000 + b', "choice": "A"}',  # beyond int's 4300 digits
                      "huge_id": json.dumps({"item_id": 10**20, "choice": "A"}).encode()}  # beyond SQLite's INTEGER
            for name, data in bodies.items():
                async with s.post(url + "api/judgements", data=data) as r:
                    out[name] = r.status, bool((await r.json())["error"])
            async with s.get(url + "api/stats") as r:  # the store breaks (monkeypatched below)
                out["bug"] = r.status, await r.json()
            async with s.post(url + "api/judgements", json={"item_id": item_id, "choice": "A"}) as r:
                out["after"] = r.status
        return out

    def broken(_: FeedbackStore) -> None:
        raise RuntimeError("the disk went away")

    monkeypatch.setattr(FeedbackStore, "stats", broken)
    out = asyncio.run(run())
    assert out == {"deep": (400, True), "digits": (400, True), "huge_id": (400, True),
                   "bug": (500, {"error": "internal server error (the server's log has the details)"}), "after": 201}
    # a token that is not UTF-8 (http.client sends str headers as Latin-1 bytes) is an unknown token, not a crash
    req = urllib.request.Request(url + "api/me", headers={"Authorization": "Bearer \xff\xfe-token-00-secret"})
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(req, timeout=30)
    assert refused.value.code == 403 and json.loads(refused.value.read()) == {"error": "unknown token"}


def test_annotator_runs_out_of_items(tmp_path: Path) -> None:
    store = FeedbackStore(tmp_path / "db.sqlite", seed=1)
    store.add_items(make_items(3))
    who = store.add_annotator("solo", "solo-token-123")
    seen = []
    while (item := store.next_item(who)) is not None:
        seen.append(item["item_id"])
        store.record(who, item["item_id"], "skip")
    assert sorted(seen) == [1, 2, 3]
    with pytest.raises(Conflict):
        store.record(who, 1, "A")
    with pytest.raises(NotAssigned):
        store.record(store.add_annotator("other", "other-token-1"), 1, "A")
    with pytest.raises(NanoforgeError, match="another annotator"):
        store.add_annotator("thief", "solo-token-123")


def vote(store: FeedbackStore, name: str, item_id: int, preferred: int | str) -> None:
    """`name` judges `item_id`: preferred response 0 or 1, "tie" or "skip", whichever side it is shown on
    (the assignment the page would have made is written directly, with a random side)."""
    who = store.annotator(f"{name}-token-xyz") or store.add_annotator(name, f"{name}-token-xyz")
    left = random.Random(f"{name}{item_id}").randrange(2)
    store.db.execute("INSERT INTO assignments VALUES (?, ?, ?, 0)", (who.id, item_id, left))
    choice = preferred if isinstance(preferred, str) else "A" if preferred == left else "B"
    store.record(who, item_id, choice)


def test_export_majority_margins_and_ties(tmp_path: Path) -> None:
    store = FeedbackStore(tmp_path / "db.sqlite", seed=3)
    store.add_items(make_items(5))
    plan = {1: ["0", "0"], 2: ["0", "1"], 3: ["1", "tie"], 4: ["tie", "tie"], 5: ["skip", "1"]}
    for item_id, votes in plan.items():
        for who, v in zip(("ann", "bob"), votes, strict=True):
            vote(store, who, item_id, int(v) if v.isdigit() else v)
    got, counts = preference_rows(store)
    assert counts == {"items_voted": 5, "pairs": 3, "dropped_even": 2}
    chosen = {r["prompt"][0]["content"]: (r["chosen"][0]["content"], r["margin"]) for r in got}
    assert chosen == {"question 0": ("answer 0 zero", 1.0), "question 2": ("answer 2 one", 0.5),
                      "question 4": ("answer 4 one", 1.0)}
    store.close()
    out = tmp_path / "prefs.jsonl"
    assert export_preferences(tmp_path / "db.sqlite", out)["pairs"] == 3
    back = read_preferences(out)  # what reward/dpo read: TRL conversational format
    assert [r["chosen"] for r in back] == ["answer 0 zero", "answer 2 one", "answer 4 one"]
    assert all(r["prompt"] == [{"role": "user", "content": r["prompt"][0]["content"]}] for r in back)
    assert main(["label", "export", "--db", str(tmp_path / "db.sqlite"), "--out", str(out), "--who", "human"]) == 0
    assert len(out.read_text().splitlines()) == 3


def test_cohen_kappa_and_agreement() -> None:
    pairs = [("0", "0")] * 20 + [("0", "1")] * 5 + [("1", "0")] * 10 + [("1", "1")] * 15
    # the textbook example: p_o = 0.7, p_e = 0.5·0.6 + 0.5·0.4 = 0.5, κ = 0.4
    assert cohen_kappa(pairs) == pytest.approx(0.4)
    assert cohen_kappa([("0", "0"), ("0", "0")]) is None and cohen_kappa([]) is None
    rng = random.Random(0)
    labels = ["0", "1", "tie"]
    pairs = [(rng.choice(labels), rng.choice(labels)) for _ in range(300)]
    n = len(pairs)
    p_o = sum(a == b for a, b in pairs) / n
    p_e = sum(sum(a == k for a, _ in pairs) / n * sum(b == k for _, b in pairs) / n for k in labels)
    assert cohen_kappa(pairs) == pytest.approx((p_o - p_e) / (1 - p_e))
    judgements = [
        {"annotator": "x", "item_id": 1, "choice": "A", "preferred": 1},
        {"annotator": "y", "item_id": 1, "choice": "B", "preferred": 1},  # other side, same response: agree
        {"annotator": "x", "item_id": 2, "choice": "tie", "preferred": None},
        {"annotator": "y", "item_id": 2, "choice": "A", "preferred": 0},
        {"annotator": "y", "item_id": 3, "choice": "skip", "preferred": None},
        {"annotator": "x", "item_id": 3, "choice": "A", "preferred": 0},
    ]
    g = agreement(judgements)
    assert (g["items"], g["pairs"], g["percent_agreement"]) == (2, 2, 50.0)
    assert g["by_pair"] == [{"annotators": ["x", "y"], "pairs": 2, "percent_agreement": 50.0,
                             "kappa": cohen_kappa([("1", "1"), ("tie", "0")])}]


def test_judge_rules() -> None:
    judge = RuleJudge()
    assert judge.compare("", "anything")[0] == "B"
    assert judge.compare("<think>5+7=12</think><answer>12</answer>", "<answer>13</answer>", "12")[0] == "A"
    assert judge.compare("It is 13, no wait", "so 1,012 it is", "1012")[0] == "B"  # last integer, commas
    assert is_correct("<answer>Paris.</answer>", "paris") and not is_correct("<answer></answer>", "paris")
    demonstration = "<think>8+5=13, 8+0+1=9</think><answer>93</answer>"  # an SFT answer as the reference
    assert is_correct("<think>8+5=13</think><answer>93</answer>", demonstration)
    assert not is_correct("<think>8+5=13, 8+0+1=9</think><answer>94</answer>", demonstration)
    assert token_f1("the cat sat", "the cat") == pytest.approx(0.8)
    assert judge.compare("the big red cat", "a dog", "the red cat")[0] == "A"  # F1 with the reference
    assert repetition("a b a b a b") == pytest.approx(0.6)
    assert judge.compare("one two one two one two one two", "one two three four five six seven")[0] == "B"
    assert judge.compare("one two three four five six", "one two")[0] == "B"  # shorter
    assert judge.compare("one two three", "four five six") == ("tie", "no rule separates them")
    noisy = [RuleJudge(noise=1.0, seed=s).compare("x", "x y z w")[0] for s in range(20)]
    assert set(noisy) == {"A", "B"}


def test_simulated_annotators_fill_the_store_over_http(db: Path, url: str) -> None:
    store = FeedbackStore(db)
    sims = register_simulated(store, 2, noise=0.0)
    store.close()
    counts = simulate(url, sims, limit=30)
    assert counts == {"simulated-1": 30, "simulated-2": 30}
    got = rows(db, "SELECT j.simulated, a.simulated, j.reason FROM judgements j JOIN annotators a "
                   "ON a.id = j.annotator_id")
    assert len(got) == 60 and all(j == 1 and a == 1 and r.startswith("[simulated-") for j, a, r in got)
    # with a reference (odd items: response 0 equals it) the judge always picks response 0
    picked = rows(db, "SELECT j.preferred FROM judgements j JOIN items i ON i.id = j.item_id "
                      "WHERE i.reference IS NOT NULL")
    assert picked and all(p == 0 for (p,) in picked)


def test_prompt_and_annotator_files(tmp_path: Path) -> None:
    f = tmp_path / "p.jsonl"
    f.write_text("\n".join(json.dumps(x) for x in [
        {"prompt": "What is 2 + 3?", "answer": "5"},
        {"prompt": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]},
        {"messages": [{"role": "user", "content": "Name it"}, {"role": "assistant", "content": "json"}]},
    ]) + "\n\n")
    got = read_prompts(f)
    assert [(len(r.messages), r.reference) for r in got] == [(1, "5"), (2, None), (1, "json")]
    (tmp_path / "plain.txt").write_text("first prompt\n\n second \n")
    assert [r.messages[0]["content"] for r in read_prompts(tmp_path / "plain.txt")] == ["first prompt", "second"]
    (tmp_path / "bad.jsonl").write_text('{"prompt": "ok"}\n{"prompt": \n')
    with pytest.raises(NanoforgeError, match=r"bad.jsonl:2: malformed JSON"):
        read_prompts(tmp_path / "bad.jsonl")
    (tmp_path / "team.txt").write_text("# the team\nada  ada-token-123\nbob bob-token-456  # night shift\n")
    assert read_annotators(tmp_path / "team.txt") == [("ada", "ada-token-123"), ("bob", "bob-token-456")]
    (tmp_path / "team.json").write_text('{"ada": "ada-token-123"}')
    assert read_annotators(tmp_path / "team.json") == [("ada", "ada-token-123")]
    (tmp_path / "short.txt").write_text("ada short\n")
    with pytest.raises(NanoforgeError, match="at least 8 characters"):
        read_annotators(tmp_path / "short.txt")


def test_stats_endpoint(db: Path, url: str) -> None:
    store = FeedbackStore(db)
    for name in ("ann00", "ann01"):
        who = store.annotator(f"token-{name[3:]}-secret")
        for _ in range(60):
            item = store.next_item(who)
            store.record(who, item["item_id"], "A")  # always the left side: random responses
    store.close()

    async def get() -> dict:
        async with aiohttp.ClientSession() as s:
            async with s.get(url + "api/stats", headers={"Authorization": "Bearer token-05-secret"}) as r:
                return await r.json()

    stats = asyncio.run(get())
    assert (stats["items"], stats["items_judged"], stats["judgements"], stats["progress"]) == (60, 60, 120, 1.0)
    per = {a["name"]: a for a in stats["annotators"]}
    assert per["ann00"]["judgements"] == per["ann01"]["judgements"] == 60 and per["ann02"]["judgements"] == 0
    g = stats["agreement"]
    assert g["items"] == 60 and g["pairs"] == 60
    judged = FeedbackStore(db).judgements()
    labels = {(j["annotator"], j["item_id"]): str(j["preferred"]) for j in judged}
    pairs = [(labels["ann00", i], labels["ann01", i]) for i in range(1, 61)]
    assert g["kappa"] == pytest.approx(cohen_kappa(pairs))
    assert g["percent_agreement"] == pytest.approx(100 * sum(a == b for a, b in pairs) / 60)
    assert Counter(stats["choices"]) == Counter({"A": 120})


def test_label_cli_simulate_and_refusals(db: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert main(["label", "--db", str(db), "--simulate", "2", "--set", "noise=0"]) == 0
    assert "120 simulated judgements stored" in capsys.readouterr().out  # 2 annotators × every one of 60 items
    assert rows(db, "SELECT COUNT(*), SUM(simulated) FROM judgements") == [(120, 120)]
    assert main(["label", "--db", str(tmp_path / "missing.sqlite")]) == 2
    assert "give --model and --prompts to create it" in capsys.readouterr().err
    assert main(["label", "--db", str(db), "--model", str(tmp_path)]) == 2
    assert "give both --model and --prompts" in capsys.readouterr().err
    assert main(["label", "export", "--db", str(db)]) == 2
    assert main(["label", "--db", str(db), "--simulate", "1", "--set", "temperatures=1"]) == 2
    assert "two temperatures" in capsys.readouterr().err


def test_fill_samples_pairs_once_and_records_how(tiny_chat_model: Path, tmp_path: Path) -> None:
    from nanoforge.feedback.label import LabelConfig, fill
    from nanoforge.infer.chat import ChatModel
    from nanoforge.infer.engine import generate

    prompts = tmp_path / "prompts.txt"
    prompts.write_text("".join(f"Tell me about topic {i}.\n" for i in range(10)))
    db = tmp_path / "db.sqlite"
    cfg = LabelConfig(temperatures=[0.7, 1.5], max_new_tokens=12, batch_size=4, device="cpu", threads=1)
    threads = torch.get_num_threads()
    try:
        first = fill(cfg, db, tiny_chat_model, prompts)
    finally:
        torch.set_num_threads(threads)
    assert first["prompts"] == 10 and first["items"] + first["identical"] == 10 and first["added"] == first["items"]
    assert fill(cfg, db, tiny_chat_model, prompts) == first  # the same inputs: not sampled again
    store = FeedbackStore(db)
    items = store.items()
    store.close()
    assert len(items) == first["items"]
    cm = ChatModel.load(tiny_chat_model, "cpu")
    item = items[min(items)]
    s0, s1 = item["sampling"]
    assert (s0["temperature"], s1["temperature"], s0["row"], s0["model"]) == (0.7, 1.5, 0, "tiny-chat")
    batch = [cm.chat_prompt([{"role": "user", "content": f"Tell me about topic {i}."}]) for i in range(4)]
    again = generate(cm.model, batch, max_new_tokens=12, temperature=0.7, top_k=50, stop_tokens=cm.chat_stop,
                     seed=s0["seed"])  # the batch, seed and row recorded give the response back
    assert cm.tok.decode(again[s0["row"]]) == item["responses"][0]
