"""`pegboard serve --switch-interval S`: the interpreter's thread switch interval of the server
process (how long the step loop may wait for the GIL while the HTTP thread holds it)."""

from __future__ import annotations

import argparse
import socket
import sys

import pytest
from pegboard.core.cli.main import build_parser
from pegboard.core.server.lifecycle import ServerSettings, ServerState
from pegboard.core.server.runner import run_server


def parse(*argv: str) -> argparse.Namespace:
    args = build_parser().parse_args(["serve", *argv])
    return args.resolve(args)


def test_the_flag_is_seconds_and_must_be_positive(capsys):
    assert parse().switch_interval is None
    assert parse("--switch-interval", "0.0005").switch_interval == 0.0005
    for bad in ("0", "-1", "soon"):
        with pytest.raises(SystemExit):
            parse("--switch-interval", bad)
        assert "--switch-interval" in capsys.readouterr().err


def test_the_server_process_runs_with_it():
    def no_engine():
        raise RuntimeError("no model here")  # the server stops at once, status 1

    before = sys.getswitchinterval()
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    state = ServerState(ServerSettings(switch_interval=0.0005), engine_factory=no_engine)
    try:
        assert run_server(state, "127.0.0.1", sock.getsockname()[1], "warning", sock) == 1
        assert sys.getswitchinterval() == pytest.approx(0.0005)
    finally:
        sys.setswitchinterval(before)
        sock.close()
