"""`gather_strided` and `rows_across_ranks`: under torchrun each rank computes every world_size-th item and
every rank ends with all the rows in the items' order, for any count of items (none, fewer than the ranks,
uneven); in one process both are the plain computation."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import torch

from nanoforge.post.preference import rows_across_ranks
from nanoforge.train.distributed import Dist, gather_strided

WORKER = textwrap.dedent('''
    import json, sys
    import torch
    from nanoforge.post.preference import rows_across_ranks
    from nanoforge.train.distributed import gather_strided, init_distributed

    d, device = init_distributed("cpu")
    seen = []  # the items this rank computed

    def fn(part):
        seen.extend(part)
        return torch.tensor([[float(i), float(i * i)] for i in part])

    out = {"rank": d.rank}
    for n in (0, 1, 2, 5, 8):
        items = list(range(n))
        out[f"rows{n}"] = rows_across_ranks(fn, items, 2, 2, d, device).tolist()
        mine = torch.tensor([float(i) for i in range(d.rank, n, d.world_size)]).reshape(-1, 1)
        out[f"gather{n}"] = gather_strided(mine, n, d)[:, 0].tolist()
    out["seen"] = seen
    with open(f"{sys.argv[1]}/rank{d.rank}.json", "w") as f:
        json.dump(out, f)
    torch.distributed.destroy_process_group()
''')


def test_rows_across_two_ranks_come_back_whole_and_in_order(tmp_path: Path) -> None:
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parent.parent)}
    run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-addr",
                          "127.0.0.1", "--master-port", str(port), str(script), str(tmp_path)],
                         env=env, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr[-3000:]
    results = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    for n in (0, 1, 2, 5, 8):
        want = [[float(i), float(i * i)] for i in range(n)]
        assert results[0][f"rows{n}"] == results[1][f"rows{n}"] == want, n
        assert results[0][f"gather{n}"] == results[1][f"gather{n}"] == [float(i) for i in range(n)], n
    # each rank computed only its share: 0, 2, 4, … and 1, 3, 5, …, in batches of 2
    assert results[0]["seen"] == [0] + [0] + [0, 2, 4] + [0, 2, 4, 6]
    assert results[1]["seen"] == [1] + [1, 3] + [1, 3, 5, 7]


def test_one_process_computes_every_row_itself() -> None:
    calls = []

    def fn(part: list[int]) -> torch.Tensor:
        calls.append(list(part))
        return torch.tensor([[float(i)] for i in part])

    rows = rows_across_ranks(fn, list(range(5)), 2, 1, Dist(), torch.device("cpu"))
    assert rows[:, 0].tolist() == [0.0, 1.0, 2.0, 3.0, 4.0]
    assert calls == [[0, 1], [2, 3], [4]]
    assert rows_across_ranks(fn, [], 2, 3, Dist(), torch.device("cpu")).shape == (0, 3)
    local = torch.ones(3, 2)
    assert gather_strided(local, 3, Dist()) is local
