"""The GPU benchmark's path on a CPU: a device session is minutes long, so `bench_train.py --gpu` and the
script that drives it (benchmarks/gpu_session.sh) must not fail there on a typo. `--quick` runs the same
code on a tiny GPT-2, both sides, with the comparison settings the session uses."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_bench_train_gpu_mode_runs_end_to_end_on_a_tiny_model(tmp_path):
    out = tmp_path / "bench.jsonl"
    run = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "bench_train.py"), "--gpu", "--quick", "--kernels", "3",
         "--inductor", "coordinate_descent_tuning=0", "--inductor", "triton.cudagraphs=0", "--sdpa", "flash",
         "--loss-chunk-elements", "4096", "--host-data", "pinned", "--out", str(out)],
        cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "ratio" in run.stdout and "profiled step" in run.stdout
    record = json.loads(out.read_text().splitlines()[-1])
    assert set(record["results"]) == {"ours", "transformers"}
    assert record["knobs"] == {"inductor.coordinate_descent_tuning": False, "inductor.triton.cudagraphs": False,
                               "sdpa": "flash", "host_data": "pinned", "loss_chunk_elements": 4096}
    assert all(r["tok_s"] > 0 for r in record["results"].values())


def test_bench_train_refuses_an_unknown_inductor_setting():
    run = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_train.py"), "--gpu", "--quick",
                          "--inductor", "nope.no_such_setting=1"], cwd=ROOT, capture_output=True, text=True,
                         timeout=120)
    assert run.returncode != 0 and "torch._inductor.config has no 'nope.no_such_setting'" in run.stderr


def test_the_gpu_session_script_parses():
    assert subprocess.run(["bash", "-n", str(ROOT / "benchmarks" / "gpu_session.sh")]).returncode == 0
