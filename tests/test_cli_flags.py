"""The command line as a newcomer meets it: every core flag explains itself and its default;
vLLM's and SGLang's spellings work as aliases or fail with a hint; `--chat-template FILE`;
start-up mistakes (unknown plugin, bad option, missing model, busy port) are one line and exit
status 2 before the model loads, in `serve` as in `generate`."""

from __future__ import annotations

import argparse
import socket

import pytest
from pegboard.core.cli.engine_args import FLAG_HINTS, engine_settings
from pegboard.core.cli.main import build_parser, main

CORE_GROUPS = (
    "server",
    "model and engine",
    "tensor parallelism and multi-node (docs/architecture.md)",
)


def subparser(*path: str) -> argparse.ArgumentParser:
    parser = build_parser()
    for name in path:
        sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
        parser = sub.choices[name]
    return parser


@pytest.mark.parametrize("command", ["serve", "generate"])
def test_every_core_flag_has_help_and_states_its_default(command):
    parser = subparser(command)
    missing = []
    for group in parser._action_groups:
        if group.title not in CORE_GROUPS and group.title != "options":
            continue
        for action in group._group_actions:
            if (
                action.help == argparse.SUPPRESS
                or action.dest == "help"
                or not action.option_strings
            ):
                continue
            boolean = isinstance(action, (argparse._StoreTrueAction, argparse._StoreConstAction))
            if not action.help or (not boolean and "default" not in action.help):
                missing.append(action.option_strings[0])
    assert missing == []


def test_bench_offline_help_describes_it_and_lists_the_bundled_configs(capsys):
    with pytest.raises(SystemExit) as exit:
        main(["bench", "offline", "--help"])
    assert exit.value.code == 0
    text = " ".join(capsys.readouterr().out.split())
    assert "nano-vllm workload" in text
    assert "qwen3-0.6b" in text and "llama-3.1-8b" in text


def parse_serve(*argv: str) -> dict:
    args = build_parser().parse_args(["serve", *argv])
    return engine_settings(args.resolve(args))


def test_vllm_and_sglang_spellings_are_aliases():
    settings = parse_serve(
        "--max-num-seqs", "7", "--enable-prefix-caching", "--seed", "5",
        "--context-length", "100", "--enforce-eager", "--chunked-prefill-size", "64",
        "--mem-fraction-static", "0.5", "--tensor-parallel-size", "1",
    )  # fmt: skip
    assert settings["max_running_requests"] == 7
    assert settings["kv_cache"] == "radix"
    assert settings["seed"] == 5
    assert settings["max_model_len"] == 100
    assert settings["disable_cuda_graph"] is True
    assert settings["max_num_batched_tokens"] == 64
    assert settings["gpu_memory_utilization"] == 0.5
    assert "kv_cache" not in parse_serve()  # the slot's default unless asked


@pytest.mark.parametrize("flag", sorted(FLAG_HINTS))
def test_flags_pegboard_lacks_fail_with_a_hint(flag, capsys):
    with pytest.raises(SystemExit) as exit:
        main(["serve", flag, "x"])
    assert exit.value.code == 2
    err = capsys.readouterr().err
    assert f"{flag} is not a pegboard flag: {FLAG_HINTS[flag]}" in err


def test_chat_template_file_replaces_the_tokenizers(tiny_llama_dir, tmp_path, capsys):
    from pegboard.core.llm import LLM
    from pegboard.sdk.types import SamplingParams

    template = tmp_path / "template.jinja"
    template.write_text("<<{{ messages[0]['content'] }}>>")
    with LLM(str(tiny_llama_dir), dtype="float32", device="cpu") as llm:
        ids = llm.tokenizer.encode("<<the river>>", add_special_tokens=False)
        expected = llm.generate([ids], SamplingParams(max_tokens=6, temperature=0))[0].text
    argv = ["generate", "the river", "--chat", "--chat-template", str(template), "--model",
            str(tiny_llama_dir), "--dtype", "float32", "--device", "cpu", "--max-tokens", "6"]  # fmt: skip
    assert main(argv) == 0
    assert capsys.readouterr().out == expected + "\n"


def test_missing_chat_template_file_is_exit_2(tmp_path, capsys):
    assert main(["serve", "--chat-template", str(tmp_path / "nope.jinja")]) == 2
    assert "nope.jinja" in capsys.readouterr().err


# ---------------------------------------------------------------- start-up errors

STARTUP_ERRORS = [
    (["--scheduler", "nosuch"], "nosuch"),
    (["--scheduler", "sjf", "--sjf-max-wait-steps", "-1"], "invalid options for scheduler"),
    (["--model", "/nonexistent/model-dir"], "/nonexistent/model-dir does not exist"),
    (["--patch", "no-such-patch"], "no-such-patch"),
]


@pytest.mark.parametrize("command", ["serve", "generate"])
@pytest.mark.parametrize("flags, message", STARTUP_ERRORS)
def test_startup_mistakes_are_one_line_and_exit_2_before_loading(
    command, flags, message, capsys, monkeypatch
):
    from pegboard.core.models import loader

    def no_loading(*a, **kw):
        raise AssertionError("the model started loading")

    monkeypatch.setattr(loader, "load_model", no_loading, raising=False)
    argv = [command, *(["a prompt"] if command == "generate" else []), *flags]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert message in err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err


def test_busy_port_is_exit_2_before_the_model_loads(tiny_llama_dir, capsys, monkeypatch):
    from pegboard.core.server import lifecycle

    def no_loading(self):
        raise AssertionError("the model started loading")

    monkeypatch.setattr(lifecycle.ServerState, "start_loading", no_loading)
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        rc = main(["serve", "--model", str(tiny_llama_dir), "--port", str(port)])
    assert rc == 2
    err = capsys.readouterr().err
    assert f"cannot listen on 127.0.0.1:{port}" in err and "Traceback" not in err
