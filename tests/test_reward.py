"""The reward model (nanoforge/post/reward.py): Bradley–Terry loss, trunk hidden states, the artifact, and a
real training run on preferences that simulated annotators gave through the labelling app.

python -m pytest tests/test_reward.py -q

The toy setting (tests/rlhf_toy.py) is a tiny chat model whose sampled answers simulated annotators
judged; training must take the held-out accuracy from chance to ≥ 90%.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import transformers
from rlhf_toy import Toy

from nanoforge.cli import main
from nanoforge.errors import NanoforgeError
from nanoforge.hf import hf_config, to_hf_state
from nanoforge.model import GPT, ModelConfig
from nanoforge.post.preference import encode_pairs, hidden_states, pair_batch, read_preferences, sequence_batch
from nanoforge.post.reward import RewardConfig, RewardModel, bradley_terry_loss, train_reward
from nanoforge.tokenizer import Tokenizer
from nanoforge.train.checkpoint import load_model_artifact


@pytest.fixture(scope="module")
def trained(setting: Toy, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("reward") / "rm"
    cfg = RewardConfig(max_steps=150, lr=3e-4, batch_size=16, val_fraction=0.25, eval_every=50, threads=1,
                       device="cpu")
    return out, train_reward(cfg, setting.sft, setting.prefs, out)


def test_bradley_terry_loss_is_the_formula() -> None:
    rc, rr = torch.tensor([1.5, -0.2, 0.3, 2.0]), torch.tensor([0.5, 0.4, 0.3, -1.0])
    margin = torch.tensor([0.0, 1.0, 0.5, 2.0])
    plain = [math.log(1 + math.exp(-(c - r))) for c, r in zip(rc.tolist(), rr.tolist(), strict=True)]
    assert float(bradley_terry_loss(rc, rr)) == pytest.approx(sum(plain) / 4, rel=1e-6)
    with_margin = [-math.log(1 / (1 + math.exp(-(c - r - m))))
                   for c, r, m in zip(rc.tolist(), rr.tolist(), margin.tolist(), strict=True)]
    assert float(bradley_terry_loss(rc, rr, margin)) == pytest.approx(sum(with_margin) / 4, rel=1e-6)


@pytest.mark.parametrize("flavour", ["llama", "gpt2"])
def test_hidden_states_are_the_trunk_of_forward(flavour: str) -> None:
    torch.manual_seed(0)
    m = GPT(ModelConfig(vocab_size=128, seq_len=32, n_layer=2, n_embd=32, n_head=4, flavour=flavour)).eval()
    x = torch.randint(0, 128, (3, 20))
    torch.testing.assert_close(m.lm_head(hidden_states(m, x)), m(x))


def test_rewards_equal_transformers_sequence_classification() -> None:
    """Our trunk + score head = `LlamaForSequenceClassification` (num_labels=1) with the same weights, which
    pools the last non-padding token the same way."""
    torch.manual_seed(0)
    rm = RewardModel(GPT(ModelConfig(vocab_size=128, seq_len=64, n_layer=2, n_embd=32, n_head=4))).eval()
    values = {**hf_config(rm.trunk.cfg), "architectures": ["LlamaForSequenceClassification"], "num_labels": 1,
              "pad_token_id": 1}
    peer = transformers.AutoModelForSequenceClassification.from_config(transformers.AutoConfig.for_model(**values))
    state = {k: v for k, v in to_hf_state(rm.trunk.state_dict(), rm.trunk.cfg).items() if k.startswith("model.")}
    peer.load_state_dict({**state, "score.weight": rm.score.weight.detach()})
    batch = sequence_batch([([0, 4, 20, 21, 5, 6], [30, 31, 7]), ([0, 4, 22, 5, 6], [7]), ([0, 9], [40] * 20)], 1)
    with torch.no_grad():
        theirs = peer.eval()(input_ids=batch.idx, attention_mask=(batch.idx != 1).long()).logits.squeeze(-1)
        torch.testing.assert_close(rm(batch.idx, batch.last), theirs, rtol=1e-5, atol=1e-5)


def test_reward_model_reaches_90_percent_on_held_out_simulated_preferences(setting: Toy, trained: tuple) -> None:
    out, manifest = trained
    f = manifest["figures"]
    assert setting.label_figures["judgements"] == 2 * setting.label_figures["items"]  # both annotators, every item
    assert f["val_pairs"] >= 100 and f["train_pairs"] >= 300
    assert f["val_accuracy_before"] <= 0.75  # the untrained head is not far from chance …
    assert f["val_accuracy"] >= 0.90  # … training learns the annotators' preference
    assert f["val_accuracy"] - f["val_accuracy_before"] >= 0.2
    assert f["final_loss"] < 0.69 and f["tok_per_s"] > 0


def test_reward_artifact_round_trip(setting: Toy, trained: tuple) -> None:
    out, _ = trained
    rm = RewardModel.load(out)
    tok = Tokenizer.load(out)
    rows = read_preferences(setting.prefs)[:8]
    pairs, _ = encode_pairs(tok, rows, rm.trunk.cfg.seq_len)
    batch = pair_batch(pairs, tok.pad_id)
    direct = rm(batch.idx, batch.last)
    by_text = rm.rewards(tok, [r["prompt"] for r in rows] * 2, [r["chosen"] for r in rows] +
                         [r["rejected"] for r in rows])
    torch.testing.assert_close(torch.tensor(by_text), direct, rtol=1e-5, atol=1e-5)
    normalized = torch.tensor(rm.rewards(tok, [rows[0]["prompt"]], [rows[0]["chosen"]], normalize=True))
    torch.testing.assert_close(normalized, (direct[:1] - rm.mean) / rm.std)
    trunk = load_model_artifact(out)  # the trunk is a normal model artifact
    torch.testing.assert_close(trunk.wte.weight, rm.trunk.wte.weight)
    with pytest.raises(NanoforgeError, match="not a reward model"):
        RewardModel.load(setting.sft)


def test_reward_cli_and_refusals(setting: Toy, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "rm"
    args = ["reward", "--model", str(setting.sft), "--prefs", str(setting.prefs), "--out", str(out),
            "--max-steps", "2", "--batch-size", "4", "--threads", "1", "--set", "margin_scale=1"]
    assert main(args) == 0
    assert "held-out accuracy" in capsys.readouterr().out
    assert main(args) == 2  # a finished run is not overwritten
    assert "already holds a reward run" in capsys.readouterr().err
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "p", "chosen": "a"}\n')
    assert main([*args[:4], str(bad), "--out", str(tmp_path / "rm2")]) == 2
    assert "bad.jsonl:1: expected an object with prompt, chosen and rejected" in capsys.readouterr().err
