"""Every command is discoverable and its help is quick and complete: `cft --help` lists them all, the tools'
help comes back without importing Lightning, and every flag says what it does and its default."""

from __future__ import annotations

import argparse
import importlib
import subprocess
import sys

import pytest

from cft_lightning.cli import COMMANDS, TOOLS, main, usage


def tool_parsers() -> dict[str, argparse.ArgumentParser]:
    """Every parser of a `cft` tool, subcommands included: each tool module's `TOOL` (`_tool_cli`, jsonargparse)."""
    modules = {**TOOLS, "concepts validate": "cft_lightning.concepts.validate"}
    parsers = {}
    for name, module_name in modules.items():
        module = importlib.import_module(module_name)
        parser = module.TOOL.parser()
        subcommands = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
        for action in subcommands:
            parsers.update({f"{name} {sub}": subparser for sub, subparser in action.choices.items()})
        if not subcommands:
            parsers[name] = parser
    return parsers


def test_every_tool_is_listed():
    assert {"demo", "explain", "concepts", "concepts validate", "critique", "sweep", "masks import",
            "masks generate"} <= set(tool_parsers())


def test_cft_help_lists_every_command(capsys: pytest.CaptureFixture):
    with pytest.raises(SystemExit) as exc:
        main(["--help"])
    out = capsys.readouterr().out
    assert exc.value.code == 0
    for name in [*TOOLS, "fit", "validate", "test", "predict"]:
        assert f"\n  {name} " in out, name
    assert set(TOOLS) <= set(COMMANDS) and "cft concepts validate" in usage()


def test_unknown_command_is_one_line_with_a_suggestion(capsys: pytest.CaptureFixture):
    with pytest.raises(SystemExit) as exc:
        main(["dmeo"])
    err = capsys.readouterr().err
    assert exc.value.code == 2 and "did you mean 'demo'" in err and len(err.strip().splitlines()) == 1


@pytest.mark.parametrize("name", sorted(tool_parsers()))
def test_every_flag_has_help_with_its_default(name: str):
    parser = tool_parsers()[name]
    for action in parser._actions:
        if isinstance(action, (argparse._HelpAction, argparse._SubParsersAction)) or not action.option_strings:
            continue
        flag = action.option_strings[-1]
        assert action.help and len(action.help) > 10, f"cft {name} {flag}: no help"
        shown = parser._get_formatter()._expand_help(action)  # the text `--help` prints for the flag
        shows_default = action.default in (None, False, argparse.SUPPRESS) or action.required
        assert shows_default or "default" in shown, f"cft {name} {flag}: help does not give the default"


def test_concepts_help_mentions_validate(capsys: pytest.CaptureFixture):
    with pytest.raises(SystemExit):
        main(["concepts", "--help"])
    assert "cft concepts validate" in capsys.readouterr().out


@pytest.mark.parametrize("command", [["--help"], *[[tool, "--help"] for tool in TOOLS], ["masks", "generate", "-h"]])
def test_help_does_not_import_lightning(command: list[str]):
    """Help is quick because nothing heavy is imported (not even torch, which a module's type-only imports could
    pull in through jsonargparse): measured times are in docs/performance.md."""
    code = ("import sys\nfrom cft_lightning.cli import main\ntry:\n    main(sys.argv[1:])\nexcept SystemExit:\n"
            "    pass\nprint('IMPORTED', sorted(m for m in ('lightning', 'timm', 'torchvision', 'torch') "
            "if m in sys.modules))")
    proc = subprocess.run([sys.executable, "-c", code, *command], capture_output=True, text=True, timeout=120)
    assert "usage:" in proc.stdout, proc.stderr
    assert proc.stdout.strip().splitlines()[-1] == "IMPORTED []", (command, proc.stdout[-300:])


def test_trainer_help_is_cached_and_its_titles_are_whole_sentences(capsys: pytest.CaptureFixture, tmp_path,
                                                                  monkeypatch: pytest.MonkeyPatch):
    """`cft test --help` is generated once into $CFT_CACHE/help and read from there after; its own options are
    titled by us (Lightning's title is the Trainer.test docstring cut at a colon, mid-sentence)."""
    monkeypatch.setenv("CFT_CACHE", str(tmp_path))
    outputs = []
    for _ in range(2):
        with pytest.raises(SystemExit) as exc:
            main(["test", "--help"])
        assert exc.value.code == 0
        outputs.append(capsys.readouterr().out)
    assert outputs[0] == outputs[1] and len(list((tmp_path / "help").glob("test-*.txt"))) == 1
    titles = [line for line in outputs[0].splitlines() if line and not line.startswith(" ") and line.endswith(":")]
    assert "test: the test splits and benchmarks of a checkpoint, its Original beside it (Trainer.test):" in titles
    assert not any("never run on your" in line for line in titles)
