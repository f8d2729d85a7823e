import dataclasses
import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import tiny_pretrain_config
from safetensors import safe_open
from safetensors.torch import load_file

from nanoforge.config import parse_duration, resolve_pretrain
from nanoforge.errors import NanoforgeError
from nanoforge.train.checkpoint import latest_checkpoint, load_model_artifact
from nanoforge.train.faults import LossGuard, TrainingStopped
from nanoforge.train.loop import pretrain
from nanoforge.train.metrics import MetricsLog
from nanoforge.train.schedule import lr_at


def test_pretrain_learns_and_writes_a_complete_artifact(tiny_tokens, tmp_path):
    out = tmp_path / "model"
    m = pretrain(tiny_pretrain_config(max_steps=60, sample_every=60, sample_tokens=8), tiny_tokens, out)
    rows = MetricsLog.read(out / "metrics.jsonl")
    assert [r["step"] for r in rows] == list(range(1, 61))
    first, last = rows[0]["loss"], sum(r["loss"] for r in rows[-5:]) / 5
    assert last < first - 1.5, (first, last)
    f = m["figures"]
    assert f["val_loss"] < f["unigram_entropy"]  # it learned more than token frequencies
    assert 0 < f["val_bpb"] < 8
    for name in ("model.safetensors", "config.json", "tokenizer.json", "loss.png", "manifest.json"):
        assert (out / name).exists(), name
    assert (out / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert m["inputs"]["tokens"]["hash"] and m["config"]["max_steps"] == 60
    model = load_model_artifact(out)
    assert model.num_params() == f["params"]


def test_refuses_to_overwrite_a_finished_run_and_resume_without_checkpoint(tiny_tokens, tmp_path):
    with pytest.raises(NanoforgeError, match="no checkpoint"):
        pretrain(tiny_pretrain_config(), tiny_tokens, tmp_path / "fresh", resume=True)
    out = tmp_path / "model"
    pretrain(tiny_pretrain_config(max_steps=3), tiny_tokens, out)
    before = (out / "model.safetensors").read_bytes()
    with pytest.raises(NanoforgeError, match="already holds a pretrain run"):
        pretrain(tiny_pretrain_config(max_steps=3), tiny_tokens, out)
    assert (out / "model.safetensors").read_bytes() == before


def test_resume_with_another_model_config_is_refused(tiny_tokens, tmp_path):
    out = tmp_path / "model"
    pretrain(tiny_pretrain_config(max_steps=10), tiny_tokens, out)
    with pytest.raises(NanoforgeError, match="does not match"):
        pretrain(tiny_pretrain_config(max_steps=20, depth=3), tiny_tokens, out, resume=True)


def test_data_directory_without_shards_is_a_clear_error(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(NanoforgeError, match="not a token-shard directory"):
        pretrain(tiny_pretrain_config(), tmp_path / "empty", tmp_path / "out")


def test_a_tokenizer_other_than_the_shards_is_refused(tiny_corpus, tiny_tokenizer, tiny_tokens, tmp_path):
    from nanoforge.tokenizer import TokenizerConfig, train_tokenizer

    smaller, same_size = tmp_path / "tok300", tmp_path / "tok512"
    train_tokenizer(TokenizerConfig(vocab_size=300), tiny_corpus, smaller)
    train_tokenizer(TokenizerConfig(vocab_size=512, kind="unigram"), tiny_corpus, same_size)
    with pytest.raises(NanoforgeError, match="has 300 tokens, the shards .* were encoded with 512"):
        pretrain(tiny_pretrain_config(max_steps=2), tiny_tokens, tmp_path / "a", tokenizer=smaller)
    with pytest.raises(NanoforgeError, match="not the tokenizer that encoded"):
        pretrain(tiny_pretrain_config(max_steps=2), tiny_tokens, tmp_path / "b", tokenizer=same_size)
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()
    pretrain(tiny_pretrain_config(max_steps=2), tiny_tokens, tmp_path / "c", tokenizer=tiny_tokenizer)  # its own


def test_a_word_tokenizer_gets_no_bits_per_byte(tiny_corpus, tmp_path):
    """Its <|unk|> stands for no bytes: unknown words would drop out of the figure, which would flatter it."""
    from nanoforge.tokenizer import Tokenizer, TokenizerConfig, train_tokenizer
    from nanoforge.tokens import TokenizeConfig, tokenize

    train_tokenizer(TokenizerConfig(kind="word", vocab_size=300), tiny_corpus, tmp_path / "tok")
    assert not Tokenizer.load(tmp_path / "tok").bytes_exact
    tokenize(TokenizeConfig(val_fraction=0.2, workers=1), tiny_corpus, tmp_path / "tok", tmp_path / "tokens")
    f = pretrain(tiny_pretrain_config(max_steps=2, eval_every=2), tmp_path / "tokens", tmp_path / "model")["figures"]
    assert f["val_loss"] > 0 and "val_bpb" not in f


@pytest.mark.parametrize("setting", ["ckpt_every=0", "eval_every=0", "grad_clip=0", "sample_every=-1"])
def test_settings_that_would_break_the_run_are_refused_up_front(setting):
    name, value = setting.split("=")
    with pytest.raises(NanoforgeError, match="need eval_every >= 1, ckpt_every >= 1"):
        resolve_pretrain(tiny_pretrain_config(**{name: float(value) if name == "grad_clip" else int(value)}))


def test_gradient_accumulation_gives_the_same_run_as_the_large_batch(tiny_tokens, tmp_path):
    a = pretrain(tiny_pretrain_config(max_steps=4, batch_size=4, batch_tokens=512), tiny_tokens, tmp_path / "a")
    b = pretrain(tiny_pretrain_config(max_steps=4, batch_size=8, batch_tokens=512), tiny_tokens, tmp_path / "b")
    la = [r["loss"] for r in MetricsLog.read(tmp_path / "a" / "metrics.jsonl")]
    lb = [r["loss"] for r in MetricsLog.read(tmp_path / "b" / "metrics.jsonl")]
    assert la == pytest.approx(lb, rel=1e-4, abs=1e-5)
    wa, wb = load_file(str(tmp_path / "a" / "model.safetensors")), load_file(str(tmp_path / "b" / "model.safetensors"))
    assert a["figures"]["tokens"] == b["figures"]["tokens"]
    for k in wa:
        assert (wa[k] - wb[k]).abs().max() < 1e-4, k


def _pretrain_cmd(tokens: Path, out: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "nanoforge", "pretrain", "--data", str(tokens), "--out", str(out),
            "--depth", "2", "--max-steps", "40", "--batch-size", "4", "--threads", "1",
            "--set", "aspect=32", "--set", "head_dim=16", "--set", "seq_len=64", "--set", "batch_tokens=256",
            "--set", "ckpt_every=4", "--set", "eval_every=20", "--set", "eval_batches=1",
            "--set", "sample_every=0", "--set", "dtype=fp32", "--set", "warmup_steps=5", *extra]


@pytest.mark.slow
def test_sigkill_and_resume_ends_with_the_same_weights(tiny_tokens, tmp_path):
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parent.parent)}
    ref = tmp_path / "ref"
    subprocess.run(_pretrain_cmd(tiny_tokens, ref), check=True, env=env, capture_output=True)

    out = tmp_path / "killed"
    proc = subprocess.Popen(_pretrain_cmd(tiny_tokens, out), env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    latest = out / "checkpoints" / "latest"
    deadline = time.time() + 120
    while time.time() < deadline:
        if latest.exists() and int(latest.read_text().strip().split("-")[1]) >= 12:
            break
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (out / "manifest.json").exists(), "the run finished before it could be killed"
    subprocess.run(_pretrain_cmd(tiny_tokens, out, "--resume"), check=True, env=env, capture_output=True)

    a, b = load_file(str(ref / "model.safetensors")), load_file(str(out / "model.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        assert (a[k] == b[k]).all(), f"{k} differs after resume"
    steps = [r["step"] for r in MetricsLog.read(out / "metrics.jsonl")]
    assert steps == list(range(1, 41))  # no step logged twice, none missing
    assert json.loads((out / "manifest.json").read_text())["figures"]["steps"] == 40


def test_cli_reports_bad_input_in_one_line(tmp_path, capsys):
    from nanoforge.cli import main

    assert main(["pretrain", "--data", str(tmp_path), "--out", str(tmp_path / "o"), "--preset", "huge"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err and "huge" in err


def test_sample_command_continues_the_prompt_reproducibly(tiny_tokens, tmp_path, capsys):
    from nanoforge.cli import main

    out = tmp_path / "model"
    pretrain(tiny_pretrain_config(max_steps=20), tiny_tokens, out)
    args = ["sample", "--model", str(out), "--prompt", "Return the", "--max-new-tokens", "12", "--seed", "3"]
    assert main(args) == 0
    first = capsys.readouterr().out
    assert main(args) == 0
    assert capsys.readouterr().out == first and first.startswith("Return the") and len(first) > len("Return the")
    assert main([*args[:-1], "4", "--num-samples", "2", "--temperature", "0"]) == 0
    greedy = capsys.readouterr().out.split("--- sample 2\n")
    assert greedy[0].removeprefix("--- sample 1\n") == greedy[1]  # greedy: both samples agree
    assert main(["sample", "--model", str(out), "--max-new-tokens", "0"]) == 2


def _optimizer_steps(ckpt: Path) -> int:
    """AdamW's own count of the updates it applied, read from a checkpoint's shards."""
    with safe_open(str(next((ckpt / "dcp").glob("*.safetensors"))), "pt") as f:
        return int(f.get_tensor("optim.wte.weight.step"))


def test_nan_losses_are_skipped_and_a_streak_rolls_back_with_a_lower_lr(tiny_tokens, tmp_path, monkeypatch):
    monkeypatch.setenv("NANOFORGE_TEST_NAN_STEPS", "3,7,8,9")
    cfg = tiny_pretrain_config(max_steps=12, ckpt_every=5, eval_every=100, max_bad_steps=3, rollback_lr_factor=0.5)
    out = tmp_path / "model"
    f = pretrain(cfg, tiny_tokens, out)["figures"]
    rows = MetricsLog.read(out / "metrics.jsonl")
    assert [r["step"] for r in rows] == list(range(1, 13))  # steps 6-9 were rolled back and run again
    assert rows[2]["skipped"] == "nonfinite" and "loss" not in rows[2] and rows[2]["skipped_steps"] == 1
    assert all("skipped" not in r and math.isfinite(r["loss"]) for r in rows[3:])
    resolved = resolve_pretrain(cfg)
    schedule = [lr_at(s, peak=resolved.lr, warmup=resolved.warmup_steps, total=12) for s in range(12)]
    assert [r["lr"] for r in rows[:5]] == pytest.approx(schedule[:5])
    assert [r["lr"] for r in rows[5:]] == pytest.approx([0.5 * lr for lr in schedule[5:]])  # after the rollback
    assert (rows[5]["skipped_steps"], rows[5]["rollbacks"]) == (4, 1)
    assert (f["skipped_steps"], f["rollbacks"], f["lr_scale"], f["steps"]) == (4, 1, 0.5, 12)
    # 12 steps, but the NaN step 3 made no update (and the rolled-back 7-9 left none behind)
    assert _optimizer_steps(out / "checkpoints" / "step-0000012") == 11


def test_no_checkpoint_is_written_during_a_streak_of_bad_steps(tiny_tokens, tmp_path, monkeypatch):
    monkeypatch.setenv("NANOFORGE_TEST_NAN_STEPS", "5,6")  # step 6 is due a checkpoint, two bad steps in
    out = tmp_path / "model"
    pretrain(tiny_pretrain_config(max_steps=7, ckpt_every=3, eval_every=100, max_bad_steps=3), tiny_tokens, out)
    assert sorted(p.name for p in (out / "checkpoints").glob("step-*")) == ["step-0000003", "step-0000007"]


def test_a_streak_right_after_a_rollback_goes_one_checkpoint_further_back(tiny_tokens, tmp_path, monkeypatch):
    """A checkpoint can hold weights that already went wrong (an update is judged by the loss before it):
    rolling back to it gives another streak, and the next rollback takes the checkpoint before it."""
    monkeypatch.setenv("NANOFORGE_TEST_NAN_STEPS", "7,8,7,8")  # bad again after the first rollback
    cfg = tiny_pretrain_config(max_steps=10, ckpt_every=3, eval_every=100, max_bad_steps=2, rollback_lr_factor=0.5)
    out = tmp_path / "model"
    f = pretrain(cfg, tiny_tokens, out)["figures"]
    assert (f["skipped_steps"], f["rollbacks"], f["lr_scale"], f["steps"]) == (4, 2, 0.25, 10)
    rows = MetricsLog.read(out / "metrics.jsonl")
    assert [r["step"] for r in rows] == list(range(1, 11))  # from step 3 on, run again after the 2nd rollback
    assert [r["rollbacks"] for r in rows[3:]] == [2] * 7  # rolled back to step-0000003, not step-0000006
    assert sorted(p.name for p in (out / "checkpoints").glob("step-*")) == ["step-0000009", "step-0000010"]

    monkeypatch.setenv("NANOFORGE_TEST_NAN_STEPS", "4,5,4,5,4,5")  # with nothing further back: a clear error
    with pytest.raises(NanoforgeError, match="rolling back to step-0000003 did not help"):
        pretrain(dataclasses.replace(cfg, max_steps=6), tiny_tokens, tmp_path / "again")


def test_a_streak_of_bad_steps_before_any_checkpoint_is_a_clear_error(tiny_tokens, tmp_path, monkeypatch):
    monkeypatch.setenv("NANOFORGE_TEST_NAN_STEPS", "1,2")
    with pytest.raises(NanoforgeError, match="2 bad steps in a row .* before the first checkpoint"):
        pretrain(tiny_pretrain_config(max_steps=4, max_bad_steps=2), tiny_tokens, tmp_path / "model")


def test_loss_guard_flags_spikes_against_the_running_mean():
    guard = LossGuard(spike_factor=2.0, max_bad_steps=2, rollback_lr_factor=0.1)
    assert all(guard.judge(4.0 - 0.01 * i, 1.0) is None for i in range(10))
    assert guard.judge(7.0, 1.0) is None  # below 2 × ~3.95
    ema = guard.ema
    assert guard.judge(9.0, 1.0) == "spike" and guard.ema == ema  # a bad loss does not move the mean
    assert not guard.must_roll_back
    assert guard.judge(3.0, float("inf")) == "nonfinite" and guard.must_roll_back
    guard.rolled_back({"ema": 4.0, "good_steps": 5})
    assert (guard.skipped, guard.rollbacks, guard.bad_in_row, guard.lr_scale) == (2, 1, 0, pytest.approx(0.1))


def test_max_time_stops_with_a_checkpoint_that_resumes_exactly(tiny_tokens, tmp_path):
    ref = tmp_path / "ref"
    pretrain(tiny_pretrain_config(max_steps=8, ckpt_every=100), tiny_tokens, ref)
    out = tmp_path / "model"
    with pytest.raises(TrainingStopped, match="stopped by max_time after step 1") as stopped:
        pretrain(tiny_pretrain_config(max_steps=8, ckpt_every=100, max_time="1e-6"), tiny_tokens, out)
    assert stopped.value.step == 1 and latest_checkpoint(out / "checkpoints").name == "step-0000001"
    assert not (out / "manifest.json").exists()
    pretrain(tiny_pretrain_config(max_steps=8, ckpt_every=100), tiny_tokens, out, resume=True)
    a, b = load_file(str(ref / "model.safetensors")), load_file(str(out / "model.safetensors"))
    assert all((a[k] == b[k]).all() for k in a)  # one process resumes bit for bit


def test_a_resume_takes_its_own_optimizer_settings_and_keeps_the_last_figures(tiny_tokens, tmp_path):
    out = tmp_path / "model"
    with pytest.raises(TrainingStopped):
        pretrain(tiny_pretrain_config(max_steps=4, ckpt_every=100, max_time="1e-6"), tiny_tokens, out)
    f = pretrain(tiny_pretrain_config(max_steps=4, ckpt_every=100, weight_decay=0.0, beta2=0.99), tiny_tokens, out,
                 resume=True)["figures"]
    groups = json.loads((out / "checkpoints" / "step-0000004" / "state.json").read_text())["param_groups"]
    assert [(g["weight_decay"], g["betas"]) for g in groups] == [(0.0, [0.9, 0.99])] * 2  # not the saved 0.1, 0.95
    # killed after the last checkpoint, before the manifest: the resume has no step to run, same figures
    (out / "manifest.json").unlink()
    again = pretrain(tiny_pretrain_config(max_steps=4, ckpt_every=100, weight_decay=0.0, beta2=0.99), tiny_tokens,
                     out, resume=True)["figures"]
    assert again["val_loss"] == f["val_loss"] and again["val_bpb"] == f["val_bpb"] and f["val_loss"] is not None


@pytest.mark.parametrize("damage", ["state.json", "rng", "dcp"])
def test_a_damaged_checkpoint_is_a_clear_error(tiny_tokens, tmp_path, damage):
    out = tmp_path / "model"
    with pytest.raises(TrainingStopped):
        pretrain(tiny_pretrain_config(max_steps=4, ckpt_every=100, max_time="1e-6"), tiny_tokens, out)
    ckpt = out / "checkpoints" / "step-0000001"
    victim = ckpt / "state.json" if damage == "state.json" else next((ckpt / damage).glob("*.safetensors"))
    victim.write_bytes(victim.read_bytes()[: len(victim.read_bytes()) // 2])  # cut short, as by a full disk
    with pytest.raises(NanoforgeError, match="damaged"):
        pretrain(tiny_pretrain_config(max_steps=4, ckpt_every=100), tiny_tokens, out, resume=True)


def test_durations_parse_and_bad_ones_are_refused():
    assert (parse_duration("90"), parse_duration("90m"), parse_duration("2h"), parse_duration(1.5)) == (90, 5400,
                                                                                                        7200, 1.5)
    for bad in ("soon", "-1h", "0"):
        with pytest.raises(NanoforgeError, match="max_time"):
            parse_duration(bad)


def test_activation_checkpointing_changes_memory_not_results(tiny_tokens, tmp_path):
    pretrain(tiny_pretrain_config(max_steps=3), tiny_tokens, tmp_path / "plain")
    pretrain(tiny_pretrain_config(max_steps=3, activation_checkpointing=True), tiny_tokens, tmp_path / "ac")
    la = [r["loss"] for r in MetricsLog.read(tmp_path / "plain" / "metrics.jsonl")]
    lb = [r["loss"] for r in MetricsLog.read(tmp_path / "ac" / "metrics.jsonl")]
    assert la == pytest.approx(lb, rel=1e-6)
    wa, wb = (load_file(str(tmp_path / name / "model.safetensors")) for name in ("plain", "ac"))
    assert wa.keys() == wb.keys() and all((wa[k] - wb[k]).abs().max() < 1e-6 for k in wa)


def test_profile_writes_a_chrome_trace_of_three_steps(tiny_tokens, tmp_path):
    out = tmp_path / "model"
    pretrain(tiny_pretrain_config(max_steps=5, profile=True), tiny_tokens, out)
    events = json.loads((out / "profile" / "trace-rank0.json").read_text())["traceEvents"]
    steps = sorted({e["name"] for e in events if str(e.get("name", "")).startswith("ProfilerStep#")})
    assert steps == ["ProfilerStep#2", "ProfilerStep#3", "ProfilerStep#4"]
    assert any("aten::mm" in str(e.get("name")) for e in events)  # the model's matmuls are in it
