"""Where the shared pieces live (issue 18, item 3): one I/O module, one module of user errors with one base
class that `cft` catches in one place, attention helpers in the relevance infrastructure, no library module
importing a CLI module, no import cycle, and one meaning per folder name (`perf/` for the timing scripts).

The structural checks read the sources (imports at any level, function-level ones included), so they cost no
import of torch."""

from __future__ import annotations

import ast
import importlib
import re
import subprocess
import sys
import types
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PACKAGE = REPO / "cft_lightning"


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {_module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def _imports(path: Path) -> list[tuple[str, str]]:
    """(module, name) of every `from module import name` in a file, at any level (`import m` gives (m, ''))."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    here = _module_name(path) if path.is_relative_to(PACKAGE) else ""
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative import
                anchor = here.split(".") if path.name == "__init__.py" else here.split(".")[:-1]
                base = ".".join(anchor[: len(anchor) - node.level + 1] + ([base] if base else []))
            found += [(base, alias.name) for alias in node.names]
        elif isinstance(node, ast.Import):
            found += [(alias.name, "") for alias in node.names]
    return found


def _package_graph() -> dict[str, set[str]]:
    """Module -> the package modules it imports (a `from pkg import sub` counts as importing `pkg.sub`)."""
    graph: dict[str, set[str]] = {}
    for name, path in MODULES.items():
        targets = set()
        for module, imported in _imports(path):
            target = f"{module}.{imported}" if f"{module}.{imported}" in MODULES else module
            if target in MODULES and target != name:
                targets.add(target)
        graph[name] = targets
    return graph


def _python_files() -> list[Path]:
    return [*PACKAGE.rglob("*.py"), *(REPO / "tests").glob("*.py"), *(REPO / "perf").glob("*.py")]


# ------------------------------------------------------------------ file helpers: cft_lightning/_io.py
def test_file_helpers_are_imported_from_the_io_module_only():
    from cft_lightning import _io
    from cft_lightning.data import mask_store

    assert mask_store.atomic_write is _io.atomic_write and mask_store.file_sha256 is _io.file_sha256
    wrong = [f"{path.relative_to(REPO)}: from {module}" for path in _python_files()
             for module, name in _imports(path)
             if name in ("atomic_write", "file_sha256") and module != "cft_lightning._io"]
    assert not wrong, wrong


# ------------------------------------------------------------------ user errors: cft_lightning/errors.py
def test_user_errors_share_one_base_keep_their_builtin_bases_and_their_old_import_paths():
    from cft_lightning import errors
    from cft_lightning.concepts import llm
    from cft_lightning.data import errors as data_errors
    from cft_lightning.models import backbone, fine_tuner
    from cft_lightning.relevance import _vit

    builtin = {errors.DataError: ValueError, errors.CommandFailed: RuntimeError, errors.BackboneError: ValueError,
               errors.UnsupportedModelError: TypeError, errors.NonFiniteLossError: FloatingPointError,
               errors.ChatUnavailable: errors.ChatError}
    for cls, base in builtin.items():
        assert issubclass(cls, errors.CFTUserError) and issubclass(cls, base), cls
    assert issubclass(errors.ChatError, RuntimeError) and issubclass(llm.ChatRefusal, errors.ChatError)
    old_homes = {data_errors: ("DataError", "CommandFailed"), backbone: ("BackboneError",),
                 _vit: ("UnsupportedModelError",), fine_tuner: ("NonFiniteLossError",),
                 llm: ("ChatError", "ChatUnavailable")}
    for module, names in old_homes.items():
        for name in names:
            assert getattr(module, name) is getattr(errors, name), (module.__name__, name)
    # the package itself raises and catches them under their new home
    old = {"cft_lightning.data.errors", "cft_lightning.relevance._vit", "cft_lightning.models.backbone",
           "cft_lightning.models.fine_tuner", "cft_lightning.concepts.llm"}
    names = set(errors.__all__)
    wrong = [f"{_module_name(p)}: {name} from {module}" for p in PACKAGE.rglob("*.py")
             for module, name in _imports(p) if name in names and module in old]
    assert not wrong, wrong


def test_the_errors_module_imports_nothing_heavy():
    code = ("import sys, cft_lightning.errors\n"
            "print(sorted(m for m in ('torch', 'lightning', 'timm', 'numpy', 'PIL') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True)
    assert out.stdout.strip() == "[]", out.stdout + out.stderr


@pytest.mark.parametrize("command", ["sweep", "fit"])
def test_cft_prints_any_user_error_in_one_line_and_a_bug_as_a_traceback(
        command: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture):
    """Every subclass of `CFTUserError` is one `cft: error:` line (exit 2) in a tool and in a Trainer command,
    without `cli.py` naming it; a `RuntimeError` (a bug) still gives its traceback."""
    from cft_lightning import cli
    from cft_lightning.errors import CFTUserError

    class MaskBudgetExceeded(CFTUserError):
        """A user error that no command names."""

    raised: list[BaseException] = []

    def fail(argv: list[str]) -> None:
        raise raised[0]

    fake = types.SimpleNamespace(main=fail, run=fail)
    monkeypatch.setitem(sys.modules, "fake_tool_for_layout_test", fake)
    monkeypatch.setitem(cli.TOOLS, "sweep", "fake_tool_for_layout_test")
    monkeypatch.setitem(sys.modules, "cft_lightning._lightning_cli", fake)
    monkeypatch.delenv("CFT_DEBUG", raising=False)
    raised.append(MaskBudgetExceeded("the mask budget of data/masks is spent"))
    with pytest.raises(SystemExit) as exc:
        cli.main([command, "--anything"])
    err = capsys.readouterr().err
    assert exc.value.code == 2 and err == "cft: error: the mask budget of data/masks is spent\n"
    raised[0] = RuntimeError("a bug")
    with pytest.raises(RuntimeError, match="a bug"):
        cli.main([command, "--anything"])


# ------------------------------------------------------------------ relevance infrastructure
RELEVANCE = "cft_lightning.relevance"
RELEVANCE_INFRASTRUCTURE = {
    f"{RELEVANCE}.{name}" for name in ("_attention", "_fused_rules", "_layers", "_vit", "base", "rules")
}


def test_relevance_methods_share_helpers_only_through_the_infrastructure_modules():
    """A method file imports the infrastructure (`_attention`, `_fused_rules`, `_layers`, `_vit`, `base`, `rules`),
    never another method's file: what several methods need lives where its name says."""
    graph = _package_graph()
    methods = [m for m in MODULES if m.startswith(f"{RELEVANCE}.") and m not in RELEVANCE_INFRASTRUCTURE]
    wrong = {m: sorted(t for t in graph[m] if t.startswith(f"{RELEVANCE}.") and t not in RELEVANCE_INFRASTRUCTURE)
             for m in methods}
    assert not {m: t for m, t in wrong.items() if t}, wrong
    from cft_lightning import relevance
    from cft_lightning.relevance import _attention

    assert relevance.explicit_attention is _attention.explicit_attention


# ------------------------------------------------------------------ CLI modules and library code
def _is_cli_module(name: str) -> bool:
    return name.rsplit(".", 1)[-1] in ("cli", "_lightning_cli", "cli_ckpt", "__main__")


def test_library_code_imports_no_cli_module():
    """A CLI module (`cli.py`, `_lightning_cli.py`, `cli_ckpt.py`, `__main__.py`, `<stage>/cli.py`) parses flags
    and calls the library; the library never imports one (the demo needs `build_attributor`: it lives in
    `critique/attribution.py`)."""
    graph = _package_graph()
    wrong = {m: sorted(filter(_is_cli_module, targets)) for m, targets in graph.items() if not _is_cli_module(m)}
    assert not {m: t for m, t in wrong.items() if t}, wrong
    from cft_lightning.critique import attribution, cli

    assert cli.build_attributor is attribution.build_attributor  # the old import path still works


def test_every_tool_parses_through_one_module_and_no_module_builds_an_argparse_parser():
    """One CLI style (item 5): every `cft` tool (and `python -m cft_lightning.smoke_data`) exposes a `TOOL` built by
    `_tool_cli` (jsonargparse, `--config`/`--print_config`, help from its signature); no package module imports
    argparse to build a parser of its own."""
    from cft_lightning import cli, smoke_data
    from cft_lightning._tool_cli import Subcommands, Tool

    wrong = [f"{name}: imports argparse" for name, path in MODULES.items()
             if any(module == "argparse" for module, _ in _imports(path))]
    assert not wrong, wrong
    for module_name in [*cli.TOOLS.values(), "cft_lightning.concepts.validate"]:
        module = importlib.import_module(module_name)
        assert isinstance(getattr(module, "TOOL", None), (Tool, Subcommands)), module_name
    assert isinstance(smoke_data.TOOL, Tool)


# ------------------------------------------------------------------ private names and cycles
def test_no_module_imports_a_private_name_of_another():
    """A name starting with `_` is private to its module; another module that needs it gets a public helper."""
    wrong = [f"{name}: {imported} from {module}" for name, path in MODULES.items()
             for module, imported in _imports(path)
             if imported.startswith("_") and not imported.startswith("__") and module in MODULES and module != name]
    assert not wrong, wrong


def test_package_imports_have_no_cycle():
    """No two modules import each other, directly or around a loop, counting imports inside functions too: a
    lazy import still ties the two files together, and it turns into a circular-import error the day it moves
    to the top of its file."""
    graph = _package_graph()
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    cycles: list[list[str]] = []

    def visit(node: str) -> None:  # Tarjan's strongly connected components
        index[node] = low[node] = len(index)
        stack.append(node)
        for nxt in graph[node]:
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    for node in graph:
        if node not in index:
            visit(node)
    assert not cycles, cycles


# ------------------------------------------------------------------ one meaning per folder name
def test_timing_scripts_live_in_perf_and_nothing_points_at_the_old_folder():
    """`perf/` holds the timing scripts; `benchmarks` means the robustness datasets (`cft_lightning/benchmarks/`,
    `cft test --benchmarks`, docs/benchmarks.md) only."""
    assert (REPO / "perf" / "step_cost.py").is_file() and not (REPO / "benchmarks").exists()
    old = re.compile(r"(?<![\w/.])benchmarks/|cd benchmarks\b")
    named = re.compile(r"\bperf/(\w+\.py)")
    files = [REPO / "README.md", REPO / "Makefile", *sorted((REPO / "docs").glob("*.md")),
             *sorted((REPO / "perf").glob("*.py"))]
    for path in files:
        text = path.read_text(encoding="utf-8")
        assert not old.search(text), f"{path.relative_to(REPO)}: {old.search(text).group(0)!r}"
        missing = [name for name in named.findall(text) if not (REPO / "perf" / name).is_file()]
        assert not missing, f"{path.relative_to(REPO)} names perf/{missing}"
    assert "ruff check cft_lightning tests perf" in (REPO / "Makefile").read_text(encoding="utf-8")
