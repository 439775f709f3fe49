"""Consistent CLI errors of the data commands and model-info: `megaocto CMD: error: ...` on stderr; exit 2 for
usage/config errors, exit 1 for data errors (bad rows)."""
import json

import pytest

from megaocto.cli import main


def _run(argv, capsys):
    try:
        code = main(argv)
    except SystemExit as e:  # argparse's own errors
        code = e.code
    res = capsys.readouterr()
    return code, res.err


def _commit_rows(path, n=3):
    with open(path, "w") as f:
        for i in range(n):
            f.write(json.dumps({"old_contents": f"x = {i}\n", "new_contents": f"x = {i + 1}\n",
                                "subject": f"Change the value of x to {i + 1}", "new_file": "a.py",
                                "old_file": "a.py", "lang": "Python"}) + "\n")


@pytest.mark.parametrize("argv, message", [
    (["filter-commits", "--input", "{d}/c.jsonl", "--output", "{d}/o.jsonl"],
     "the token-length rule needs a tokenizer"),
    (["filter-commits", "--input", "{d}/c.jsonl", "--output", "{d}/o.jsonl", "--skip-rules", "token-length", "nope"],
     "unknown filter rule(s) ['nope']"),
    (["filter-commits", "--output", "{d}/o.jsonl"], "the following arguments are required: --input"),
    (["filter-commits", "--input", "{d}/c.jsonl"], "the following arguments are required: --output"),
    (["model-info", "--preset", "tiny-bigcode", "--tp", "0"], "--tp must be >= 1 (got 0)"),
    (["commits", "--repo", "{d}/nonexist", "--output", "{d}/c2.jsonl"], "error: {d}/nonexist is not a directory"),
    (["preprocess", "--input", "{d}/c.jsonl", "--tokenizer", "x", "--output-prefix", "{d}/p", "--workers", "0"],
     "error: --workers must be >= 1"),
    (["preprocess", "--input", "{d}/c.jsonl", "--tokenizer", "x", "--output-prefix", "{d}/p", "--keys", "oops"],
     "--keys expects ROLE=KEY"),
    (["tokenizer", "train", "--input", "{d}/nope.jsonl", "--vocab-size", "300", "--output", "{d}/t.json"],
     "input file(s) not found"),
    (["build-index", "--config", "{d}/nope.yaml"], "nope.yaml"),
    (["merge-datasets", "--input", "{d}/nope", "--output-prefix", "{d}/m"], "index file not found"),
    (["preprocess-megatron", "--input", "{d}/c.jsonl", "--output-prefix", "{d}/p", "--tokenizer-type",
      "TokenizerFromFile", "--tokenizer-file", "{d}/nope.json", "--workers", "1"],
     "--tokenizer-file {d}/nope.json: not found"),
])
def test_usage_and_config_errors_exit_2_with_the_command_prefix(tmp_path, capsys, argv, message):
    _commit_rows(tmp_path / "c.jsonl")
    code, err = _run([a.format(d=tmp_path) for a in argv], capsys)
    assert code == 2, err
    last = err.rstrip("\n").splitlines()[-1]
    assert last.startswith(f"megaocto {argv[0]}: error: "), err
    assert message.format(d=tmp_path) in last and "Traceback" not in err
    assert f"error: {argv[0]}:" not in err  # the command is named once


def test_bad_data_rows_exit_1_with_the_command_prefix(tmp_path, capsys):
    (tmp_path / "c.jsonl").write_text('{"old_contents": "x"}\n')
    code, err = _run(["filter-commits", "--input", str(tmp_path / "c.jsonl"), "--output", str(tmp_path / "o.jsonl"),
                      "--skip-rules", "token-length"], capsys)
    assert code == 1 and f"megaocto filter-commits: error: {tmp_path / 'c.jsonl'}:1: missing key" in err


def _numeric_options(parser):
    import argparse
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                yield from _numeric_options(sub)
        elif action.type in (int, float) and action.default is not None and action.option_strings:
            yield action


@pytest.mark.parametrize("module", ["preprocess", "merge_datasets", "filter_commits", "commits", "tokenizer",
                                    "build_index", "model_info", "preprocess_megatron"])
def test_numeric_options_show_their_default_in_help(module):
    import argparse
    import importlib
    parser = argparse.ArgumentParser()
    importlib.import_module(f"megaocto.commands.{module}").add_arguments(parser)
    missing = [a.option_strings[0] for a in _numeric_options(parser) if "%(default)s" not in (a.help or "")]
    assert not missing, f"{module}: help of {missing} does not show %(default)s"


def test_model_info_per_gpu_parameters_follow_the_requested_layout(capsys):
    from megaocto.config.model import ModelConfig
    from megaocto.model.memory import _stage_params
    stages = _stage_params(ModelConfig.from_preset("tiny-bigcode"), 1, 2)
    assert main(["model-info", "--preset", "tiny-bigcode", "--pp", "2"]) == 0
    line = next(ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("parameters:"))
    assert "pp=1" not in line
    assert f"per GPU (tp=1 pp=2) first stage {stages['first']:,}, last stage {stages['last']:,}" in line
