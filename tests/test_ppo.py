"""PPO (nanoforge/post/ppo.py): KL-penalised rewards, GAE, the clipped losses against their formulas on fixed
tensors, and short runs that raise the reward (of a trained reward model, and of a reward function).

python -m pytest tests/test_ppo.py -q

The toy setting (tests/rlhf_toy.py): a tiny chat model, preferences between its answers from simulated
annotators, a reward model trained on them here; PPO must raise that reward model's score.
"""

from __future__ import annotations

import json
import math
import random
from pathlib import Path

import pytest
import torch
from rlhf_toy import Toy

from nanoforge.cli import main
from nanoforge.feedback.judge import words
from nanoforge.model import GPT, ModelConfig
from nanoforge.post.ppo import (
    PolicyWithValue,
    PPOConfig,
    gae,
    kl_rewards,
    masked_whiten,
    per_token,
    ppo_losses,
    train_ppo,
)
from nanoforge.post.preference import sequence_batch
from nanoforge.post.reward import RewardConfig, train_reward
from nanoforge.train.metrics import MetricsLog


@pytest.fixture(scope="module")
def reward_model(setting: Toy, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("ppo-rm") / "rm"
    train_reward(RewardConfig(max_steps=80, lr=3e-4, batch_size=16, threads=1, device="cpu"), setting.sft,
                 setting.prefs, out)
    return out


# fixed tensors: 3 responses of lengths 4, 2 and 3 (L = 4)
MASK = torch.tensor([[1.0, 1, 1, 1], [1, 1, 0, 0], [1, 1, 1, 0]])
LOGP = torch.tensor([[-1.0, -2.0, -0.5, -1.5], [-0.2, -3.0, 0, 0], [-1.1, -0.7, -2.2, 0]])
REF = torch.tensor([[-1.2, -1.0, -0.5, -2.5], [-0.1, -2.0, 0, 0], [-1.0, -1.7, -2.0, 0]])
VALUES = torch.tensor([[0.5, 0.4, 0.3, 0.2], [-0.3, 0.1, 0, 0], [0.0, 0.2, 0.4, 0]])
SCORES = torch.tensor([1.0, -0.5, 2.0])


def lengths() -> list[int]:
    return [int(n) for n in MASK.sum(1).tolist()]


def test_kl_penalised_rewards() -> None:
    rewards, kl = kl_rewards(SCORES, LOGP, REF, MASK, kl_coef=0.1)
    for i, n in enumerate(lengths()):
        for t in range(4):
            expected = 0.0
            if t < n:
                expected = -0.1 * (LOGP[i, t] - REF[i, t]) + (SCORES[i] if t == n - 1 else 0.0)
                assert kl[i, t] == pytest.approx(float(LOGP[i, t] - REF[i, t]))
            assert rewards[i, t] == pytest.approx(float(expected), abs=1e-6)


def test_gae_is_the_recursion_and_the_discounted_sum() -> None:
    rewards, _ = kl_rewards(SCORES, LOGP, REF, MASK, kl_coef=0.1)
    gamma, lam = 0.9, 0.8
    advantages, returns = gae(rewards, VALUES, MASK, gamma, lam)
    for i, n in enumerate(lengths()):
        r, v = rewards[i, :n].tolist(), VALUES[i, :n].tolist() + [0.0]  # V = 0 after the last token
        deltas = [r[t] + gamma * v[t + 1] - v[t] for t in range(n)]
        for t in range(n):  # A_t = Σ_k (γλ)^k δ_{t+k}
            expected = sum((gamma * lam) ** k * deltas[t + k] for k in range(n - t))
            assert advantages[i, t] == pytest.approx(expected, abs=1e-6)
            assert returns[i, t] == pytest.approx(expected + v[t], abs=1e-6)
        assert advantages[i, n:].abs().sum() == 0 and returns[i, n:].abs().sum() == 0
    # λ = 1: advantages are the discounted reward-to-go minus the value (Monte Carlo)
    advantages, returns = gae(rewards, VALUES, MASK, 1.0, 1.0)
    for i, n in enumerate(lengths()):
        for t in range(n):
            to_go = float(rewards[i, t:n].sum())
            assert returns[i, t] == pytest.approx(to_go, abs=1e-5)
            assert advantages[i, t] == pytest.approx(to_go - float(VALUES[i, t]), abs=1e-5)


def test_clipped_losses_are_the_formulas() -> None:
    old = LOGP
    new = LOGP + torch.tensor([[0.3, -0.4, 0.05, 0.0], [-0.1, 0.5, 9.0, 9.0], [0.25, -0.25, 0.1, 9.0]])
    adv = torch.tensor([[1.0, -1.0, 0.5, 2.0], [-2.0, 1.5, 7.0, 7.0], [0.3, 0.3, -0.7, 7.0]])
    returns = torch.tensor([[1.0, 0.0, 0.5, 0.2], [0.3, -0.3, 5.0, 5.0], [0.2, 0.9, 0.1, 5.0]])
    new_values = VALUES + torch.tensor([[0.5, -0.1, 0.0, 0.3], [0.05, -0.4, 3.0, 3.0], [0.1, 0.3, -0.25, 3.0]])
    eps, eps_v = 0.2, 0.2
    out = ppo_losses(new, old, adv, new_values, VALUES, returns, MASK, eps, eps_v)
    pg, vf, clipped, n = 0.0, 0.0, 0, 0
    for i, length in enumerate(lengths()):
        for t in range(length):
            ratio = math.exp(float(new[i, t] - old[i, t]))
            a = float(adv[i, t])
            pg += max(-a * ratio, -a * min(max(ratio, 1 - eps), 1 + eps))
            v, v_old, ret = float(new_values[i, t]), float(VALUES[i, t]), float(returns[i, t])
            v_clip = v_old + min(max(v - v_old, -eps_v), eps_v)
            vf += max((v - ret) ** 2, (v_clip - ret) ** 2)
            clipped += abs(ratio - 1) > eps
            n += 1
    assert float(out["pg_loss"]) == pytest.approx(pg / n, rel=1e-5)
    assert float(out["vf_loss"]) == pytest.approx(0.5 * vf / n, rel=1e-5)
    assert float(out["clipfrac"]) == pytest.approx(clipped / n)
    w = masked_whiten(adv, MASK)
    assert float((w * MASK).sum()) == pytest.approx(0.0, abs=1e-5)
    assert float((w**2 * MASK).sum() / MASK.sum()) == pytest.approx(1.0, abs=1e-4)


def test_per_token_log_probs_and_values_line_up_with_the_responses() -> None:
    torch.manual_seed(0)
    model = PolicyWithValue(GPT(ModelConfig(vocab_size=64, seq_len=32, n_layer=1, n_embd=16, n_head=2)))
    torch.nn.init.normal_(model.value_head.weight)
    prompts, responses = [[1, 5, 6], [1, 7]], [[9, 10, 11, 12], [13]]
    batch = sequence_batch(list(zip(prompts, responses, strict=True)), pad_id=1)
    with torch.no_grad():
        logits, values = model(batch.idx)
    logp, vals, mask = per_token(logits, values, prompts, responses, batch.targets, temperature=1.0)
    # (B, T): each response token's log-probability in place
    dense = -model.policy(batch.idx, batch.targets, reduction="none").detach()
    assert mask.tolist() == [[1, 1, 1, 1], [1, 0, 0, 0]]
    torch.testing.assert_close(logp[0], dense[0, 2:6])
    torch.testing.assert_close(logp[1, :1], dense[1, 1:2])
    torch.testing.assert_close(vals[0], values[0, 2:6])  # V(s_t): the state the token is chosen in
    halved, _, _ = per_token(logits, None, prompts, responses, batch.targets, temperature=2.0)
    expected = torch.log_softmax(logits[0, 2] / 2, -1)[9]
    assert float(halved[0, 0]) == pytest.approx(float(expected), rel=1e-5)


def small(**overrides: object) -> PPOConfig:
    values = dict(max_steps=20, lr=1e-4, batch_size=16, max_new_tokens=32, kl_coef=0.02, eval_every=10,
                  ckpt_every=100, threads=1, device="cpu")
    values.update(overrides)
    return PPOConfig(**values)


def test_a_response_cut_at_max_new_tokens_can_be_penalised(setting: Toy) -> None:
    from nanoforge.feedback.items import PromptRecord
    from nanoforge.post.ppo import PPOTrainer
    from nanoforge.tokenizer import Tokenizer
    from nanoforge.train.checkpoint import load_model_artifact

    tok = Tokenizer.load(setting.sft)
    records = [PromptRecord(messages=m) for m in setting.test_prompts(8)]
    scored = []

    def score(messages: list, prompts: list, responses: list) -> torch.Tensor:
        scored.append(responses)
        return torch.ones(len(responses))

    for penalty, max_new in ((None, 2), (0.5, 2), (0.5, 64)):
        cfg = small(missing_eos_penalty=penalty, max_new_tokens=max_new)
        model = PolicyWithValue(load_model_artifact(setting.sft))
        trainer = PPOTrainer(cfg, model, load_model_artifact(setting.sft), tok, score, torch.device("cpu"))
        ro = trainer.rollout(records, seed=0)
        ended = [r[-1] == tok.special_id("assistant_end") for r in scored[-1]]
        assert ro.scores.tolist() == [1.0 if e or penalty is None else 0.5 for e in ended]
        if max_new == 2:
            assert not all(ended)  # two tokens are too few for the toy model's answers
        else:
            assert any(ended)


def test_ppo_raises_the_reward_models_score(setting: Toy, reward_model: Path, tmp_path: Path) -> None:
    f = train_ppo(small(), setting.sft, reward_model, setting.prompts, tmp_path / "ppo")["figures"]
    assert f["score_last"] > f["score_first"] + 0.3
    assert f["val_score"] > f["val_score_before"] + 0.3  # on held-out prompts too
    rows = MetricsLog.read(tmp_path / "ppo" / "metrics.jsonl")
    assert all(r["kl"] >= -0.5 for r in rows) and rows[-1]["kl"] > 0  # the policy moved away from the reference
    manifest = json.loads((tmp_path / "ppo" / "manifest.json").read_text())
    assert set(manifest["inputs"]) == {"model", "prompts", "reward_model"}


def test_ppo_with_a_reward_function(setting: Toy, tmp_path: Path) -> None:
    """A rule instead of a model: the reward is the share of the words that are colours."""
    colours = {"red", "blue", "green", "black", "white"}

    def colourful(prompts: list, texts: list[str]) -> list[float]:
        return [sum(w in colours for w in words(t)) / max(1, len(words(t))) for t in texts]

    f = train_ppo(small(lr=5e-4, max_steps=16), setting.sft, colourful, setting.prompts, tmp_path / "ppo")["figures"]
    assert f["score_last"] > f["score_first"] + 0.1, (f["score_first"], f["score_last"])


def test_ppo_cli(setting: Toy, reward_model: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    prompts = tmp_path / "prompts.txt"
    rng = random.Random(0)
    prompts.write_text("".join(f"Tell me about the {rng.choice(['cat', 'dog', 'sun'])}.\n" for _ in range(20)))
    out = tmp_path / "ppo"
    assert main(["ppo", "--model", str(setting.sft), "--reward-model", str(reward_model), "--prompts", str(prompts),
                 "--out", str(out), "--max-steps", "2", "--batch-size", "4", "--threads", "1", "--kl-coef", "0.1",
                 "--set", "max_new_tokens=8", "--set", "minibatches=2"]) == 0
    assert "reward" in capsys.readouterr().out
    assert json.loads((out / "manifest.json").read_text())["config"]["kl_coef"] == 0.1
