"""The `cft` tools' command lines, generated from typed, documented signatures (jsonargparse).

A tool is a function (or a dataclass) whose parameters are its options: the type hints type them, the
``Args:`` section of the docstring (Google style) gives each its help, and the help shows the type and the
default. Every tool takes ``--config FILE`` (YAML with any of its options; flags after it override it, and
several ``--config`` are merged in order) and ``--print_config`` (the resolved options as YAML, which
``--config`` reads back), the way LightningCLI does for `cft fit`/`cft test` and litgpt for its commands.

    def export(out: str, size: int = 32, overwrite: bool = False) -> None:
        '''Export the thing.

        Args:
            out: folder to write
            size: image side in pixels
            overwrite: replace files that exist
        '''

    TOOL = Tool(export, prog="cft export")
    def main(argv: list[str] | None = None) -> None:
        TOOL(argv)                         # parse argv, call export(**options)

    TOOL = Subcommands("cft masks", "Build the mask store.", {"import": Tool(...), "generate": Tool(...)})

A tool module exposes ``TOOL`` and ``main(argv)`` (what `cft_lightning/cli.py` calls); `tests/test_help.py`
checks every flag's help and default through ``TOOL.parser()``.

Flags keep argparse's habits, so commands written for the argparse versions keep working:

- a ``bool`` parameter is a flag: ``--overwrite`` alone means true, ``--overwrite false`` (or ``=false``) false;
- a ``list[X]`` parameter (X a scalar: str, int, float) takes its values space-separated, ``--seeds 0 1 2``;
- a ``Literal[...]`` parameter lists its choices; a parameter without a default is a required flag (with
  ``positional=True``: a positional argument, as `cft sweep FILE`; `Tool.split` puts positionals before the
  flags, so ``--dry_run FILE`` does not read FILE as the flag's value);
- ``flatten=("grounding",)``: the fields of the dataclass parameter ``grounding`` are top-level flags
  (``--detector``, not ``--grounding.detector``) and the tool receives the dataclass built from them: options
  shared by several tools are declared once (`masks/grounding_options.py`). A field of a flattened dataclass
  may be flattened in turn, and its list fields take space-separated values too: `cft demo` is
  ``Tool(demo_command, flatten=("settings", "benchmark"))``, every field of `DemoSettings` and of its
  `ShortcutPartsSpec` a top-level flag; ``skip`` leaves parameters or fields out (they keep their defaults).

Validation that a type cannot say (one of two options, a fraction in [0, 1], a name in a registry) stays in
the function and raises a `CFTUserError` (`cft_lightning/errors.py`), which `cft` prints as one line. This
module imports only jsonargparse (no torch, no Lightning), so every tool's ``--help`` is quick; a tool function's
string annotations are resolved here, from its module's globals, because jsonargparse would otherwise run the
module's ``if TYPE_CHECKING:`` imports (torch, for type-only names) to resolve them.
"""

from __future__ import annotations

import dataclasses
import inspect
import typing
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from jsonargparse import ActionConfigFile, ArgumentParser, Namespace

__all__ = ["CONFIG_HELP", "Subcommands", "Tool"]

CONFIG_HELP = ("YAML file with any of the options below (flags after it override it; `--print_config` writes "
               "one)")
_SCALARS = (str, int, float)


def _docs(target: Callable[..., Any]) -> dict[str, str]:
    """{parameter: help} from the target's docstring ``Args:`` section (empty without docstring_parser)."""
    try:
        import docstring_parser
    except ImportError:  # jsonargparse[signatures] brings it; without it, help lacks the descriptions only
        return {}
    return {p.arg_name: p.description or "" for p in docstring_parser.parse(inspect.getdoc(target) or "").params}


def _summary(target: Callable[..., Any]) -> str:
    """The docstring's first paragraph: the parser's description when none is given."""
    return (inspect.getdoc(target) or "").split("\n\n")[0].replace("\n", " ").strip()


def _signature(target: Callable[..., Any]) -> list[tuple[inspect.Parameter, Any]]:
    """(parameter, resolved type hint) of a function's or a class's parameters (postponed annotations too); a
    dataclass field's ``default_factory`` is called, so every parameter's ``default`` is its value."""
    hints = typing.get_type_hints(target.__init__ if inspect.isclass(target) else target)
    factories = ({f.name: f.default_factory for f in dataclasses.fields(target)
                  if f.default_factory is not dataclasses.MISSING} if dataclasses.is_dataclass(target) else {})
    out = []
    for p in inspect.signature(target).parameters.values():
        if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD):
            out.append((p.replace(default=factories[p.name]()) if p.name in factories else p, hints.get(p.name, Any)))
    return out


def _list_item(hint: Any) -> type | None:
    """X for ``list[X]`` with X a scalar type (these take space-separated values), else None."""
    if typing.get_origin(hint) is list:
        args = typing.get_args(hint)
        if len(args) == 1 and args[0] in _SCALARS:
            return args[0]
    return None


@dataclass(frozen=True)
class _Flat:
    """A flattened dataclass parameter: its class and the instance its flags default to (None: the class's own
    defaults)."""

    cls: type
    default: Any


@dataclass(frozen=True)
class Tool:
    """One `cft` tool: a typed, documented function or dataclass, and how its command line looks.

    Args:
        target: what runs; called with the parsed options as keyword arguments (a dataclass: built from them)
        prog: the command as the user types it, e.g. ``"cft concepts validate"``
        description: the help's first lines (default: the target docstring's first paragraph)
        epilog: the help's last lines (what to run next, ...)
        positional: required parameters are positional arguments instead of required flags
        flatten: dataclass parameters whose fields are top-level flags (see the module docstring); a field of a
            flattened dataclass can be flattened too (`cft demo`: ``("settings", "benchmark")``)
        skip: parameters, or fields of flattened dataclasses, left out of the command line (they keep their
            defaults)
    """

    target: Callable[..., Any]
    prog: str
    description: str | None = None
    epilog: str | None = None
    positional: bool = False
    flatten: tuple[str, ...] = ()
    skip: tuple[str, ...] = ()
    _flat: dict[str, _Flat] = field(default_factory=dict, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if inspect.isfunction(self.target):
            # the hints resolved from the module's globals: with string annotations (PEP 563) jsonargparse would
            # run the module's `if TYPE_CHECKING:` imports to resolve them (torch for `cft explain --help`)
            self.target.__annotations__.update(typing.get_type_hints(self.target))

        def walk(params: list[tuple[inspect.Parameter, Any]]) -> None:
            for param, hint in params:
                if param.name == "config":
                    raise TypeError(f"{self.prog}: a tool parameter cannot be named 'config' (it is --config)")
                if param.name in self.flatten and param.name not in self.skip:
                    if not dataclasses.is_dataclass(hint):
                        raise TypeError(f"{self.prog}: flatten={param.name!r} is not a dataclass parameter")
                    default = param.default if isinstance(param.default, hint) else None
                    self._flat[param.name] = _Flat(hint, default)  # type: ignore[arg-type]
                    walk(self._fields(param.name))

        walk(_signature(self.target))
        missing = set(self.flatten) - set(self._flat) - set(self.skip)
        if missing:
            raise TypeError(f"{self.prog}: flatten={sorted(missing)} names no dataclass parameter of the target")
        names = [param.name for _, param, _ in self._options()]
        clashes = sorted({name for name in names if names.count(name) > 1})
        if clashes:
            raise TypeError(f"{self.prog}: flattening gives two options named {clashes}")

    def _fields(self, name: str) -> list[tuple[inspect.Parameter, Any]]:
        """(field, type hint) of the flattened parameter ``name``, each with the default its flag shows: the
        field's value in the default instance, else the class's default."""
        flat = self._flat[name]
        fields = _signature(flat.cls)
        if flat.default is None:
            return fields
        return [(p.replace(default=getattr(flat.default, p.name)), hint) for p, hint in fields]

    def _options(self) -> list[tuple[str | None, inspect.Parameter, Any]]:
        """(owner, parameter, type hint) of every option in help order: the target's parameters (owner None),
        a flattened parameter's fields in its place (owner: its name); skipped ones left out."""
        out: list[tuple[str | None, inspect.Parameter, Any]] = []

        def walk(owner: str | None, params: list[tuple[inspect.Parameter, Any]]) -> None:
            for param, hint in params:
                if param.name in self._flat:
                    walk(param.name, self._fields(param.name))
                elif param.name not in self.skip:
                    out.append((owner, param, hint))

        walk(None, _signature(self.target))
        return out

    def parser(self, prog: str | None = None) -> ArgumentParser:
        """The tool's parser: ``--config``, ``--print_config`` and one argument per parameter."""
        parser = ArgumentParser(prog=prog or self.prog, description=self.description or _summary(self.target),
                                epilog=self.epilog)
        self.add_to(parser)
        return parser

    def add_to(self, parser: ArgumentParser) -> None:
        """Add ``--config`` and the tool's arguments to ``parser`` (a subcommand's parser, ...)."""
        parser.add_argument("--config", action=ActionConfigFile, help=CONFIG_HELP)
        options = self._options()
        owners: dict[str | None, Any] = {None: self.target, **{n: f.cls for n, f in self._flat.items()}}
        docs = {owner: _docs(target) for owner, target in owners.items()}
        bools = {p.name for _, p, hint in options if hint is bool}
        segment: list[inspect.Parameter] = []
        segment_owner: list[str | None] = [None]

        def flush() -> None:  # the options collected so far, all of one owner, in order, through jsonargparse
            if not segment:
                return
            owner = segment_owner[0]
            target = owners[owner]
            skip = {p.name for p, _ in _signature(target)} - {p.name for p in segment}
            kwargs = dict(as_group=False, skip=skip, fail_untyped=True)
            if owner is not None:  # a flattened dataclass: its flags default to the default instance's values
                defaults = {p.name: p.default for p in segment if p.default is not inspect.Parameter.empty}
                parser.add_class_arguments(target, default=defaults or None, instantiate=False, **kwargs)
            elif inspect.isclass(target):
                parser.add_class_arguments(target, instantiate=False, as_positional=self.positional, **kwargs)
            else:
                parser.add_function_arguments(target, as_positional=self.positional, **kwargs)
            segment.clear()

        for owner, param, hint in options:
            if owner != segment_owner[0]:
                flush()
                segment_owner[0] = owner
            item = _list_item(hint)
            if item is not None:  # argparse's nargs="+", typed, and a list in the YAML
                flush()
                required = param.default is inspect.Parameter.empty
                parser.add_argument(f"--{param.name}", type=item, nargs="+", required=required,
                                    default=None if required else param.default,
                                    help=docs[owner].get(param.name) or param.name)
            else:
                segment.append(param)
        flush()
        for action in parser._actions:  # bool: `--flag` alone is true, as argparse's store_true
            if action.dest in bools and action.option_strings:
                action.nargs, action.const = "?", True

    def split(self, argv: list[str]) -> tuple[list[str], list[str]]:
        """(the arguments this tool knows, the others), for a tool that passes options on (`cft sweep` to its
        runs; jsonargparse has no ``parse_known_args``). Positionals come first in the known list, so a flag
        (``--dry_run``) before them does not take one as its value; everything after ``--`` is unknown."""
        parser = self.parser()
        takes: dict[str, Any] = {}  # option string -> its nargs
        slots = 0
        for action in parser._actions:
            takes.update(dict.fromkeys(action.option_strings, action.nargs))
            slots += not action.option_strings
        positionals: list[str] = []
        options: list[str] = []
        others: list[str] = []
        i = 0
        while i < len(argv):
            token = argv[i]
            i += 1
            if token == "--":
                others += argv[i:]
                break
            name = token.split("=", 1)[0]
            if name in takes:
                options.append(token)
                nargs = takes[name]
                if "=" in token or nargs == 0:
                    continue
                while i < len(argv) and not argv[i].startswith("-"):  # the option's value(s)
                    if nargs == "?" and argv[i].lower() not in ("true", "false", "yes", "no"):
                        break
                    options.append(argv[i])
                    i += 1
                    if nargs in (None, 1, "?"):
                        break
            elif not token.startswith("-") and len(positionals) < slots:
                positionals.append(token)
            else:
                others.append(token)
        return positionals + options, others

    def arguments(self, values: Namespace) -> dict[str, Any]:
        """The target's keyword arguments from a parsed namespace (flattened dataclasses rebuilt, innermost
        first; a skipped field keeps the default instance's value)."""
        kwargs = {k: v for k, v in values.as_dict().items() if k != "config" and not k.startswith("__")}
        for name, flat in reversed(self._flat.items()):  # discovery order reversed: fields before their owner
            given = {f.name: kwargs.pop(f.name) for f in dataclasses.fields(flat.cls) if f.name in kwargs}
            kwargs[name] = (dataclasses.replace(flat.default, **given) if flat.default is not None
                            else flat.cls(**given))
        return kwargs

    def parse(self, argv: list[str] | None = None) -> dict[str, Any]:
        """Parse ``argv`` (``--help`` and ``--print_config`` print and exit) into the target's keyword arguments."""
        parser = self.parser()
        return self.arguments(parser.instantiate(parser.parse_args(argv)))

    def __call__(self, argv: list[str] | None = None) -> Any:
        """Parse ``argv`` and run the target; returns what it returns."""
        return self.target(**self.parse(argv))


@dataclass(frozen=True)
class Subcommands:
    """A tool with subcommands (`cft masks import|generate`): each is a `Tool` with its own ``--config`` and
    ``--print_config`` (``cft masks import --print_config``).

    Args:
        prog: the command, e.g. ``"cft masks"``
        description: the help's first lines
        tools: {subcommand name: its tool}, in the order the help lists them
    """

    prog: str
    description: str
    tools: Mapping[str, Tool]

    def parser(self) -> ArgumentParser:
        """The parser with one subcommand per tool (an argparse ``_SubParsersAction`` among its actions)."""
        parser = ArgumentParser(prog=self.prog, description=self.description)
        subcommands = parser.add_subcommands(required=True, dest="subcommand")
        for name, tool in self.tools.items():
            subcommands.add_subcommand(name, tool.parser(), help=tool.description or _summary(tool.target))
        return parser

    def parse(self, argv: list[str] | None = None) -> tuple[str, dict[str, Any]]:
        """(subcommand, its tool's keyword arguments) from ``argv``."""
        parser = self.parser()
        values = parser.instantiate(parser.parse_args(argv))
        name = values["subcommand"]
        return name, self.tools[name].arguments(values[name])

    def __call__(self, argv: list[str] | None = None) -> Any:
        """Parse ``argv`` and run the chosen subcommand's target."""
        name, kwargs = self.parse(argv)
        return self.tools[name].target(**kwargs)
