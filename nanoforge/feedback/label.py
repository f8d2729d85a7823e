"""`nanoforge label`: fill a labelling database with response pairs, then serve it to annotators (or let
simulated annotators label it), and the pipeline stage that does all of it unattended.

    nanoforge label --model runs/demo/09-sft --prompts prompts.jsonl --db labels.sqlite --annotators team.txt
    nanoforge label --db labels.sqlite --port 8100            # serve an existing database again
    nanoforge label --model … --prompts … --db … --simulate 2 # two simulated annotators label it all, then exit
    nanoforge label export --db labels.sqlite --out prefs.jsonl

Annotators file: one `name token` per line (`#` comments allowed), or JSON — `{"name": "token", …}` or
`[{"name": …, "token": …}, …]`. Tokens must be at least 8 characters; only their SHA-256 is stored. Without
a file, a database with no annotator gets one called `annotator` whose fresh token is printed once.
A token is looked up when first seen and then cached by the running server (restart it after replacing one).

Sampling is done once per (model, prompts, settings): the database remembers what it generated, and
starting again with the same inputs goes straight to serving.
"""

from __future__ import annotations

import json
import secrets
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from nanoforge.artifacts import atomic_dir, content_hash, to_jsonable, write_manifest
from nanoforge.console import info
from nanoforge.errors import NanoforgeError
from nanoforge.feedback.app import create_app
from nanoforge.feedback.export import export_preferences
from nanoforge.feedback.items import read_prompts, sample_pairs
from nanoforge.feedback.simulate import register_simulated, simulate
from nanoforge.feedback.store import FeedbackStore
from nanoforge.infer.chat import ChatModel
from nanoforge.infer.server import run_server


@dataclass
class LabelConfig:
    """How response pairs are sampled, and (for unattended runs) how simulated annotators label them."""

    temperatures: list[float] = field(default_factory=lambda: [0.7, 1.1])  # response 0, response 1
    top_k: int | None = 50
    top_p: float | None = None
    max_new_tokens: int = 64
    batch_size: int = 32  # prompts per generation batch
    max_prompts: int | None = None  # use the first N prompts of the file
    seed: int = 0
    device: str = "auto"
    threads: int | None = None  # torch threads for sampling (None: torch's default)
    simulated_annotators: int = 2  # collect_preferences / --simulate: how many label every item
    noise: float = 0.1  # probability that a simulated annotator answers at random (see judge.py)

    def __post_init__(self) -> None:
        try:  # from --set the temperatures arrive as texts
            self.temperatures = [float(t) for t in self.temperatures]
        except (TypeError, ValueError):
            raise NanoforgeError(f"label: temperatures must be two numbers, got {self.temperatures}") from None
        if len(self.temperatures) != 2 or min(self.temperatures) < 0:
            raise NanoforgeError(f"label: need two temperatures >= 0, got {self.temperatures}")
        if self.max_new_tokens < 1 or self.batch_size < 1:
            raise NanoforgeError("label: max_new_tokens and batch_size must be >= 1")
        if not 0 <= self.noise <= 1 or self.simulated_annotators < 0:
            raise NanoforgeError("label: noise must be in [0, 1] and simulated_annotators >= 0")


SAMPLING = ("temperatures", "top_k", "top_p", "max_new_tokens", "batch_size", "max_prompts", "seed")


def read_annotators(path: Path | str) -> list[tuple[str, str]]:
    """(name, token) pairs of an annotators file (see the module docstring)."""
    path = Path(path)
    if not path.is_file():
        raise NanoforgeError(f"{path}: no such annotators file")
    text = path.read_text(encoding="utf-8")
    if text.lstrip().startswith(("{", "[")):
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise NanoforgeError(f"{path}: malformed JSON ({e.msg})") from None
        entries = list(data.items()) if isinstance(data, dict) else [
            (d.get("name"), d.get("token")) if isinstance(d, dict) else (None, None) for d in data]
    else:
        entries = []
        for n, line in enumerate(text.splitlines(), 1):
            line = line.split("#", 1)[0].strip()
            if not line:
                continue
            parts = line.split()
            if len(parts) != 2:
                raise NanoforgeError(f"{path}:{n}: expected `name token`")
            entries.append((parts[0], parts[1]))
    for name, token in entries:
        if not isinstance(name, str) or not isinstance(token, str) or len(token) < 8:
            raise NanoforgeError(f"{path}: annotator {name!r} needs a name and a token of at least 8 characters")
    if not entries:
        raise NanoforgeError(f"{path}: no annotators")
    return entries


def fill(cfg: LabelConfig, db: Path, model_dir: Path, prompts: Path) -> dict[str, Any]:
    """Sample response pairs for the prompts into `db`, unless it already holds this exact sampling."""
    sampling = {k: v for k, v in to_jsonable(cfg).items() if k in SAMPLING}
    key = json.dumps({"model": content_hash(model_dir / "model.safetensors"), "prompts": content_hash(prompts),
                      "sampling": sampling}, sort_keys=True)
    store = FeedbackStore(db, seed=cfg.seed)
    try:
        done = store.db.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        if done is not None:
            counts = json.loads(done[0])
            info(f"label: {db} already holds these pairs ({counts['items']} items); not sampling again")
            return counts
        records = read_prompts(prompts)[: cfg.max_prompts]
        if cfg.threads:
            torch.set_num_threads(cfg.threads)
        cm = ChatModel.load(model_dir, cfg.device)
        t0 = time.perf_counter()
        items, counts = sample_pairs(cm, records, cfg)
        counts["added"] = store.add_items(items)
        counts["sampling_seconds"] = round(time.perf_counter() - t0, 2)
        store.db.execute("INSERT OR REPLACE INTO meta (key, value) VALUES (?, ?)", (key, json.dumps(counts)))
    finally:
        store.close()
    info(f"label: {counts['items']} pairs sampled from {counts['prompts']} prompts in {counts['sampling_seconds']}s "
         f"({counts['identical']} identical pairs and {counts['too_long']} prompts too long left out)")
    return counts


def add_annotators(db: Path, annotators: Path | None) -> str | None:
    """Register the annotators of the file; with none and an empty roster, create one. Returns a token to print
    (only for an annotator created here)."""
    store = FeedbackStore(db)
    try:
        if annotators is not None:
            for name, token in read_annotators(annotators):
                store.add_annotator(name, token)
            return None
        if store.db.execute("SELECT COUNT(*) FROM annotators WHERE simulated = 0").fetchone()[0]:
            return None
        token = secrets.token_urlsafe(18)
        store.add_annotator("annotator", token)
        return token
    finally:
        store.close()


def run_simulated(db: Path, cfg: LabelConfig, host: str = "127.0.0.1", port: int = 0) -> dict[str, Any]:
    """Serve `db` and let `cfg.simulated_annotators` simulated annotators label every item through HTTP."""
    store = FeedbackStore(db)
    try:
        annotators = register_simulated(store, cfg.simulated_annotators, noise=cfg.noise, seed=cfg.seed)
    finally:
        store.close()
    with run_server(create_app(db, seed=cfg.seed), host, port) as url:
        t0 = time.perf_counter()
        counts = simulate(url, annotators)
        seconds = time.perf_counter() - t0
    total = sum(counts.values())
    info(f"label: {len(annotators)} simulated annotators made {total} judgements in {seconds:.1f}s "
         f"({total / max(seconds, 1e-9):.0f}/s)")
    return {"judgements": total, "judgement_seconds": round(seconds, 2), "judgements_per_s": total / max(seconds, 1e-9)}


def serve_labels(db: Path, host: str = "127.0.0.1", port: int = 8100, *, seed: int | None = None) -> None:
    """Serve the labelling app over `db` until Ctrl-C."""
    with run_server(create_app(db, seed=seed), host, port) as url:
        print(f"labelling at {url} (stats at {url}stats; Ctrl-C stops)", flush=True)
        try:
            threading.Event().wait()
        except KeyboardInterrupt:
            info("stopped")


def collect_preferences(cfg: LabelConfig, model_dir: Path | str, prompts: Path | str, out: Path | str, *,
                        inputs: dict[str, Path] | None = None) -> dict[str, Any]:
    """The pipeline's labelling stage, unattended: sample pairs, let simulated annotators judge them through
    the app, export the preferences. Writes `labels.sqlite`, `prefs.jsonl` and the manifest into `out`.
    `inputs` are what the manifest records as the stage's inputs (default: the model and the prompt file;
    the pipeline passes the artifact directories the files come from)."""
    model_dir, prompts, out = Path(model_dir), Path(prompts), Path(out)
    if cfg.simulated_annotators < 1:
        raise NanoforgeError("label: collect_preferences needs simulated_annotators >= 1")
    t0 = time.time()
    with atomic_dir(out) as tmp:
        db = tmp / "labels.sqlite"
        figures: dict[str, Any] = dict(fill(cfg, db, model_dir, prompts))
        figures.update(run_simulated(db, cfg))
        figures.update(export_preferences(db, tmp / "prefs.jsonl"))
        store = FeedbackStore(db)
        try:
            stats = store.stats()
        finally:
            store.close()
        figures.update({"agreement_percent": stats["agreement"]["percent_agreement"],
                        "agreement_kappa": stats["agreement"]["kappa"], "choices": stats["choices"],
                        "seconds": round(time.time() - t0, 1)})
        manifest = write_manifest(tmp, stage="label", config=cfg,
                                  inputs=inputs or {"model": model_dir, "prompts": prompts}, figures=figures)
    info(f"label done in {figures['seconds']:.0f}s: {figures['pairs']} preference pairs from {figures['items']} items")
    return manifest
