"""The run driver: stages in order over one run directory, skipping what is already done.

    nanoforge run my-run.toml          # runs/<name>/01-site, 02-crawl, 03-extract, 04-clean, … 08-pretrain
    nanoforge demo                     # the same, on the built-in config

A stage is skipped when its directory's manifest records the same stage, the same config (less the
RUN_CONTROL settings) and the same input hashes; otherwise it runs (again), and every stage after it sees
new input hashes and runs too. A training stage cut short resumes from its last checkpoint, and a crawl of
given seeds from its journal, when they were started with the same config and inputs.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

from nanoforge.artifacts import MANIFEST, atomic_write_json, input_hash, read_manifest, to_jsonable
from nanoforge.config import PretrainConfig, build, load_toml, resolve_pretrain
from nanoforge.console import info
from nanoforge.data.clean import CleanConfig, clean
from nanoforge.data.crawl import CrawlConfig, crawl
from nanoforge.data.docsite import build_site, serve_site
from nanoforge.data.extract import ExtractConfig, extract
from nanoforge.data.pydoc_corpus import CorpusConfig
from nanoforge.data.sources import CRAWL_JOURNAL
from nanoforge.data.stats import StatsConfig, corpus_stats
from nanoforge.errors import NanoforgeError
from nanoforge.eval.evaluate import EvalConfig, EvalInputs, run_eval
from nanoforge.eval.evaluate import check_config as check_eval_config
from nanoforge.eval.report import ReportConfig, report
from nanoforge.feedback.label import LabelConfig, collect_preferences
from nanoforge.infer.sample import SampleConfig
from nanoforge.post.dpo import DPOConfig, train_dpo
from nanoforge.post.grpo import GRPOConfig, grpo, resolve_grpo
from nanoforge.post.instruct import InstructConfig, make_instruct
from nanoforge.post.reward import RewardConfig, train_reward
from nanoforge.post.sft import SFTConfig, sft
from nanoforge.tokenizer import TokenizerConfig, train_tokenizer
from nanoforge.tokens import TokenizeConfig, tokenize
from nanoforge.train.checkpoint import checkpoint_state, latest_checkpoint
from nanoforge.train.loop import pretrain


@dataclass
class RunConfig:
    name: str = "run"
    root: str = "runs"
    docs: str | None = None  # use these documents instead of crawling the embedded docs site


@dataclass
class PipelineConfig:
    run: RunConfig
    site: CorpusConfig
    crawl: CrawlConfig
    extract: ExtractConfig
    clean: CleanConfig
    tokenizer: TokenizerConfig
    stats: StatsConfig
    tokenize: TokenizeConfig
    pretrain: PretrainConfig
    instruct: InstructConfig
    sft: SFTConfig
    label: LabelConfig
    reward: RewardConfig
    dpo: DPOConfig
    grpo: GRPOConfig
    eval: EvalConfig
    report: ReportConfig
    sample: SampleConfig

    @property
    def run_dir(self) -> Path:
        return Path(self.run.root) / self.run.name


SECTIONS = {"run": RunConfig, "site": CorpusConfig, "crawl": CrawlConfig, "extract": ExtractConfig,
            "clean": CleanConfig, "tokenizer": TokenizerConfig, "stats": StatsConfig,
            "tokenize": TokenizeConfig, "pretrain": PretrainConfig, "instruct": InstructConfig, "sft": SFTConfig,
            "label": LabelConfig, "reward": RewardConfig, "dpo": DPOConfig, "grpo": GRPOConfig, "eval": EvalConfig,
            "report": ReportConfig, "sample": SampleConfig}


def load_pipeline_config(path: Path | str | None = None, overrides: dict[str, str] | None = None
                         ) -> PipelineConfig:
    """Read a run config (TOML); `overrides` are `section.key` → value (from `--set`)."""
    raw = load_toml(path) if path is not None else demo_config_raw()
    unknown = sorted(set(raw) - set(SECTIONS))
    if unknown:
        raise NanoforgeError(f"{path}: unknown section(s) {', '.join(unknown)} "
                             f"(known: {', '.join(SECTIONS)})")
    not_tables = [s for s, v in raw.items() if not isinstance(v, dict)]
    if not_tables:
        raise NanoforgeError(f"{path}: {', '.join(not_tables)} must be a [table] of settings, not a value")
    for key, value in (overrides or {}).items():
        section, _, name = key.partition(".")
        if section not in SECTIONS or not name:
            raise NanoforgeError(f"--set {key}: expected SECTION.KEY with SECTION one of {', '.join(SECTIONS)}")
        raw.setdefault(section, {})[name] = value
    raw.setdefault("crawl", {}).setdefault("seeds", [])  # no seeds: crawl the embedded docs site
    where = str(path or "demo config")
    p = PipelineConfig(**{s: build(cls, raw.get(s, {}), f"{where} [{s}]") for s, cls in SECTIONS.items()})
    # what the later stages check only when they start, checked now: a mistake in [eval] must not surface
    # after pretraining and post-training have run
    resolve_pretrain(p.pretrain)
    resolve_grpo(p.grpo)
    check_eval_config(p.eval)
    return p


def demo_config_raw() -> dict[str, Any]:
    return load_toml(Path(str(resources.files("nanoforge").joinpath("configs/demo.toml"))))


@dataclass
class Stage:
    name: str
    inputs: list[str]  # names of earlier stages whose outputs this one reads
    config: Callable[[PipelineConfig], Any]
    run: Callable[[PipelineConfig, dict[str, Path], Path, bool], dict]
    manifest_config: Callable[[Any], Any] = lambda c: c
    # whether a run of this stage cut short continues (the `bool` `run` gets) rather than starting again: the
    # training stages from their last checkpoint, a crawl of given seeds from its journal
    resumable: Callable[[Any], bool] = lambda c: False


# Settings that say how a stage runs, not what it computes: they are left out when a finished stage is judged
# current and when a stage cut short is judged resumable, so that changing them neither redoes a finished stage
# nor restarts a paused one. `workers` (processes: the outputs are byte-identical for any number), `max_time`
# and `profile` change nothing in the result; `threads` can change the order of a few float sums in CPU kernels,
# the last bits of a result, as a rerun on another machine does. `device` and `compile` stay compared: the
# device picks the precision under dtype=auto, and compiled kernels round differently, so the weights differ
# by more than that.
RUN_CONTROL = frozenset({"workers", "threads", "max_time", "profile"})


def _run_crawl(p: PipelineConfig, ins: dict[str, Path], out: Path, _: bool) -> dict:
    """Crawl the configured seeds (continuing a crawl of them cut short), or (none given) the embedded docs
    site served on a free local port: a local crawl cut short starts again, as the site gets a new port."""
    if p.crawl.seeds:  # the site is still recorded as an input: the pipeline's stages form one chain
        return crawl(p.crawl, out, inputs={"site": ins["site"]})
    with serve_site(ins["site"]) as url:
        return crawl(dataclasses.replace(p.crawl, seeds=[url]), out, inputs={"site": ins["site"]})


def _crawl_manifest_config(cfg: CrawlConfig) -> Any:
    """The local site's URL (its port) changes from run to run; it does not make a crawl stale."""
    return cfg if cfg.seeds else {k: v for k, v in to_jsonable(cfg).items() if k != "seeds"}


def _run_pretrain(p: PipelineConfig, ins: dict[str, Path], out: Path, resume: bool) -> dict:
    return pretrain(p.pretrain, ins["tokens"], out, resume=resume, tokenizer=ins["tokenizer"])


def _training(_: Any) -> bool:
    return True


STAGES = [
    Stage("site", [], lambda p: p.site, lambda p, ins, out, _: build_site(p.site, out)),
    Stage("crawl", ["site"], lambda p: p.crawl, _run_crawl, manifest_config=_crawl_manifest_config,
          resumable=lambda c: bool(c.seeds)),
    Stage("extract", ["crawl"], lambda p: p.extract,
          lambda p, ins, out, _: extract(p.extract, [ins["crawl"]], out)),
    Stage("clean", ["extract"], lambda p: p.clean, lambda p, ins, out, _: clean(p.clean, ins["extract"], out)),
    Stage("tokenizer", ["clean"], lambda p: p.tokenizer,
          lambda p, ins, out, _: train_tokenizer(p.tokenizer, ins["clean"], out)),
    Stage("stats", ["clean", "tokenizer"], lambda p: p.stats,
          lambda p, ins, out, _: corpus_stats(p.stats, ins["clean"], out, ins["tokenizer"])),
    Stage("tokens", ["clean", "tokenizer"], lambda p: p.tokenize,
          lambda p, ins, out, _: tokenize(p.tokenize, ins["clean"], ins["tokenizer"], out)),
    Stage("pretrain", ["tokens", "tokenizer"], lambda p: p.pretrain, _run_pretrain,
          manifest_config=resolve_pretrain, resumable=_training),
    Stage("instruct", ["clean"], lambda p: p.instruct,
          lambda p, ins, out, _: make_instruct(p.instruct, ins["clean"], out)),
    Stage("sft", ["pretrain", "instruct"], lambda p: p.sft,
          lambda p, ins, out, resume: sft(p.sft, ins["pretrain"], [ins["instruct"] / "train.jsonl"], out,
                                          val=[ins["instruct"] / "val.jsonl"], resume=resume),
          resumable=_training),
    Stage("label", ["sft", "instruct"], lambda p: p.label,
          lambda p, ins, out, _: collect_preferences(p.label, ins["sft"], ins["instruct"] / "train.jsonl", out)),
    Stage("reward", ["sft", "label"], lambda p: p.reward,
          lambda p, ins, out, resume: train_reward(p.reward, ins["sft"], ins["label"] / "prefs.jsonl", out,
                                                   resume=resume),
          resumable=_training),
    Stage("dpo", ["sft", "label"], lambda p: p.dpo,
          lambda p, ins, out, resume: train_dpo(p.dpo, ins["sft"], ins["label"] / "prefs.jsonl", out,
                                                resume=resume),
          resumable=_training),
    Stage("grpo", ["dpo"], lambda p: p.grpo, lambda p, ins, out, resume: grpo(p.grpo, ins["dpo"], out, resume=resume),
          manifest_config=resolve_grpo, resumable=_training),
    Stage("eval", ["pretrain", "sft", "dpo", "grpo", "tokens", "instruct", "reward"], lambda p: p.eval,
          lambda p, ins, out, _: run_eval(p.eval, {k: ins[k] for k in ("pretrain", "sft", "dpo", "grpo")},
                                          EvalInputs(ins["tokens"], ins["instruct"], ins["reward"], ins["sft"]), out)),
    Stage("report", ["eval"], lambda p: p.report, lambda p, ins, out, _: report(p.report, p.run_dir, out)),
]
CORPUS_STAGES = ("site", "crawl", "extract")  # replaced by `[run] docs` when the user brings documents


def stage_dir(run_dir: Path, index: int, name: str) -> Path:
    return run_dir / f"{index + 1:02d}-{name}"


def compared_config(stage: Stage, cfg: Any) -> dict[str, Any]:
    """What of a stage's config decides its output: the manifest's config without the RUN_CONTROL settings."""
    return {k: v for k, v in to_jsonable(stage.manifest_config(cfg)).items() if k not in RUN_CONTROL}


def is_current(out: Path, stage: Stage, cfg: Any, inputs: dict[str, Path]) -> bool:
    """True when `out` holds a finished artifact of `stage` with this config and these inputs."""
    m = read_manifest(out)
    if m is None or m.get("stage") != stage.name:
        return False
    expected = compared_config(stage, cfg)
    saved = {k: v for k, v in m.get("config", {}).items() if k in expected}
    if saved != expected:
        return False
    # a stage records what it read (a directory, or files inside one): each must still hash the same, and
    # every upstream artifact of the pipeline must be among them
    recorded = [(Path(v.get("path", "")).resolve(), v.get("hash", "")) for v in m.get("inputs", {}).values()]
    for path, digest in recorded:
        if not path.exists() or input_hash(path) != digest:
            return False
    return all(any(path == q.resolve() or q.resolve() in path.parents for path, _ in recorded)
               for q in inputs.values())


def run_pipeline(p: PipelineConfig) -> dict[str, Path]:
    """Run (or skip) every stage in order; return each stage's output directory.

    A stage's earlier output that is not current is moved aside, not deleted, until the stage has made
    something of its own (an artifact, a checkpoint, a crawl journal): a stage that refuses its new settings
    or fails at once leaves the old output where it was.
    """
    run_dir = p.run_dir
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:  # [run] root or name names a file, or a directory we may not write
        raise NanoforgeError(f"[run] root/name: cannot make the run directory {run_dir} "
                             f"({e.strerror or e})") from None
    outputs: dict[str, Path] = {}
    for i, stage in enumerate(STAGES):
        out = stage_dir(run_dir, i, stage.name)
        if stage.name in CORPUS_STAGES and p.run.docs:
            if stage.name == "extract":
                outputs["extract"] = Path(p.run.docs)
                info(f"[corpus] using documents from {p.run.docs}")
            continue
        ins = {k: outputs[k] for k in stage.inputs}
        cfg = stage.config(p)
        aside = out.with_name(f".{out.name}.replaced")
        if aside.exists():  # a run was killed while this stage replaced its output: the newer one stays
            _keep_newer(out, aside)
        if is_current(out, stage, cfg, ins):
            info(f"[{stage.name}] up to date: {out}")
            outputs[stage.name] = out
            continue
        resume = _resumable(out, stage, cfg, ins)
        if not resume and out.exists():
            os.replace(out, aside)  # a finished or stale output of another config or other inputs
        if stage.resumable(cfg) and not resume:
            out.mkdir(parents=True)
            atomic_write_json(out / START_RECORD, _start_record(stage, cfg, ins))
        info(f"[{stage.name}] {'resuming' if resume else 'running'} → {out}")
        try:
            stage.run(p, ins, out, resume)
        except BaseException:
            if aside.exists() and not _has_progress(out):  # it made nothing: the earlier output comes back
                _keep_newer(out, aside)
            raise
        shutil.rmtree(aside, ignore_errors=True)
        outputs[stage.name] = out
    return outputs


# What the pipeline started a resumable stage with, in the stage's directory (a dotfile: no part of the
# artifact or its hash): a run cut short continues only with the same settings and the same inputs.
START_RECORD = ".pipeline-start.json"


def _start_record(stage: Stage, cfg: Any, inputs: dict[str, Path]) -> dict[str, Any]:
    return {"stage": stage.name, "config": compared_config(stage, cfg),
            "inputs": {k: input_hash(v) for k, v in sorted(inputs.items())}}


def _has_progress(out: Path) -> bool:
    """Whether `out` holds something a rerun keeps or continues: an artifact, a checkpoint, a crawl journal."""
    ckpt_root = out / "checkpoints"
    return ((out / MANIFEST).exists() or (out / CRAWL_JOURNAL).exists()
            or (ckpt_root.is_dir() and latest_checkpoint(ckpt_root) is not None))


def _keep_newer(out: Path, aside: Path) -> None:
    """Of a stage's output and the earlier one set aside, keep the new one if it made anything, else the old."""
    if _has_progress(out):
        shutil.rmtree(aside)
        return
    if out.exists():
        shutil.rmtree(out)
    os.replace(aside, out)


def _resumable(out: Path, stage: Stage, cfg: Any, inputs: dict[str, Path]) -> bool:
    """A stage cut short (killed, or stopped by max_time) continues where it was started with the same
    settings and the same inputs (its start record says), and, for training, from a checkpoint whose
    settings are the same too; otherwise it starts again."""
    if not stage.resumable(cfg) or not out.is_dir() or read_manifest(out) is not None:
        return False
    try:
        started = json.loads((out / START_RECORD).read_text())
    except (OSError, ValueError):
        started = None
    if started != _start_record(stage, cfg, inputs):
        if _has_progress(out):
            info(f"[{stage.name}] {out} was started with other settings or inputs: starting again")
        return False
    if stage.name == "crawl":
        return True
    ckpt = latest_checkpoint(out / "checkpoints") if (out / "checkpoints").is_dir() else None
    if ckpt is None:
        return False
    saved = checkpoint_state(ckpt).get("train_config")  # the reward and DPO stages record none
    return saved is None or {k: v for k, v in saved.items() if k not in RUN_CONTROL} == started["config"]


def run_summary(p: PipelineConfig, outputs: dict[str, Path]) -> str:
    """A short account of a finished run: what each stage produced, then samples from the model."""
    from nanoforge.infer.sample import sample

    lines = [f"run {p.run_dir}"]
    for name, out in outputs.items():
        f = (read_manifest(out) or {}).get("figures", {})
        if name == "clean":
            lines.append(f"  clean      {f.get('documents_in')} documents in, {f.get('documents_out')} out; removed "
                         + (", ".join(f"{k} {v}" for k, v in f.get("removed_by_reason", {}).items()) or "none"))
        elif name == "eval" and (out / "eval.json").exists():
            from nanoforge.eval.evaluate import eval_table

            lines.append("  eval\n" + "\n".join("    " + line for line in
                                                  eval_table(json.loads((out / "eval.json").read_text())).splitlines()))
        elif name == "report":
            lines.append(f"  report     {out / 'index.html'}  (open it in a browser; report.md beside it)")
        elif name not in ("tokenizer", "stats", "tokens", "pretrain"):
            scalars = [f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in f.items()
                       if isinstance(v, (int, float)) and not isinstance(v, bool)]
            lines.append(f"  {name:<10} " + ", ".join(scalars[:7]))
        elif name == "tokenizer":
            lines.append(f"  tokenizer  {f.get('kind')} vocab {f.get('vocab_size')}, "
                         f"{f.get('bytes_per_token', float('nan')):.2f} bytes/token held out")
        elif name == "stats":
            lines.append(f"  stats      {f.get('documents')} documents, {f.get('words', 0):,} words, "
                         f"{f.get('tokens', 0):,} tokens, {f.get('bytes_per_token', 0):.2f} bytes/token; "
                         f"{f.get('target_tokens', 0):.3g} tokens would be "
                         f"{f.get('projection_measured', {}).get('tb', 0):,.0f} TB of such text")
        elif name == "tokens":
            lines.append(f"  tokens     {f.get('tokens', '?')} tokens from {f.get('documents', '?')} documents")
        elif name == "pretrain":
            lines.append(f"  pretrain   {f.get('params', 0) / 1e6:.2f}M params, {f.get('steps')} steps in "
                         f"{f.get('seconds')} s, {f.get('tok_per_s') or 0:,.0f} tok/s ({f.get('dtype')})")
            if "val_loss" in f:
                lines.append(f"             val loss {f['val_loss']:.3f} nats/token vs unigram entropy "
                             f"{f.get('unigram_entropy', float('nan')):.3f}; {f.get('val_bpb', 0):.3f} bits/byte")
            lines.append(f"  model      {out}  (nanoforge sample --model {out} --prompt …)")
    chat_model = next((outputs[k] for k in ("grpo", "dpo", "sft") if k in outputs), None)
    if chat_model is not None:
        lines.append(f"  chat       nanoforge chat --model {chat_model}   (or: nanoforge serve --model {chat_model})")
    if "pretrain" in outputs and p.sample.max_new_tokens > 0:
        for i, text in enumerate(sample(p.sample, outputs["pretrain"])):
            lines.append(f"--- sample {i + 1} (seed {p.sample.seed}, temperature {p.sample.temperature})")
            lines.append(text)
    return "\n".join(lines)
