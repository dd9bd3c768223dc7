"""The README's list of every subcommand's flags is the parsers' own: a flag added, renamed or
removed in argparse and not in the README (or the reverse) fails here."""

from __future__ import annotations

import argparse
import os
import re

from gally.cli import build_parser

README = os.path.join(os.path.dirname(__file__), "..", "README.md")


def commands(parser: argparse.ArgumentParser, prefix: str = "gally"):
    """(command line, its flags) for every subcommand, nested ones included."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                flags = {f for a in sub._actions if a.dest != "help" for f in a.option_strings}
                yield f"{prefix} {name}", flags
                yield from commands(sub, f"{prefix} {name}")


def readme_lists() -> dict[str, set[str]]:
    """{"gally run": {"-m", "--model", ...}} from the README's list: one item per command, each
    item's backticked `-x/--xyz` flags; an item may name two commands, separated by ';'."""
    text = open(README, encoding="utf-8").read()
    section = text.split("Every flag of every subcommand", 1)[1].split("\n\n", 2)[1]
    items = re.split(r"\n- ", "\n" + section.strip())[1:]
    found: dict[str, set[str]] = {}
    for item in items:
        for part in " ".join(item.split()).split("; "):
            head = re.match(r"`(gally [a-z]+(?: [a-z]+)?)", part)
            if head is None:
                continue
            spans = re.findall(r"`(-[^`]*)`", part)
            found[head.group(1)] = {f for span in spans for f in span.split("/")}
    return found


def test_readme_lists_every_flag_of_every_subcommand():
    listed = readme_lists()
    parsers = dict(commands(build_parser()))
    assert set(parsers) - {"gally cache ls"} <= set(listed), "a subcommand is missing from the README's list"
    for command, flags in parsers.items():
        if command in listed:
            assert listed[command] == flags, command


def test_version_flag_is_documented():
    assert "`gally --version`" in open(README, encoding="utf-8").read()
    assert "--version" in {f for a in build_parser()._actions for f in a.option_strings}


def test_errors_name_the_flag_as_typed_in_every_subcommand(tmp_path, capsys):
    from conftest import make_checkpoint
    from gally import cli

    folder = make_checkpoint(tmp_path / "m")[0]
    text = tmp_path / "t.txt"
    text.write_text("some text to score " * 8)
    cases = [(["perplexity", "-m", folder, "-f", str(text), "--ctx", "-1"], "error: --ctx must be"),
             (["perplexity", "-m", folder, "-f", str(text), "-t", "0"], "error: -t must be a positive integer"),
             (["perplexity", "-m", folder, "-f", str(text), "--threads=0"], "error: --threads must be"),
             (["explain", "-m", folder, "-t0", "hi"], "error: -t must be a positive integer"),
             (["run", "-m", folder, "--raw", "-c", "4096", "hi"], "is past the 256 positions"),
             (["run", "-m", folder, "--raw", "-c", "4096", "hi"], "pass --force-context to run there")]
    for argv, message in cases:
        assert cli.main(argv) == 1, argv
        err = capsys.readouterr().err
        assert message in err, (argv, err)
        assert "error: threads" not in err and "error: ctx" not in err and "force_context=" not in err


def test_a_value_the_user_did_not_type_keeps_its_name(tmp_path, capsys):
    import json

    from conftest import make_checkpoint
    from gally import cli

    folder = make_checkpoint(tmp_path / "m")[0]
    with open(f"{folder}/generation_config.json", "w") as f:
        json.dump({"temperature": -3}, f)
    assert cli.main(["run", "-m", folder, "--raw", "hi"]) == 1
    assert "generation_config.json: temperature must be >= 0, got -3" in capsys.readouterr().err
    assert cli.main(["run", "-m", folder, "--raw", "--temperature", "-2", "hi"]) == 1
    assert "error: --temperature must be >= 0, got -2" in capsys.readouterr().err
