"""`nanoforge sft`: assistant-only loss, packing under a document mask, held-out answer quality, resume,
torchrun; and `nanoforge pretrain --init` (domain adaptation from a model)."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from conftest import tiny_pretrain_config
from safetensors.torch import load_file

from nanoforge.cli import main
from nanoforge.errors import NanoforgeError
from nanoforge.infer.chat import ChatModel
from nanoforge.model import GPT, ModelConfig
from nanoforge.post.instruct import InstructConfig, make_instruct
from nanoforge.post.sft import SFTConfig, encode_chat, make_batch, sft, step_loss
from nanoforge.tokenizer import Tokenizer
from nanoforge.tokens import TokenLoader
from nanoforge.train.checkpoint import load_model_artifact, save_model_artifact
from nanoforge.train.loop import pretrain
from nanoforge.train.metrics import MetricsLog

CHAT = [{"role": "system", "content": "You answer briefly."}, {"role": "user", "content": "What is 2 + 3?"},
        {"role": "assistant", "content": "It is 5."}, {"role": "user", "content": "And 4 + 4?"},
        {"role": "assistant", "content": "8."}]


def _chats(n: int) -> list[list[dict[str, str]]]:
    return [[{"role": "user", "content": f"Say {i} twice" + " please" * (i % 4)},
             {"role": "assistant", "content": f"{i} {i}" + "!" * (i % 3)}] for i in range(n)]


@pytest.fixture(autouse=True)
def _keep_torch_threads():
    """The stage sets torch's (process-wide) thread count from its config; later tests get theirs back."""
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def tok(tiny_tokenizer) -> Tokenizer:
    return Tokenizer.load(tiny_tokenizer)


@pytest.fixture(scope="module")
def base_model(tiny_tokenizer, tok, tmp_path_factory) -> Path:
    """A random 0.1 M-parameter model with a 128-token context, as a model artifact."""
    torch.manual_seed(0)
    model = GPT(ModelConfig(vocab_size=tok.vocab_size, seq_len=128, n_layer=2, n_embd=64, n_head=4))
    out = tmp_path_factory.mktemp("base") / "base"
    save_model_artifact(model, out, tokenizer_dir=tiny_tokenizer)
    return out


@pytest.fixture(scope="module")
def chat_data(tiny_corpus, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("instruct") / "data"
    make_instruct(InstructConfig(max_entries=40, arithmetic=400, arithmetic_val=30, val_fraction=0.2), tiny_corpus, out)
    return out


def _cfg(**kw) -> SFTConfig:
    values = dict(batch_size=8, lr=3e-3, dtype="fp32", device="cpu", answer_eval=0, eval_rows=8, threads=1)
    values.update(kw)
    return SFTConfig(**values)


def test_system_and_user_tokens_carry_zero_loss(tok):
    ex, truncated = encode_chat(tok, CHAT, seq_len=128)
    assert not truncated
    ids, _ = tok.render_chat(CHAT)
    end = tok.special_id("assistant_end")
    learnt = [t for t in ex.targets if t != -100]
    assert learnt == tok.encode("It is 5.") + [end] + tok.encode("8.") + [end]
    assert ex.inputs == ids[:-1]
    torch.manual_seed(0)
    model = GPT(ModelConfig(vocab_size=tok.vocab_size, seq_len=128, n_layer=1, n_embd=32, n_head=2))
    x, y = torch.tensor([ex.inputs]), torch.tensor([ex.targets])
    per_token = model(x, y, reduction="none")[0]
    assert (per_token[y[0] == -100] == 0).all() and (per_token[y[0] != -100] > 0).all()
    # the step's loss is exactly the cross-entropy of the assistant tokens: fewer than all targets
    logits = model(x)[0]
    reference = F.cross_entropy(logits[y[0] != -100], y[0][y[0] != -100], reduction="sum")
    assert step_loss(model, x, y, None).item() == pytest.approx(reference.item(), rel=1e-5)
    everything = F.cross_entropy(logits, torch.tensor(ids[1:]), reduction="sum")
    assert everything.item() > reference.item() + 10


@pytest.mark.parametrize("flavour", ["llama", "gpt2"])
def test_packed_conversations_give_the_loss_and_gradients_of_unpacked_ones(tok, flavour):
    examples = [encode_chat(tok, messages, 128)[0] for messages in _chats(5)]
    torch.manual_seed(0)
    model = GPT(ModelConfig(vocab_size=tok.vocab_size, seq_len=128, n_layer=2, n_embd=32, n_head=4, flavour=flavour))

    def loss_and_grads(batches):
        model.zero_grad()
        total = sum(step_loss(model, x, y, seg) for x, y, seg in batches)
        total.backward()
        return total.item(), [p.grad.clone() for p in model.parameters()]

    packed = [make_batch(examples, [[0, 1, 2], [3, 4]], tok.pad_id, packing=True)]
    assert packed[0][2] is not None and packed[0][0].shape[1] == sum(len(examples[i].inputs) for i in (0, 1, 2))
    alone = [make_batch(examples, [[i]], tok.pad_id, packing=False) for i in range(5)]
    (lp, gp), (la, ga) = loss_and_grads(packed), loss_and_grads(alone)
    assert lp == pytest.approx(la, rel=1e-5)
    for a, b in zip(gp, ga, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
    # without the document mask the packed rows would differ: the mask is what makes them equal
    x, y, seg = packed[0]
    assert abs(step_loss(model, x, y, None).item() - lp) > 1e-4 * lp  # 10× the tolerance of the equality


def test_sft_raises_held_out_answer_quality_over_the_base_model(base_model, chat_data, tmp_path):
    out = tmp_path / "sft"
    m = sft(_cfg(max_steps=120, answer_eval=200, eval_every=40), base_model, [chat_data / "train.jsonl"], out,
            val=[chat_data / "val.jsonl"])
    f = m["figures"]
    base, tuned = f["base_answers"], f["answers"]
    assert tuned["n"] == base["n"] > 30
    assert tuned["f1"] > base["f1"] + 0.25, (base["f1"], tuned["f1"])
    assert tuned["by_subset"]["identity"]["exact_match"] > base["by_subset"]["identity"]["exact_match"] + 0.3
    rows = MetricsLog.read(out / "metrics.jsonl")
    val = [r["val_loss"] for r in rows if "val_loss" in r]
    assert len(val) == 3 and val[-1] < val[0] and f["val_loss"] == val[-1]
    assert sum(r["loss"] for r in rows[-5:]) / 5 < rows[0]["loss"] - 2
    assert f["trainable_params"] == f["params"] and f["train_conversations"] > 600
    # a normal model artifact: chat, serve and sample load it
    cm = ChatModel.load(out, device="cpu")
    assert cm.model.num_params() == f["params"] and (out / "loss.png").exists()


def _rewound(run: Path, dst: Path, step: int) -> Path:
    """A copy of `run` as a kill just after its checkpoint of `step` would have left it."""
    shutil.copytree(run, dst)
    ckpts = dst / "checkpoints"
    for p in ckpts.glob("step-*"):
        if p.name != f"step-{step:07d}":
            shutil.rmtree(p)
    (ckpts / "latest").write_text(f"step-{step:07d}\n")
    for name in ("manifest.json", "model.safetensors", "config.json"):
        (dst / name).unlink()
    return dst


def test_resume_from_a_checkpoint_ends_with_the_same_weights(base_model, chat_data, tmp_path):
    cfg = _cfg(max_steps=6, ckpt_every=3, eval_every=3, batch_size=2, batch_rows=4)
    data = [chat_data / "train.jsonl"]
    ref = tmp_path / "ref"
    sft(cfg, base_model, data, ref)
    out = _rewound(ref, tmp_path / "resumed", 3)
    with pytest.raises(NanoforgeError, match="already holds"):
        sft(cfg, base_model, data, out)
    sft(cfg, base_model, data, out, resume=True)
    a, b = load_file(str(ref / "model.safetensors")), load_file(str(out / "model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert [r["loss"] for r in MetricsLog.read(out / "metrics.jsonl")] == \
        [r["loss"] for r in MetricsLog.read(ref / "metrics.jsonl")]


def _torchrun_sft(flags: list[str], ok: bool = True) -> subprocess.CompletedProcess:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parent.parent)}
    run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-addr",
                          "127.0.0.1", "--master-port", str(port), "-m", "nanoforge", *flags],
                         env=env, capture_output=True, text=True, timeout=300)
    assert (run.returncode == 0) is ok, run.stderr[-3000:]
    return run


def _sft_flags(base_model: Path, chat_data: Path, *extra: str) -> list[str]:
    return ["sft", "--model", str(base_model), "--data", str(chat_data / "train.jsonl"), "--max-steps", "3",
            "--batch-size", "2", "--lr", "3e-3", "--dtype", "fp32", "--device", "cpu", "--threads", "1",
            "--set", "batch_rows=4", "--set", "answer_eval=0", "--set", "eval_rows=4", *extra]


def _assert_same_sft(one: Path, two: Path, weights: str = "model.safetensors") -> None:
    r1, r2 = MetricsLog.read(one / "metrics.jsonl"), MetricsLog.read(two / "metrics.jsonl")
    assert [r["loss"] for r in r1] == pytest.approx([r["loss"] for r in r2], rel=1e-5)
    assert r1[-1]["val_loss"] == pytest.approx(r2[-1]["val_loss"], rel=1e-5)
    a, b = load_file(str(one / weights)), load_file(str(two / weights))
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-6)


def test_two_ddp_ranks_train_like_one_process(base_model, chat_data, tmp_path):
    """4 rows per step: 2 micro-batches of 2 on one process, one micro-batch on each of two torchrun ranks."""
    flags = _sft_flags(base_model, chat_data)
    one, two = tmp_path / "one", tmp_path / "two"
    assert main([*flags, "--out", str(one)]) == 0
    _torchrun_sft([*flags, "--out", str(two)])
    _assert_same_sft(one, two)
    assert json.loads((two / "manifest.json").read_text())["figures"]["world_size"] == 2


def test_lora_on_two_fsdp_ranks_trains_like_one_process_and_resumes_on_one(base_model, chat_data, tmp_path):
    """LoRA under FSDP: the frozen base and the adapters sharded over two ranks take one process's steps;
    the adapter file is whole; the two ranks' checkpoint of step 2 resumes in one process to the same end."""
    # 5 held-out rows in batches of 2: rank 0 evaluates 2 batches, rank 1 one (and one that it leaves out;
    # with a forward fewer, FSDP's gathers went unanswered and the run hung)
    flags = _sft_flags(base_model, chat_data, "--lora-rank", "4", "--set", "ckpt_every=2", "--set", "eval_rows=5")
    one, two = tmp_path / "one", tmp_path / "two"
    # replies scored at the end: under FSDP by rank 0's unsharded copy, which needs the adapters too
    assert main([*flags, "--out", str(one), "--set", "answer_eval=2"]) == 0
    _torchrun_sft([*flags, "--out", str(two), "--parallel", "fsdp", "--set", "answer_eval=2"])
    _assert_same_sft(one, two, "adapter_model.safetensors")
    figures = [json.loads((d / "manifest.json").read_text())["figures"] for d in (one, two)]
    assert figures[1]["world_size"] == 2 and figures[1]["trainable_params"] < figures[1]["params"] / 5
    replies = [[s["reply"] for s in f["answers"]["samples"]] for f in figures]
    assert replies[1] == replies[0] != [s["reply"] for s in figures[0]["base_answers"]["samples"]]

    resumed = tmp_path / "resumed"  # as a kill after the checkpoint of step 2 would have left it
    shutil.copytree(two, resumed)
    shutil.rmtree(resumed / "checkpoints" / "step-0000003")
    (resumed / "checkpoints" / "latest").write_text("step-0000002\n")
    for name in ("manifest.json", "adapter_model.safetensors", "adapter_config.json", "loss.png"):
        (resumed / name).unlink(missing_ok=True)
    assert main([*flags, "--out", str(resumed), "--resume", "--set", "answer_eval=2"]) == 0
    _assert_same_sft(one, resumed, "adapter_model.safetensors")

    # an int8 base is a tensor subclass that FSDP does not shard: a clear error before anything is written
    run = _torchrun_sft([*flags, "--out", str(tmp_path / "int8"), "--parallel", "fsdp", "--lora-quantize", "int8"],
                        ok=False)
    assert "not sharded by FSDP" in run.stderr
    assert not (tmp_path / "int8").exists()


def test_bad_chat_data_is_refused_naming_the_line(base_model, tmp_path, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"messages": _chats(1)[0]}) + "\n{oops\n")
    args = ["sft", "--model", str(base_model), "--data", str(bad), "--out", str(tmp_path / "o"), "--max-steps", "1"]
    assert main(args) == 2
    assert f"{bad}:2: not valid JSON" in capsys.readouterr().err
    bad.write_text(json.dumps({"messages": [{"role": "robot", "content": "hi"}]}) + "\n")
    assert main(args) == 2
    assert f"{bad}:1: message 0: unknown role 'robot'" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------------
# domain adaptation: pretrain --init


@pytest.fixture(scope="module")
def pretrained(tiny_tokens, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("pre") / "model"
    pretrain(tiny_pretrain_config(max_steps=30), tiny_tokens, out)
    return out


def test_pretrain_init_starts_from_the_model_with_a_fresh_schedule(pretrained, tiny_tokens, tmp_path):
    out = tmp_path / "adapted"
    cfg = tiny_pretrain_config(init=str(pretrained), max_steps=5, warmup_steps=2, lr=1e-3, depth=None, aspect=None,
                               head_dim=None, seq_len=None)
    m = pretrain(cfg, tiny_tokens, out)
    # step 1's loss is the init model's loss on the first batch: the weights at step 0 are the init's
    model = load_model_artifact(pretrained)
    loader = TokenLoader(tiny_tokens, "train", batch_size=cfg.batch_size, seq_len=model.cfg.seq_len, seed=cfg.seed)
    x, y = loader.next_batch()
    with torch.no_grad():
        expected = model(x, y).item()
    rows = MetricsLog.read(out / "metrics.jsonl")
    assert rows[0]["loss"] == pytest.approx(expected, rel=1e-5)
    assert rows[0]["lr"] == pytest.approx(1e-3 / 2)  # the warmup starts again
    f = m["figures"]
    assert f["init_val_loss"] > 0 and m["inputs"]["init"]["path"] == str(pretrained)
    assert m["config"]["depth"] == model.cfg.n_layer and m["config"]["seq_len"] == model.cfg.seq_len
    fresh = pretrain(tiny_pretrain_config(max_steps=1), tiny_tokens, tmp_path / "fresh")
    assert f["init_val_loss"] < MetricsLog.read(tmp_path / "fresh" / "metrics.jsonl")[0]["loss"] - 0.5
    assert fresh["figures"]["steps"] == 1
    with pytest.raises(NanoforgeError, match="the shape comes from the init model"):
        pretrain(tiny_pretrain_config(init=str(pretrained), depth=3), tiny_tokens, tmp_path / "other")
