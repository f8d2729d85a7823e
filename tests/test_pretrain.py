import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import tiny_pretrain_config
from safetensors.torch import load_file

from nanoforge.errors import NanoforgeError
from nanoforge.train.checkpoint import load_model_artifact
from nanoforge.train.loop import pretrain
from nanoforge.train.metrics import MetricsLog


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
    with pytest.raises(NanoforgeError, match="already holds a training run"):
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
