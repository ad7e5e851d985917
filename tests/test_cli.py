"""The command line: every command answers --help, and the demo runs."""

from __future__ import annotations

import pytest

from power_retention.cli import COMMANDS, main


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_every_command_has_help(command, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([command, "--help"])
    assert exit_info.value.code == 0
    assert "usage: power-retention" in capsys.readouterr().out


def test_demo_prints_agreement_and_state_table(capsys):
    assert main(["demo", "--seq-len", "40"]) == 0
    out = capsys.readouterr().out
    assert "recurrent (token loop)" in out and "540,800" in out   # d=64, p=2 bytes per head
