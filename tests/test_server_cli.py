"""`pegboard serve`'s command line: flags grouped by slot, and `--config FILE.yaml` settings
that explicit flags override."""

from __future__ import annotations

import argparse

import pytest
import yaml
from pegboard.core.cli.engine_args import engine_settings
from pegboard.core.cli.main import build_parser, main
from pegboard.core.cli.serve import with_prometheus


def parse(*argv: str) -> argparse.Namespace:
    args = build_parser().parse_args(["serve", *argv])
    return args.resolve(args)


def write_config(tmp_path, settings: dict) -> str:
    path = tmp_path / "serve.yaml"
    path.write_text(yaml.safe_dump(settings))
    return str(path)


def test_help_groups_flags_by_slot(capsys):
    with pytest.raises(SystemExit) as exit:
        main(["serve", "--help"])
    assert exit.value.code == 0
    text = capsys.readouterr().out
    for group in ("server:", "model and engine:", "scheduler plugins:", "kv_cache plugins:",
                  "metrics plugins:"):  # fmt: skip
        assert group in text
    scheduler_group = text.split("scheduler plugins:")[1].split("plugins:")[0]
    assert "--scheduler" in scheduler_group and "--sjf-" in scheduler_group
    assert "--jsonl-path" in text.split("metrics plugins:")[1]
    for flag in ("--host", "--port", "--config", "--admin-token", "--api-key", "--drain-timeout"):
        assert flag in text


def test_defaults_without_a_config_file():
    args = parse()
    assert (args.host, args.port, args.drain_timeout) == ("127.0.0.1", 8000, 30.0)
    assert args.admin_token is None and args.api_key is None
    assert engine_settings(args)["max_num_batched_tokens"] == 8192


def test_config_file_sets_engine_server_and_plugin_settings(tmp_path):
    config = write_config(
        tmp_path,
        {
            "port": 9001,
            "scheduler": "sjf",
            "max-num-batched-tokens": 64,
            "kv_cache_tokens": 4096,
            "metrics": ["jsonl"],
            "jsonl-path": "/tmp/m.jsonl",
            "served-model-name": "tiny",
            "patch": ["some-patch"],
        },
    )
    args = parse("--config", config)
    assert args.port == 9001
    assert args.served_model_name == ["tiny"]
    settings = engine_settings(args)
    assert settings["scheduler"] == "sjf"
    assert settings["max_num_batched_tokens"] == 64
    assert settings["kv_cache_tokens"] == 4096
    assert settings["patches"][0] == "some-patch"
    assert settings["plugin_options"] == {"jsonl": {"path": "/tmp/m.jsonl"}}
    assert with_prometheus(settings["metrics"]) == ["prometheus", "jsonl"]


def test_explicit_flags_override_the_config_file_even_at_their_default(tmp_path):
    config = write_config(tmp_path, {"port": 9001, "scheduler": "sjf", "host": "127.0.0.2"})
    args = parse("--config", config, "--port", "8000", "--scheduler", "fcfs")
    assert args.port == 8000  # the default value, but given explicitly
    assert engine_settings(args)["scheduler"] == "fcfs"
    assert args.host == "127.0.0.2"  # not given: the file's value stands


@pytest.mark.parametrize(
    "settings",
    [{"no-such-flag": 1}, {"port": "eighty"}, {"dtype": "float8"}, ["not", "a", "mapping"]],
    ids=["unknown key", "bad type", "bad choice", "not a mapping"],
)
def test_bad_config_files_are_usage_errors(tmp_path, capsys, settings):
    config = write_config(tmp_path, settings)
    with pytest.raises(SystemExit) as exit:
        parse("--config", config)
    assert exit.value.code == 2
    assert "--config" in capsys.readouterr().err


def test_prometheus_is_always_enabled_once():
    assert with_prometheus(None) == ["prometheus"]
    assert with_prometheus(["jsonl", "prometheus"]) == ["prometheus", "jsonl"]
