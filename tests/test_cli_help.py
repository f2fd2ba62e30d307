"""Every command's --help: a description with examples, and a line of help for every flag."""

import argparse
import importlib
from importlib.metadata import entry_points

import pytest

# The installed commands: the package's console scripts.
SCRIPTS = {e.name: e.value for e in entry_points(group="console_scripts") if e.value.startswith("aim_ext.")}


def _parser(command: str) -> argparse.ArgumentParser:
    module = importlib.import_module(SCRIPTS[command].split(":")[0])
    return module.build_parser()


def test_every_command_is_installed():
    assert sorted(SCRIPTS) == [
        "aim-app",
        "aim-bench",
        "aim-demo",
        "aim-eval",
        "aim-explain",
        "aim-export",
        "aim-train",
    ]


@pytest.mark.parametrize("command", sorted(SCRIPTS))
def test_help_shows_examples_and_explains_every_flag(command, capsys):
    parser = _parser(command)
    assert parser.prog == command
    examples = [line for line in (parser.description or "").splitlines() if line.startswith(f"    {command}")]
    assert examples, f"{command} --help shows no example"
    for example in examples:  # each example parses (the line's own flags, comments cut off)
        words = example.split("#")[0].replace("\\", "").split()[1:]
        if words and not example.rstrip().endswith("\\"):
            parser.parse_args(words)
    unexplained = [
        action.option_strings[0] if action.option_strings else action.dest
        for action in parser._actions
        if not isinstance(action, argparse._HelpAction) and not action.help
    ]
    assert not unexplained, f"{command}: flags without help: {unexplained}"
    with pytest.raises(SystemExit) as exit_:
        parser.parse_args(["--help"])
    assert exit_.value.code == 0 and f"usage: {command}" in capsys.readouterr().out


def test_choices_are_listed():
    from aim_ext.data import list_datasets

    for command in ("aim-train", "aim-eval"):
        dataset = next(a for a in _parser(command)._actions if "--dataset" in a.option_strings)
        assert list(dataset.choices) == list_datasets(), command
