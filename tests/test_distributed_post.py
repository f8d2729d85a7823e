"""`nanoforge reward`, `dpo` and `ppo` under torchrun on CPU (gloo, 2 processes). Reward and DPO: the ranks
share each step's pairs and average their gradients, so the run follows the one-process run with the same
batch step for step, and a two-rank checkpoint resumes in one process. PPO samples each rank's share of the
prompts with its own seed (so it cannot follow one process's samples) and ends with the same weights on
every rank. A batch that does not split over the ranks is a clear error.

The toy preference setting is tests/rlhf_toy.py's; each launch costs ~10 s on two cores.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from rlhf_toy import Toy
from safetensors.torch import load_file

from nanoforge.cli import main
from nanoforge.train.metrics import MetricsLog

ENV = {**os.environ, "PYTHONPATH": str(Path(__file__).parent.parent)}


def _flags(stage: str, setting: Toy, out: Path, batch: int = 8) -> list[str]:
    return [stage, "--model", str(setting.sft), "--prefs", str(setting.prefs), "--out", str(out), "--max-steps", "4",
            "--batch-size", str(batch), "--lr", "3e-4", "--device", "cpu", "--threads", "1", "--set", "eval_every=2",
            "--set", "ckpt_every=2"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _torchrun(flags: list[str]) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-addr", "127.0.0.1",
           "--master-port", str(_free_port()), "-m", "nanoforge", *flags]
    return subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module", params=["reward", "dpo"])
def runs(request: pytest.FixtureRequest, setting: Toy, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """The stage's run in one process and on two ranks, same flags."""
    stage = request.param
    root = tmp_path_factory.mktemp(stage)
    one, two = root / "one", root / "two"
    assert main(_flags(stage, setting, one)) == 0
    run = _torchrun(_flags(stage, setting, two))
    assert run.returncode == 0, run.stderr[-3000:]
    assert run.stdout.count("written to") == 1  # rank 0 reports, rank 1 stays quiet
    return one, two


def _assert_same_run(expected: Path, got: Path) -> None:
    """The same steps, losses, gradient norms, held-out losses and final weights, up to float rounding."""
    rows = [MetricsLog.read(d / "metrics.jsonl") for d in (expected, got)]
    assert [r["step"] for r in rows[1]] == [r["step"] for r in rows[0]] == [1, 2, 3, 4]
    for key in ("loss", "grad_norm", "val_loss"):
        a = [r[key] for r in rows[0] if key in r]
        b = [r[key] for r in rows[1] if key in r]
        assert a and b == pytest.approx(a, rel=1e-4, abs=1e-5), key
    weights = [load_file(str(d / "model.safetensors")) for d in (expected, got)]
    assert weights[0].keys() == weights[1].keys()
    for name, w in weights[0].items():
        torch.testing.assert_close(weights[1][name], w, atol=2e-5, rtol=1e-4, msg=name)


def test_two_ranks_take_the_steps_of_one_process(runs: tuple[Path, Path]) -> None:
    one, two = runs
    _assert_same_run(one, two)
    figures = [json.loads((d / "manifest.json").read_text())["figures"] for d in (one, two)]
    assert (figures[0]["world_size"], figures[1]["world_size"]) == (1, 2)
    # held-out figures (and the reward's scale) that the ranks computed in shares, gathered: the same
    # (not DPO's training accuracy: at step 1 policy = reference, so its rewards are 0 up to rounding, which
    # the batch's shape decides, and chosen > rejected is a coin toss there)
    compared = [k for k, v in figures[0].items()
                if isinstance(v, float) and k not in ("seconds", "tok_per_s", "rewards_accuracy")]
    assert any(k.startswith("val_") for k in compared)
    for key in compared:
        assert figures[1][key] == pytest.approx(figures[0][key], rel=1e-4, abs=1e-5), key
    listing = [sorted(p.name for p in (d / "checkpoints").iterdir()) for d in (one, two)]
    assert listing[0] == listing[1]


def test_a_two_rank_checkpoint_resumes_in_one_process(runs: tuple[Path, Path], setting: Toy, tmp_path: Path) -> None:
    one, two = runs
    stage = json.loads((one / "manifest.json").read_text())["stage"]
    resumed = tmp_path / "resumed"
    shutil.copytree(two, resumed)  # as a kill just after the checkpoint of step 2 would have left it
    shutil.rmtree(resumed / "checkpoints" / "step-0000004")
    (resumed / "checkpoints" / "latest").write_text("step-0000002\n")
    for name in ("manifest.json", "model.safetensors", "config.json", "loss.png", "score.safetensors"):
        (resumed / name).unlink(missing_ok=True)
    assert main([*_flags(stage, setting, resumed), "--resume"]) == 0
    _assert_same_run(one, resumed)


def test_a_batch_that_does_not_split_over_the_ranks_is_refused(setting: Toy, tmp_path: Path) -> None:
    run = _torchrun(_flags("dpo", setting, tmp_path / "odd", batch=7))
    assert run.returncode != 0
    assert "batch_size 7 does not split over 2 ranks" in run.stderr
    assert not (tmp_path / "odd" / "manifest.json").exists()


def test_ppo_on_two_ranks_keeps_the_replicas_equal(setting: Toy, tmp_path: Path) -> None:
    rm, out = tmp_path / "rm", tmp_path / "ppo"
    assert main([*_flags("reward", setting, rm), "--max-steps", "2"]) == 0  # any reward model will do
    flags = ["ppo", "--model", str(setting.sft), "--reward-model", str(rm), "--prompts", str(setting.prompts),
             "--out", str(out), "--max-steps", "3", "--batch-size", "4", "--device", "cpu", "--threads", "1",
             "--set", "max_new_tokens=12", "--set", "minibatches=2", "--set", "eval_every=3",
             "--set", "max_val_prompts=4"]
    run = _torchrun(flags)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "diverged" not in run.stderr  # TrainRun.finish compares every rank's weights
    assert run.stdout.count("written to") == 1
    rows = MetricsLog.read(out / "metrics.jsonl")
    assert [r["step"] for r in rows] == [1, 2, 3]
    assert all(math.isfinite(r["loss"]) and math.isfinite(r["score"]) for r in rows)
    figures = json.loads((out / "manifest.json").read_text())["figures"]
    assert figures["world_size"] == 2 and figures["val_score"] is not None
