"""DPO (nanoforge/post/dpo.py): the loss against its formula, precomputed vs live reference, an exact resume,
and a run on simulated-annotator preferences that raises the margin and wins against the starting model.

python -m pytest tests/test_dpo.py -q

The toy setting (tests/rlhf_toy.py): a tiny chat model and pairs of its answers judged by simulated
annotators through the labelling app. After DPO, the same judge compares the DPO model's answers with the
starting model's on prompts neither saw.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from rlhf_toy import Toy
from safetensors.torch import load_file

from nanoforge.cli import main
from nanoforge.feedback.judge import RuleJudge
from nanoforge.hf import to_transformers
from nanoforge.infer.chat import ChatModel
from nanoforge.infer.engine import generate
from nanoforge.model import GPT, ModelConfig
from nanoforge.post import preference
from nanoforge.post.dpo import DPOConfig, dpo_loss, train_dpo
from nanoforge.post.preference import response_logprobs, sequence_batch
from nanoforge.train.metrics import MetricsLog


def small(**overrides: object) -> DPOConfig:
    values = dict(max_steps=6, lr=3e-4, batch_size=8, eval_every=3, ckpt_every=3, threads=1, device="cpu")
    values.update(overrides)
    return DPOConfig(**values)


def test_dpo_loss_is_the_formula() -> None:
    pc, pr = torch.tensor([-10.0, -12.5, -3.0]), torch.tensor([-11.0, -9.0, -3.0])
    rc, rr = torch.tensor([-10.5, -12.0, -4.0]), torch.tensor([-10.0, -9.5, -2.0])
    beta = 0.1
    loss, chosen, rejected = dpo_loss(pc, pr, rc, rr, beta)
    expected = []
    for a, b, c, d in zip(pc.tolist(), pr.tolist(), rc.tolist(), rr.tolist(), strict=True):
        z = beta * ((a - c) - (b - d))
        expected.append(-math.log(1 / (1 + math.exp(-z))))
    assert float(loss) == pytest.approx(sum(expected) / 3, rel=1e-6)
    torch.testing.assert_close(chosen, beta * (pc - rc))
    torch.testing.assert_close(rejected, beta * (pr - rr))
    # at the start (policy = reference) the loss is log 2 whatever the data
    assert float(dpo_loss(pc, pr, pc, pr, 0.5)[0]) == pytest.approx(math.log(2))
    # the gradient pushes the chosen log-probability up and the rejected one down
    pc.requires_grad_(True)
    pr.requires_grad_(True)
    dpo_loss(pc, pr, rc, rr, beta)[0].backward()
    assert (pc.grad < 0).all() and (pr.grad > 0).all()


def test_response_log_probs_equal_transformers() -> None:
    """Σ log π(response | prompt) from our lm_head on response positions only = `LlamaForCausalLM` logits →
    log-softmax → gather → masked sum over the response (TRL's concatenated forward)."""
    torch.manual_seed(0)
    model = GPT(ModelConfig(vocab_size=128, seq_len=64, n_layer=2, n_embd=32, n_head=4))
    batch = sequence_batch([([0, 4, 20, 21, 5, 6], [30, 31, 7]), ([0, 9], [40] * 20), ([0, 5, 6], [7])], 1)
    ours = response_logprobs(model, batch)
    with torch.no_grad():
        logits = to_transformers(model)(input_ids=batch.idx, attention_mask=(batch.idx != 1).long()).logits
    logp = torch.log_softmax(logits, -1).gather(2, batch.targets.clamp_min(0)[..., None]).squeeze(-1)
    torch.testing.assert_close(ours.detach(), (logp * (batch.targets != -100)).sum(1), rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(ours, (-model(batch.idx, batch.targets, reduction="none")).sum(1))


def test_precomputed_reference_gives_the_same_run(setting: Toy, tmp_path: Path) -> None:
    logs = []
    for pre in (True, False):
        train_dpo(small(max_steps=3, precompute_ref=pre), setting.sft, setting.prefs, tmp_path / f"run-{pre}")
        rows = MetricsLog.read(tmp_path / f"run-{pre}" / "metrics.jsonl")
        logs.append([x for r in rows for x in (r["loss"], r["rewards_margin"])])
    assert logs[0][0] == pytest.approx(math.log(2), abs=1e-5)  # step 1: policy = reference
    assert logs[0] == pytest.approx(logs[1], abs=1e-5)


def test_a_killed_run_resumes_exactly(setting: Toy, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    train_dpo(small(), setting.sft, setting.prefs, tmp_path / "whole")
    update = preference.TrainRun.update

    def dies_at_step_5(self: preference.TrainRun, loss: torch.Tensor) -> None:
        if self.step == 4:
            raise KeyboardInterrupt
        update(self, loss)

    monkeypatch.setattr(preference.TrainRun, "update", dies_at_step_5)
    with pytest.raises(KeyboardInterrupt):
        train_dpo(small(), setting.sft, setting.prefs, tmp_path / "killed")
    monkeypatch.setattr(preference.TrainRun, "update", update)
    train_dpo(small(), setting.sft, setting.prefs, tmp_path / "killed", resume=True)
    whole, resumed = (MetricsLog.read(tmp_path / d / "metrics.jsonl") for d in ("whole", "killed"))
    assert [r["step"] for r in resumed] == [1, 2, 3, 4, 5, 6]
    assert [r["loss"] for r in resumed] == pytest.approx([r["loss"] for r in whole], abs=1e-6)
    whole, resumed = (load_file(str(tmp_path / d / "model.safetensors")) for d in ("whole", "killed"))
    assert whole.keys() == resumed.keys() and all(torch.equal(whole[k], resumed[k]) for k in whole)


def test_dpo_raises_the_margin_and_wins_against_the_starting_model(setting: Toy, tmp_path: Path) -> None:
    out = tmp_path / "dpo"
    f = train_dpo(small(max_steps=60, batch_size=16, eval_every=20, ckpt_every=100), setting.sft, setting.prefs,
                  out)["figures"]
    rows = MetricsLog.read(out / "metrics.jsonl")
    evals = [r for r in rows if "val_rewards_margin" in r]
    assert evals[-1]["val_rewards_margin"] > evals[0]["val_rewards_margin"] > 0
    assert f["val_rewards_margin"] > 0.3 and f["val_rewards_accuracy"] >= 0.8
    assert f["final_loss"] < math.log(2)

    judge, sft, dpo = RuleJudge(), ChatModel.load(setting.sft, "cpu"), ChatModel.load(out, "cpu")
    prompts = [sft.chat_prompt(p) for p in setting.test_prompts(64)]
    ours = generate(dpo.model, prompts, max_new_tokens=32, temperature=1.0, stop_tokens=dpo.chat_stop, seed=7)
    base = generate(sft.model, prompts, max_new_tokens=32, temperature=1.0, stop_tokens=sft.chat_stop, seed=7)
    verdicts = [judge.compare(sft.tok.decode(a), sft.tok.decode(b))[0] for a, b in zip(ours, base, strict=True)]
    win_rate = (verdicts.count("A") + 0.5 * verdicts.count("tie")) / len(verdicts)
    assert win_rate >= 0.7, verdicts
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["stage"] == "dpo" and manifest["config"]["beta"] == 0.1


def test_dpo_cli(setting: Toy, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "dpo"
    assert main(["dpo", "--model", str(setting.sft), "--prefs", str(setting.prefs), "--out", str(out), "--beta", "0.5",
                 "--max-steps", "2", "--batch-size", "4", "--threads", "1", "--set", "precompute_ref=false"]) == 0
    assert "reward margin" in capsys.readouterr().out
    config = json.loads((out / "manifest.json").read_text())["config"]
    assert (config["beta"], config["precompute_ref"], config["max_steps"]) == (0.5, False, 2)
