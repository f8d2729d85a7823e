import json

import pytest
from conftest import TINY_MODULES

from nanoforge import pipeline
from nanoforge.artifacts import read_manifest
from nanoforge.data.docsite import serve_site
from nanoforge.errors import NanoforgeError
from nanoforge.pipeline import load_pipeline_config, run_pipeline, run_summary
from nanoforge.train.faults import TrainingStopped
from nanoforge.train.metrics import MetricsLog


def _tiny_run(tmp_path, **extra):
    sets = {
        "run.root": str(tmp_path), "run.name": "tiny", "site.modules": ",".join(TINY_MODULES[:6]),
        "site.workers": "1", "crawl.delay": "0", "extract.workers": "1", "clean.workers": "1",
        "tokenizer.vocab_size": "400",
        "tokenize.val_fraction": "0.2",
        "tokenize.workers": "1", "pretrain.depth": "2", "pretrain.aspect": "32", "pretrain.head_dim": "16",
        "pretrain.seq_len": "64", "pretrain.batch_size": "4", "pretrain.batch_tokens": "256",
        "pretrain.max_steps": "12", "pretrain.eval_every": "6", "pretrain.eval_batches": "1",
        "pretrain.sample_every": "0", "pretrain.dtype": "fp32", "sample.max_new_tokens": "8",
        "instruct.max_entries": "40", "instruct.arithmetic": "60", "instruct.arithmetic_val": "10",
        "sft.max_steps": "4", "sft.answer_eval": "4", "sft.answer_tokens": "8", "sft.dtype": "fp32",
        "label.max_prompts": "12", "label.max_new_tokens": "12", "reward.max_steps": "3", "reward.eval_every": "3",
        "dpo.max_steps": "3", "dpo.eval_every": "3", "grpo.max_steps": "2", "grpo.batch_size": "2",
        "grpo.group_size": "4", "grpo.eval_problems": "4", "grpo.max_new_tokens": "12", "grpo.dtype": "fp32",
        "eval.arithmetic_problems": "4", "eval.pass_k": "2", "eval.max_examples": "6", "eval.max_new_tokens": "12",
        "eval.eval_batches": "1",
        **extra,
    }
    return load_pipeline_config(None, sets)


def test_pipeline_runs_every_stage_then_skips_them_all(tmp_path, capsys):
    p = _tiny_run(tmp_path)
    outputs = run_pipeline(p)
    assert list(outputs) == ["site", "crawl", "extract", "clean", "tokenizer", "stats", "tokens", "pretrain",
                             "instruct", "sft", "label", "reward", "dpo", "grpo", "eval", "report"]
    for name, out in outputs.items():
        m = read_manifest(out)
        assert m["stage"] == name and m["figures"] and m["versions"]["torch"] and m["content_hash"]
    pretrain_inputs = read_manifest(outputs["pretrain"])["inputs"]
    assert pretrain_inputs["tokens"]["hash"] == read_manifest(outputs["tokens"])["content_hash"]
    stamps = {k: (v / "manifest.json").stat().st_mtime_ns for k, v in outputs.items()}
    capsys.readouterr()
    run_pipeline(p)
    assert capsys.readouterr().err.count("up to date") == 16
    assert stamps == {k: (v / "manifest.json").stat().st_mtime_ns for k, v in outputs.items()}
    summary = run_summary(p, outputs)
    assert "val loss" in summary and "--- sample 1" in summary and "arithmetic_acc" in summary
    page = (outputs["report"] / "index.html").read_text()
    assert all(t in page for t in ("Corpus funnel", "Training curves", "Evaluation across stages"))
    assert set(json.loads((outputs["eval"] / "eval.json").read_text())["models"]) == {"pretrain", "sft", "dpo", "grpo"}


def test_changed_config_reruns_that_stage_and_those_after_it(tmp_path, capsys):
    run_pipeline(_tiny_run(tmp_path))
    capsys.readouterr()
    run_pipeline(_tiny_run(tmp_path, **{"tokenizer.vocab_size": "420"}))
    err = capsys.readouterr().err
    assert "[site] up to date" in err and "[crawl] up to date" in err and "[extract] up to date" in err
    assert "[clean] up to date" in err
    for stage in ("tokenizer", "stats", "tokens", "pretrain", "sft", "grpo", "report"):
        assert f"[{stage}] running" in err
    capsys.readouterr()
    run_pipeline(_tiny_run(tmp_path, **{"tokenizer.vocab_size": "420", "pretrain.max_steps": "14"}))
    err = capsys.readouterr().err
    assert err.count("up to date") == 8 and "[pretrain] running" in err


def test_a_pretrain_cut_short_resumes_only_with_the_same_inputs_and_settings(tmp_path, monkeypatch, capsys):
    """Its checkpoint is used only where its inputs hash the same (a new tokenizer means other token ids); a
    setting that only says how a stage runs (max_time, threads, workers) neither restarts it nor reruns a
    finished stage."""
    monkeypatch.setattr(pipeline, "STAGES", pipeline.STAGES[:8])  # site … pretrain
    stop = {"pretrain.max_steps": "6", "pretrain.ckpt_every": "100", "pretrain.max_time": "1e-6"}
    with pytest.raises(TrainingStopped, match="after step 1;"):
        run_pipeline(_tiny_run(tmp_path, **stop))
    capsys.readouterr()
    with pytest.raises(TrainingStopped, match="after step 1;"):  # not step 2: it started again
        run_pipeline(_tiny_run(tmp_path, **stop, **{"tokenizer.vocab_size": "420"}))
    err = capsys.readouterr().err
    assert "[tokens] running" in err and "[pretrain] running" in err and "with other settings or inputs" in err
    outputs = run_pipeline(_tiny_run(tmp_path, **{**stop, "pretrain.max_time": "none", "pretrain.threads": "1",
                                                  "clean.workers": "2", "tokenizer.vocab_size": "420"}))
    err = capsys.readouterr().err
    assert "[clean] up to date" in err and "[tokens] up to date" in err and "[pretrain] resuming" in err
    m = read_manifest(outputs["pretrain"])
    assert m["figures"]["steps"] == 6 and m["inputs"]["tokens"]["hash"] == read_manifest(outputs["tokens"])[
        "content_hash"]
    assert [r["step"] for r in MetricsLog.read(outputs["pretrain"] / "metrics.jsonl") if "loss" in r] == [1, 2, 3, 4,
                                                                                                          5, 6]


def test_a_refused_setting_leaves_the_finished_output_in_place(tmp_path, monkeypatch):
    monkeypatch.setattr(pipeline, "STAGES", pipeline.STAGES[:5])  # site … tokenizer
    outputs = run_pipeline(_tiny_run(tmp_path))
    before = {k: read_manifest(v)["content_hash"] for k, v in outputs.items()}
    for bad, match in (({"tokenizer.vocab_size": "5"}, "vocab"), ({"crawl.timeout": "0"}, "timeout")):
        with pytest.raises(NanoforgeError, match=match):
            run_pipeline(_tiny_run(tmp_path, **bad))
        assert {k: (read_manifest(v) or {}).get("content_hash") for k, v in outputs.items()} == before, bad
    assert sorted(p.name for p in (tmp_path / "tiny").iterdir()) == [p.name for p in outputs.values()]


def test_a_crawl_of_given_seeds_is_redone_when_its_settings_change(tmp_path, monkeypatch, capsys):
    stages = pipeline.STAGES
    monkeypatch.setattr(pipeline, "STAGES", stages[:1])
    site = run_pipeline(_tiny_run(tmp_path))["site"]
    monkeypatch.setattr(pipeline, "STAGES", stages[:2])  # site, crawl
    with serve_site(site) as url:
        def crawl(**extra):
            return read_manifest(run_pipeline(_tiny_run(tmp_path, **{"crawl.seeds": url, **extra}))["crawl"])

        assert crawl(**{"crawl.max_pages": "5"})["figures"]["pages"] == 5
        m = crawl(**{"crawl.max_pages": "3"})
        assert (m["config"]["max_pages"], m["figures"]["pages"]) == (3, 3)
        m = crawl(**{"crawl.seeds": url + "json.html", "crawl.max_pages": "2"})  # other seeds: no refusal
        assert m["config"]["seeds"] == [url + "json.html"] and m["figures"]["pages"] == 2
        (tmp_path / "tiny" / "02-crawl" / "manifest.json").unlink()  # as a crawl cut short leaves it
        capsys.readouterr()
        crawl(**{"crawl.seeds": url + "json.html", "crawl.max_pages": "2"})
        assert "[crawl] resuming" in capsys.readouterr().err
        (tmp_path / "tiny" / "02-crawl" / "manifest.json").unlink()
        assert crawl(**{"crawl.max_pages": "4"})["figures"]["pages"] == 4  # other settings: crawled afresh
        assert "[crawl] running" in capsys.readouterr().err
