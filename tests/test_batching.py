"""Continuous batching (nanoforge/infer/batching.py): sequences that join a running batch at different steps
get the tokens they get alone from `engine.generate`.

python -m pytest tests/test_batching.py -q
"""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from nanoforge.errors import NanoforgeError
from nanoforge.infer.batching import ContinuousBatch
from nanoforge.infer.engine import generate
from nanoforge.model import GPT, ModelConfig

V, T = 61, 48
PROMPTS = [[3, 1, 4, 1, 5, 9, 2, 6], [2, 7], [1, 8, 2, 8, 1], [5] * 20, [7, 7, 7]]
SAMPLING = [dict(temperature=0.0), dict(temperature=0.9, top_k=20, seed=3), dict(temperature=0.0),
            dict(temperature=1.0, top_p=0.9, seed=5), dict(temperature=0.0)]
BUDGETS = [12, 10, 30, 20, 5]
JOIN_AT = [0, 0, 2, 2, 5]  # the step before which each sequence is added


def model_of(flavour: str, **kw) -> GPT:
    torch.manual_seed(0)
    m = GPT(ModelConfig(vocab_size=V, seq_len=T, n_layer=2, n_embd=32, n_head=4, flavour=flavour, **kw))
    with torch.no_grad():
        m.lm_head.weight.mul_(20)
    return m


def run(batch: ContinuousBatch, joins: dict[int, list[int]], stop=(0,), cancel: dict[int, int] | None = None):
    """Add sequence i before step JOIN_AT[i] (from `joins`), step until idle; the tokens and end events of each."""
    outs: dict[int, list[int]] = {i: [] for i in range(len(PROMPTS))}
    ended: list[int] = []
    handles: dict[int, int] = {}
    t, sizes = 0, []
    while batch.busy or any(t <= at for at in joins):
        for i in joins.get(t, []):
            handles[batch.add(PROMPTS[i], max_new_tokens=BUDGETS[i], stop_tokens=stop, **SAMPLING[i])] = i
        for i, at in (cancel or {}).items():
            if t == at:
                batch.cancel(next(h for h, j in handles.items() if j == i))
        for handle, token in batch.step():
            (ended.append(handles[handle]) if token is None else outs[handles[handle]].append(token))
        sizes.append(len(batch.running))
        t += 1
    return outs, ended, sizes


def joins_of(indices) -> dict[int, list[int]]:
    joins: dict[int, list[int]] = {}
    for i in indices:
        joins.setdefault(JOIN_AT[i], []).append(i)
    return joins


@pytest.mark.parametrize("flavour, kw", [("llama", dict(n_kv_head=2, qk_norm=True)), ("gpt2", {})])
@pytest.mark.parametrize("max_batch", [16, 2])
def test_joining_sequences_get_what_they_get_alone(flavour: str, kw: dict, max_batch: int) -> None:
    m = model_of(flavour, **kw)
    alone = [generate(m, [p], max_new_tokens=n, stop_tokens=[0], **s)[0]
             for p, n, s in zip(PROMPTS, BUDGETS, SAMPLING, strict=True)]
    outs, ended, sizes = run(ContinuousBatch(m, max_batch), joins_of(range(len(PROMPTS))))
    assert [outs[i] for i in range(len(PROMPTS))] == alone
    assert sorted(ended) == list(range(len(PROMPTS)))  # each sequence ends exactly once
    assert max(sizes) == min(max_batch, 5)  # they did run together, never more than max_batch
    assert sizes[-1] == 0


def test_cancelled_sequences_leave_and_the_others_go_on() -> None:
    m = model_of("llama", n_kv_head=1)
    alone = [generate(m, [PROMPTS[i]], max_new_tokens=BUDGETS[i], stop_tokens=[0], **SAMPLING[i])[0] for i in (0, 2)]
    outs, ended, _ = run(ContinuousBatch(m), joins_of([0, 1, 2]), cancel={1: 3})
    assert (outs[0], outs[2]) == tuple(alone)
    assert len(outs[1]) == 3 and 1 not in ended  # a cancelled sequence gets no end event


def test_context_limit_and_bad_requests() -> None:
    m = model_of("llama")
    batch = ContinuousBatch(m)
    long = batch.add([1] * (T - 2), max_new_tokens=50, temperature=0.0)
    events = []
    while batch.busy:
        events += batch.step()
    assert [tok for h, tok in events if h == long][-1] is None
    assert len([tok for h, tok in events if h == long and tok is not None]) <= 2  # the context holds 2 more
    with pytest.raises(NanoforgeError, match="context"):
        batch.add([1] * T, max_new_tokens=5)
    with pytest.raises(NanoforgeError, match="temperature"):
        batch.add([1], max_new_tokens=5, temperature=-1)


def test_models_with_adapters_decode_through_their_modules() -> None:
    m = model_of("llama", n_kv_head=2)

    def favour_token_5(module: torch.nn.Module, args: tuple, out: torch.Tensor) -> torch.Tensor:
        out[..., 5] += 1e4
        return out

    m.lm_head.register_forward_hook(favour_token_5)
    outs, _, _ = run(ContinuousBatch(m), {0: [0, 2]})
    assert outs[0] == [5] * BUDGETS[0] and outs[2] == [5] * BUDGETS[2]


def test_serving_benchmark_quick_mode_gives_the_same_replies_every_way(tmp_path: Path) -> None:
    script = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_serve.py"
    out = tmp_path / "bench.jsonl"
    run = subprocess.run([sys.executable, str(script), "--quick", "--rounds", "1", "--out", str(out)],
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    results = json.loads(out.read_text())["results"]
    assert len(results) == 3 and all(r["same_replies"] and r["tok_s"] > 0 for r in results.values())


def test_max_batch_must_be_positive() -> None:
    with pytest.raises(NanoforgeError, match="max-batch"):
        ContinuousBatch(model_of("llama"), max_batch=0)
