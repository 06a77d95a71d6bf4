"""The `lorsbench` console script: every command resolves to its module's main, runs end to end as the CLI."""
from __future__ import annotations

import importlib
import subprocess
import sys

import pytest

from lorsbench.cli import COMMANDS, main


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_every_command_names_a_callable(command):
    module, _, function = COMMANDS[command][0].partition(":")
    assert callable(getattr(importlib.import_module(module), function))


def test_help_lists_the_commands_and_unknown_commands_are_refused(capsys):
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    assert all(name in out for name in COMMANDS)
    assert main(["reprot"]) == 2
    assert "Did you mean 'report'?" in capsys.readouterr().err


def test_run_is_python_m_lorsbench_from_any_folder(tmp_path):
    """`lorsbench run` composes conf/ like `python -m lorsbench`, also outside the repository."""
    cmd = [sys.executable, "-c", "import sys; from lorsbench.cli import main; sys.exit(main())",
           "run", "model=tiny-llama", "trainer.max_steps=3", "--cfg", "job"]
    out = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "name: tiny-llama" in out.stdout and "max_steps: 3" in out.stdout


def test_a_command_gets_its_arguments(tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        main(["lr-choice", "--help"])
    assert exc.value.code == 0
    assert "usage:" in capsys.readouterr().out
