import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from nanoforge.artifacts import atomic_dir, content_hash, input_hash, read_manifest, write_manifest


def test_atomic_dir_keeps_the_old_artifact_when_the_new_one_fails(tmp_path):
    out = tmp_path / "art"
    with atomic_dir(out) as tmp:
        (tmp / "a.txt").write_text("old")
    with pytest.raises(RuntimeError):
        with atomic_dir(out) as tmp:
            (tmp / "a.txt").write_text("half")
            raise RuntimeError("killed")
    assert (out / "a.txt").read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["art"]  # no temp leftovers


_WRITER = """
import os, sys, time
from pathlib import Path
from nanoforge.artifacts import atomic_dir
with atomic_dir(sys.argv[1]) as tmp:
    (tmp / "half.bin").write_bytes(b"x")
    Path(sys.argv[2]).write_text(str(tmp))
    time.sleep(60)
"""


def test_atomic_dir_removes_temp_dirs_of_killed_writers_only(tmp_path):
    out, ready = tmp_path / "art", tmp_path / "ready"
    writer = subprocess.Popen([sys.executable, "-c", _WRITER, str(out), str(ready)])
    try:
        deadline = time.monotonic() + 30
        while not ready.exists() and writer.poll() is None and time.monotonic() < deadline:
            time.sleep(0.02)
        live = Path(ready.read_text())
        unnamed = tmp_path / ".art.abcd1234.tmp"  # an older version's: whose it is cannot be told
        unnamed.mkdir()
        with atomic_dir(out) as tmp:
            (tmp / "a.txt").write_text("new")
        assert live.is_dir() and unnamed.is_dir()  # its writer is alive
    finally:
        writer.kill()
        writer.wait()
    assert live.is_dir()  # SIGKILL: nothing removed it
    with atomic_dir(out) as tmp:
        (tmp / "a.txt").write_text("newer")
    assert sorted(p.name for p in tmp_path.iterdir()) == [".art.abcd1234.tmp", "art", "ready"]


def test_manifest_records_inputs_and_content_hash(tmp_path):
    src = tmp_path / "src.txt"
    src.write_text("hello")
    out = tmp_path / "out"
    with atomic_dir(out) as tmp:
        (tmp / "x.bin").write_bytes(b"123")
        write_manifest(tmp, stage="demo", config={"a": 1}, inputs={"src": src}, figures={"n": 3})
    m = read_manifest(out)
    assert m["stage"] == "demo" and m["figures"] == {"n": 3}
    assert m["inputs"]["src"]["hash"] == content_hash(src)
    assert input_hash(out) == m["content_hash"] == content_hash(out)
    (out / "x.bin").write_bytes(b"124")
    assert content_hash(out) != m["content_hash"]
    assert json.loads((out / "manifest.json").read_text())["versions"]["nanoforge"]


def test_equal_weights_make_byte_identical_model_files_in_every_process(tmp_path):
    """safetensors orders the header's metadata by a per-process hash, so with two keys the same weights
    gave different files now and then; each process here writes the same model once."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    script = (
        "import sys, torch\n"
        "from nanoforge.model import GPT, ModelConfig\n"
        "from pathlib import Path\n"
        "from nanoforge.train.checkpoint import save_model_artifact\n"
        "torch.manual_seed(0)\n"
        "m = GPT(ModelConfig(vocab_size=64, seq_len=16, n_layer=1, n_embd=32, n_head=2))\n"
        "save_model_artifact(m, Path(sys.argv[1]), tokenizer_dir=None)\n"
    )
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parent.parent)}
    dirs = [tmp_path / f"m{i}" for i in range(4)]
    for d in dirs:
        subprocess.run([sys.executable, "-c", script, str(d)], check=True, env=env)
    assert len({(d / "model.safetensors").read_bytes() for d in dirs}) == 1
