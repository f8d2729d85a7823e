"""A toy RLHF setting shared by tests/test_reward.py, test_dpo.py and test_ppo.py (built once per session).

A tiny chat model (2 × 64, seq_len 96) is fine-tuned for a few seconds to answer "Tell me about the X and
the Y." with 1–14 random words, so its samples differ in length and repetitiveness. `collect_preferences`
(the pipeline's unattended labelling stage: sampling, two simulated annotators judging through the HTTP
app, export) turns 600 prompts into preference pairs. The prompts carry no reference, so the simulated
judge decides by its documented fallbacks: the less repetitive, then the shorter response wins. A tiny
model cannot learn arithmetic in seconds, so the reference rules (correct answer, token F1) are tested on
their own in tests/test_feedback.py; this setting tests what training does with the judge's preferences.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path

import torch

from nanoforge.feedback.label import LabelConfig, collect_preferences
from nanoforge.model import GPT, ModelConfig
from nanoforge.post.preference import sequence_batch
from nanoforge.tokenizer import Tokenizer
from nanoforge.train.checkpoint import save_model_artifact

WORDS = "red blue green black white cat dog fish bird tree house car road sun moon star water fire stone book".split()


def question(rng: random.Random) -> str:
    return f"Tell me about the {rng.choice(WORDS)} and the {rng.choice(WORDS)}."


@dataclass
class Toy:
    sft: Path  # the starting chat model
    prompts: Path  # 600 prompts (JSONL)
    prefs: Path  # their preference pairs (TRL JSONL), judged by simulated annotators
    label_figures: dict

    def test_prompts(self, n: int = 64) -> list[list[dict[str, str]]]:
        """Prompts outside the training file (another seed)."""
        rng = random.Random(12345)
        return [[{"role": "user", "content": question(rng)}] for _ in range(n)]


def toy(root: Path, tokenizer: Path) -> Toy:
    """The toy setting under `root`, built on first use."""
    out = Toy(root / "sft", root / "prompts.jsonl", root / "label" / "prefs.jsonl", {})
    if not (root / "label" / "manifest.json").exists():
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            _train_sft(tokenizer, out.sft)
            rng = random.Random(1)
            lines = [json.dumps({"prompt": question(rng)}) for _ in range(600)]
            out.prompts.write_text("\n".join(lines) + "\n")
            cfg = LabelConfig(temperatures=[0.8, 1.2], max_new_tokens=32, simulated_annotators=2, noise=0.05,
                              device="cpu")
            collect_preferences(cfg, out.sft, out.prompts, root / "label")
        finally:
            torch.set_num_threads(threads)
    out.label_figures = json.loads((root / "label" / "manifest.json").read_text())["figures"]
    return out


def _train_sft(tokenizer: Path, out: Path) -> None:
    tok = Tokenizer.load(tokenizer)
    end = tok.special_id("assistant_end")
    torch.manual_seed(0)
    model = GPT(ModelConfig(vocab_size=tok.vocab_size, seq_len=96, n_layer=2, n_embd=64, n_head=4))
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    rng = random.Random(0)
    for _ in range(150):
        seqs = []
        for _ in range(16):
            prompt = [{"role": "user", "content": question(rng)}]
            words = " ".join(rng.choice(WORDS) for _ in range(rng.randint(1, 14)))
            seqs.append((tok.render_prompt(prompt), [*tok.encode(words), end]))
        batch = sequence_batch(seqs, tok.pad_id)
        model(batch.idx, batch.targets).backward()
        opt.step()
        opt.zero_grad()
    save_model_artifact(model, out, tokenizer_dir=tokenizer)
