"""The CLI wiring of the corpus stages: flags reach the stage configs and results are printed."""

import pyarrow.parquet as pq

from nanoforge.artifacts import read_manifest
from nanoforge.cli import main
from nanoforge.data.docsite import serve_site


def test_site_crawl_extract_from_the_command_line(tmp_path, capsys):
    site, crawl, docs = tmp_path / "site", tmp_path / "crawl", tmp_path / "docs"
    assert main(["site", "--out", str(site), "--modules", "json,textwrap,string", "--workers", "1"]) == 0
    assert "3 pages" in capsys.readouterr().out
    with serve_site(site) as url:
        assert main(["crawl", url, "--out", str(crawl), "--max-pages", "3", "--delay", "0",
                     "--concurrency", "2", "--user-agent", "nanoforge-test"]) == 0
    m = read_manifest(crawl)
    assert m["config"]["max_pages"] == 3 and m["config"]["user_agent"] == "nanoforge-test"
    assert m["figures"]["pages"] == 3 and m["figures"]["robots_disallowed"] == 1  # the index links /private/
    assert main(["extract", str(crawl), "--out", str(docs), "--workers", "1", "--extractor", "trafilatura"]) == 0
    assert "documents written" in capsys.readouterr().out
    table = pq.read_table(next(docs.glob("*.parquet")))
    assert table.num_rows == 3 and set(table.column("extractor").to_pylist()) == {"trafilatura"}


def test_bad_crawl_input_is_one_line(tmp_path, capsys):
    assert main(["crawl", "ftp://example.org/", "--out", str(tmp_path / "c")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err


def _run_config(tmp_path, **run):
    config = tmp_path / "run.toml"
    config.write_text("[run]\n" + "".join(f'{k} = "{v}"\n' for k, v in run.items()))
    return config


def test_run_stopped_by_max_time_or_sigterm_says_how_to_continue(tmp_path, monkeypatch, capsys):
    """`run` has no --resume: a training stage stopped with a checkpoint says to rerun the same command, and
    exits as `pretrain` does (0 for max_time, 143 as killed by SIGTERM)."""
    import pytest

    from nanoforge import pipeline
    from nanoforge.train.faults import TrainingStopped

    config = _run_config(tmp_path, root=str(tmp_path / "runs"), name="x")
    ckpt = tmp_path / "runs" / "x" / "08-pretrain" / "checkpoints" / "step-0000003"
    for reason, code in (("max_time", 0), ("SIGTERM", 143)):
        def stopped(p, reason=reason):
            raise TrainingStopped(reason, 3, str(ckpt))

        monkeypatch.setattr(pipeline, "run_pipeline", stopped)
        with pytest.raises(SystemExit) as e:
            main(["run", str(config)])
        err = capsys.readouterr().err
        assert e.value.code == code and "error" not in err and "--resume" not in err
        assert f"08-pretrain: stopped by {reason} after step 3" in err and f"rerun `nanoforge run {config}`" in err


def test_run_of_a_directory_or_into_a_file_is_one_line(tmp_path, capsys):
    assert main(["run", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"error: {tmp_path}: cannot read the config file") and "\n" not in err
    (tmp_path / "afile").write_text("")
    assert main(["run", str(_run_config(tmp_path, root=str(tmp_path / "afile"), name="x"))]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: [run] root/name: cannot make the run directory") and "\n" not in err


def test_eval_refuses_two_models_of_one_name(tmp_path, capsys):
    assert main(["eval", "--model", str(tmp_path / "a" / "model"), "--model", str(tmp_path / "b" / "model"),
                 "--out", str(tmp_path / "e")]) == 2
    err = capsys.readouterr().err
    assert "two models are named 'model'" in err and "NAME=DIR" in err


def test_eval_max_examples_zero_is_refused_not_ignored(tmp_path, capsys):
    assert main(["eval", "--model", str(tmp_path / "a"), "--max-examples", "0", "--out", str(tmp_path / "e")]) == 2
    assert "max_examples" in capsys.readouterr().err


def test_training_commands_name_their_own_config_table_and_note_the_others(tmp_path, capsys):
    from nanoforge.cli import build_parser

    sub = next(a for a in build_parser()._actions if a.dest == "command").choices
    for command in ("pretrain", "sft", "grpo", "reward", "dpo", "ppo"):
        config = next(a for a in sub[command]._actions if a.dest == "config")
        assert f"[{command}] table" in config.help, command
    config = tmp_path / "c.toml"
    config.write_text("seed = 1\n[pretrain]\nmax_steps = 3\n[sft]\nepochs = 2\n")
    assert main(["pretrain", "--data", str(tmp_path / "none"), "--out", str(tmp_path / "m"), "--config",
                 str(config)]) == 2
    assert f"note: {config}: not read: seed, [sft]" in capsys.readouterr().err
