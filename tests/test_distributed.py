"""`nanoforge pretrain` under torchrun on CPU (gloo, 2 processes): DDP and FSDP follow the one-process run
with the same global batch step for step, and checkpoints written at one world size resume at the other.

Each launch is `python -m torch.distributed.run --nproc-per-node 2 -m nanoforge pretrain …`, ~10 s on two
cores (mostly starting Python and torch three times); the runs are shared by the tests of this module.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from safetensors.torch import load_file

from nanoforge.cli import main
from nanoforge.train.checkpoint import checkpoint_state, latest_checkpoint
from nanoforge.train.metrics import MetricsLog

STEPS, CKPT_EVERY = 6, 3
ENV = {**os.environ, "PYTHONPATH": str(Path(__file__).parent.parent)}


def _flags(tokens: Path, out: Path, *extra: str) -> list[str]:
    """A 0.2 M-parameter model on the CPU (gloo, also on a GPU machine); the global batch is 8 sequences:
    4 micro-batches of 2 on one process, 2 on each of two ranks."""
    return ["pretrain", "--data", str(tokens), "--out", str(out), "--depth", "2", "--max-steps", str(STEPS),
            "--batch-size", "2", "--device", "cpu", "--threads", "1", "--set", "aspect=32", "--set", "head_dim=16",
            "--set", "seq_len=64", "--set", "batch_tokens=512", "--set", f"ckpt_every={CKPT_EVERY}",
            "--set", "eval_every=3", "--set", "eval_batches=2", "--set", "sample_every=0", "--set", "dtype=fp32",
            "--set", "warmup_steps=2", "--set", "lr=3e-3", *extra]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _torchrun_cmd(tokens: Path, out: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-addr", "127.0.0.1",
            "--master-port", str(_free_port()), "-m", "nanoforge", *_flags(tokens, out, *extra)]


def _torchrun(tokens: Path, out: Path, *extra: str) -> None:
    run = subprocess.run(_torchrun_cmd(tokens, out, *extra), env=ENV, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]


def _rewound(run: Path, dst: Path, step: int) -> Path:
    """A copy of `run` as a kill just after its checkpoint of `step` would have left it."""
    shutil.copytree(run, dst)
    keep = f"step-{step:07d}"
    for ckpt in (dst / "checkpoints").glob("step-*"):
        if ckpt.name != keep:
            shutil.rmtree(ckpt)
    (dst / "checkpoints" / "latest").write_text(keep + "\n")
    for name in ("manifest.json", "model.safetensors", "config.json", "loss.png"):
        (dst / name).unlink()
    return dst


def _assert_same_run(expected: Path, got: Path, steps: int = STEPS) -> None:
    """Same steps, the same train and val losses and the same final weights, up to float rounding (the
    ranks sum the gradients in another order)."""
    a, b = MetricsLog.read(expected / "metrics.jsonl"), MetricsLog.read(got / "metrics.jsonl")
    assert [r["step"] for r in b] == [r["step"] for r in a] == list(range(1, steps + 1))
    assert [r["loss"] for r in b] == pytest.approx([r["loss"] for r in a], rel=1e-5)
    assert [r["step"] for r in b if "val_loss" in r] == [r["step"] for r in a if "val_loss" in r]
    assert [r["val_loss"] for r in b if "val_loss" in r] == pytest.approx([r["val_loss"] for r in a if "val_loss" in r],
                                                                         rel=1e-5)
    wa, wb = load_file(str(expected / "model.safetensors")), load_file(str(got / "model.safetensors"))
    assert wa.keys() == wb.keys()
    for k in wa:
        assert (wa[k] - wb[k]).abs().max() < 1e-5, k


@pytest.fixture(scope="module")
def one_process(tiny_tokens, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("one") / "run"
    assert main(_flags(tiny_tokens, out)) == 0
    return out


@pytest.fixture(scope="module")
def ddp_run(tiny_tokens, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("ddp") / "run"
    _torchrun(tiny_tokens, out, "--parallel", "ddp")
    return out


@pytest.fixture(scope="module")
def fsdp_run(tiny_tokens, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("fsdp") / "run"
    _torchrun(tiny_tokens, out, "--parallel", "fsdp")
    return out


def test_ddp_on_two_ranks_gives_the_run_of_one_process(one_process, ddp_run):
    _assert_same_run(one_process, ddp_run)
    f = json.loads((ddp_run / "manifest.json").read_text())["figures"]
    assert (f["world_size"], f["parallel"], f["steps"]) == (2, "ddp", STEPS)


def test_fsdp_on_two_ranks_gives_the_run_of_one_process(one_process, fsdp_run):
    _assert_same_run(one_process, fsdp_run)
    # every rank wrote its own shards of the checkpoint
    assert len(list((fsdp_run / "checkpoints" / f"step-{STEPS:07d}" / "dcp").glob("*.safetensors"))) == 2
    assert len(list((fsdp_run / "checkpoints" / f"step-{STEPS:07d}" / "rng").glob("rank-*.safetensors"))) == 2


@pytest.mark.parametrize("parallel", ["ddp", "fsdp"])
def test_a_two_rank_checkpoint_resumes_on_one_process(parallel, one_process, request, tiny_tokens, tmp_path):
    two_ranks = request.getfixturevalue(f"{parallel}_run")
    out = _rewound(two_ranks, tmp_path / "resumed", CKPT_EVERY)
    assert json.loads((out / "checkpoints" / f"step-{CKPT_EVERY:07d}" / "state.json").read_text())["world_size"] == 2
    assert main([*_flags(tiny_tokens, out), "--resume"]) == 0
    _assert_same_run(one_process, out)


def test_a_one_process_checkpoint_resumes_on_two_fsdp_ranks(one_process, tiny_tokens, tmp_path):
    out = _rewound(one_process, tmp_path / "resumed", CKPT_EVERY)
    _torchrun(tiny_tokens, out, "--parallel", "fsdp", "--resume")
    _assert_same_run(one_process, out)
    assert json.loads((out / "manifest.json").read_text())["figures"]["world_size"] == 2


def test_sigterm_to_torchrun_leaves_a_checkpoint_that_resumes(tiny_tokens, tmp_path):
    """The ranks agree to stop at the same step, write a checkpoint there (not at a ckpt_every multiple)
    and exit; resumed on one process, the run ends where an uninterrupted one does."""
    steps, longer = 50, ["--max-steps", "50", "--set", "ckpt_every=1000"]
    ref = tmp_path / "ref"
    assert main([*_flags(tiny_tokens, ref), *longer]) == 0

    out, log = tmp_path / "stopped", tmp_path / "torchrun.log"
    with open(log, "w") as err:
        proc = subprocess.Popen(_torchrun_cmd(tiny_tokens, out, *longer), env=ENV, stdout=err, stderr=err)
        metrics, deadline = out / "metrics.jsonl", time.time() + 120
        while time.time() < deadline and len(MetricsLog.read(metrics) if metrics.exists() else []) < 2:
            time.sleep(0.05)
        proc.send_signal(signal.SIGTERM)  # what a scheduler sends before it kills the job
        proc.wait(timeout=120)
    assert "stopped by SIGTERM" in log.read_text(), log.read_text()[-3000:]
    assert not (out / "manifest.json").exists()
    state = checkpoint_state(latest_checkpoint(out / "checkpoints"))
    assert 2 <= state["step"] < steps and state["world_size"] == 2
    assert MetricsLog.read(out / "metrics.jsonl")[-1]["step"] == state["step"]

    assert main([*_flags(tiny_tokens, out), *longer, "--resume"]) == 0
    _assert_same_run(ref, out, steps)
