"""gatewayctl's lean start-up (issue 20) keeps its behaviour.

- The parser built for one command (the others left unbuilt) answers every command's --help,
  every usage error and every parse exactly as the parser with every command built (parsing
  only: no command runs here).
- The command word is found past the top-level options and their values, abbreviations too.
- A `status` run loads none of the daemon's heavy modules.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import subprocess
import sys
from typing import Any

import pytest

from gateway.cli import base
from gateway.cli import lifecycle as cli_lifecycle
from gateway.cli import main as cli


def leaves(parser: argparse.ArgumentParser, path: tuple[str, ...] = ()) -> list[tuple[str, ...]]:
    found = [path]
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                found += leaves(sub, (*path, name))
    return found


def outcome(argv: list[str], lazy: bool) -> tuple[Any, ...]:
    """What parsing argv gives: (the namespace, or the SystemExit code, stdout, stderr)."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            ns: Any = vars(cli.parse(argv) if lazy else cli.build_parser().parse_args(
                cli_lifecycle.legacy_job_argv(argv)))
        except SystemExit as exc:
            ns = exc.code
    return ns, out.getvalue(), err.getvalue()


@pytest.mark.timeout(60)
def test_one_command_parser_answers_as_the_full_one(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("COLUMNS", "100")
    paths = leaves(cli.build_parser())
    cases = [[*p, "-h"] for p in paths] + [list(p) for p in paths] + [
        ["mount", "v"], ["mount", "v", "--mode", "fuse", "--json"], ["mount", "v", "--mode", "x"],
        ["status", "--json"], ["status", "extra"], ["volume", "show", "v"], ["job", "7"],
        ["bogus"], ["-5"], ["--", "status"], ["volume", "create", "x", "--overlay", "--copy"],
        ["domain", "start", "d", "--volume", "v"], ["install-systemd", "--unit-dir"]]
    for argv in cases:
        for top in ([], ["--sock=/s", "--wait", "0"]):
            assert outcome([*top, *argv], True) == outcome([*top, *argv], False), argv


@pytest.mark.timeout(10)
def test_command_word_skips_top_level_options() -> None:
    valued = cli.VALUED_OPTIONS
    assert base.command_word(["--socket", "/s", "mount", "v"], valued) == "mount"
    assert base.command_word(["--sock", "/s", "--wait=0", "status"], valued) == "status"
    assert base.command_word(["-h", "volume", "ls"], valued) == "volume"
    assert base.command_word(["--", "status"], valued) == "status"
    assert base.command_word(["--timeout", "3"], valued) is None


@pytest.mark.timeout(30)
def test_status_loads_no_daemon_modules() -> None:
    probe = ("import sys\n"
             "from gateway.cli.main import main\n"
             "main(['--socket', '/nonexistent/admin.sock', '--wait', '0', 'status'])\n"
             "heavy = {'trio', 'pyfuse3', 'libvirt', 'nbd', 'sqlite3', 'gateway.config',\n"
             "         'gateway.daemon', 'gateway.cli.demo'} & set(sys.modules)\n"
             "print(sorted(heavy))\n")
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                          timeout=20, check=False)
    assert done.stdout.strip() == "[]", done.stdout + done.stderr
    assert "gatewayd is not running" in done.stderr
