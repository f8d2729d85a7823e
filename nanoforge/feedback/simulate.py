"""Simulated annotators: the rule-based judge (judge.py) labelling through the app's HTTP API, as a person would.

    tokens = register_simulated(store, 2, noise=0.1)        # annotators marked simulated in the database
    counts = simulate("http://127.0.0.1:8100/", tokens)     # each one: GET /api/next, judge, POST, repeat

They use exactly the endpoints of the labelling page, so every judgement they make goes through the same
checks and the same store, and carries `simulated = 1` (their annotator's flag) in the database; the
demo and the tests use them where no person is at hand.
"""

from __future__ import annotations

import asyncio
import secrets
from dataclasses import dataclass

import aiohttp

from nanoforge.errors import NanoforgeError
from nanoforge.feedback.judge import RuleJudge
from nanoforge.feedback.store import FeedbackStore


@dataclass
class SimulatedAnnotator:
    name: str
    token: str
    judge: RuleJudge


def register_simulated(store: FeedbackStore, count: int, *, noise: float = 0.0, seed: int = 0,
                       prefix: str = "simulated") -> list[SimulatedAnnotator]:
    """Add `count` simulated annotators (`simulated-1`, …) with fresh tokens; annotator i's judge draws its
    noise from seed + i."""
    out = []
    for i in range(1, count + 1):
        name, token = f"{prefix}-{i}", secrets.token_urlsafe(24)
        store.add_annotator(name, token, simulated=True)
        out.append(SimulatedAnnotator(name, token, RuleJudge(noise=noise, seed=seed + i)))
    return out


async def annotate(session: aiohttp.ClientSession, url: str, who: SimulatedAnnotator, limit: int | None = None) -> int:
    """Judge items until none is left (or `limit`); returns the number of judgements stored."""
    headers = {"Authorization": f"Bearer {who.token}"}
    done = 0
    while limit is None or done < limit:
        async with session.get(url + "api/next", headers=headers) as resp:
            item = await _json(resp, 200)
        if item["done"]:
            break
        choice, reason = who.judge.compare(item["A"], item["B"], item.get("reference"))
        body = {"item_id": item["item_id"], "choice": choice, "reason": f"[{who.name}] {reason}"}
        async with session.post(url + "api/judgements", json=body, headers=headers) as resp:
            await _json(resp, 201)
        done += 1
    return done


async def _json(resp: aiohttp.ClientResponse, expected: int) -> dict:
    data = await resp.json(content_type=None)
    if resp.status != expected:
        raise NanoforgeError(f"labelling app: {resp.method} {resp.url.path} answered {resp.status}: "
                             f"{data.get('error') if isinstance(data, dict) else data}")
    return data


def simulate(url: str, annotators: list[SimulatedAnnotator], limit: int | None = None) -> dict[str, int]:
    """Run the annotators concurrently against the app at `url`; returns judgements per annotator."""
    url = url if url.endswith("/") else url + "/"

    async def main() -> list[int]:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=None, sock_read=120)) as session:
            return await asyncio.gather(*(annotate(session, url, a, limit) for a in annotators))

    return dict(zip([a.name for a in annotators], asyncio.run(main()), strict=True))
