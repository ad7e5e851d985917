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


def test_demo_runs_at_tiny_size(tmp_path, capsys):
    assert main(["demo", "--preset", "tiny", "--out", str(tmp_path), "--source-steps", "2",
                 "--finetune-steps", "1", "--recipes", "next-token", "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "# Metamorphosis demo" in out and (tmp_path / "report.md").is_file()
