"""One registry per plugin kind (relevance methods, regularizers), the way timm registers models and zennit
registers composites.

Every shipped class registers itself in its own file with a decorator, and presets are one call:

    @register_relevance("attnlrp")
    class AttnLRP(RelevanceMethod): ...

    register_relevance("cp_lrp", AttnLRP, attention_rule="cp")   # a preset: the class with fixed arguments

A *spec* is a registered name (`attnlrp`, `cft`) or a class path `pkg.module.Class`; the class path imports its
module on demand (so the registration decorators in it run too) and must name a subclass of the kind's base.
`create(spec, **kwargs)` builds one (the preset's arguments, then `kwargs`), `class_of(spec)` is the class behind
a spec (for its class flags, e.g. `RelevanceMethod.explains_layer`), `names()` lists what is registered.

A user's own plugins register by being imported: the modules listed in the environment variable `CFT_PLUGINS`
(comma-separated) and the Python entry points of group `cft_lightning.plugins` are imported once, at the first
lookup of any registry. A spec that resolves to nothing is an `UnknownPluginError` in one line naming the kind,
the spec, close matches and the registered names.

This module imports only the standard library (and `errors.py`): the tools' `--help` lists the shipped names
(`SHIPPED_RELEVANCE`, `SHIPPED_REGULARIZERS`) from here without importing torch. The shipped classes are
registered when their package is imported, which the first lookup does; a test checks both lists agree.
"""

from __future__ import annotations

import difflib
import importlib
import inspect
import os
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from importlib import metadata
from typing import Any, TypeVar

from cft_lightning.errors import PluginError, UnknownPluginError

__all__ = [
    "ENTRY_POINT_GROUP",
    "PLUGINS_ENV",
    "REGULARIZERS",
    "RELEVANCE",
    "SHIPPED_REGULARIZERS",
    "SHIPPED_RELEVANCE",
    "Entry",
    "Registry",
    "load_plugins",
    "register_regularizer",
    "register_relevance",
]

PLUGINS_ENV = "CFT_PLUGINS"
ENTRY_POINT_GROUP = "cft_lightning.plugins"

# what the package registers (checked against the registries by tests/test_registry.py); for `--help` texts
SHIPPED_RELEVANCE = ("attnlrp", "cp_lrp", "rollout", "gradcam", "iia", "input_grad", "ixg", "grad_x_act", "lrp")
SHIPPED_REGULARIZERS = ("plain", "object", "cft", "rrr", "gradmask", "rrda", "robust_vit", "lvlm_va")

_NAME = re.compile(r"[A-Za-z][A-Za-z0-9_]*")
T = TypeVar("T", bound=type)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text.splitlines()[0] if text else ''}".rstrip(": ")


def _path(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


@dataclass(frozen=True)
class Entry:
    """What a spec resolves to: the class and the preset arguments a registered name fixes."""

    name: str
    cls: type
    preset: dict[str, Any] = field(default_factory=dict)


_plugins_imported: set[str] = set()
_entry_points_loaded = False


def load_plugins() -> None:
    """Import the modules named by `CFT_PLUGINS` (comma-separated; each once) and, once per process, the entry
    points of group `cft_lightning.plugins`: their registration decorators run. A module that does not import
    is a `PluginError` naming it."""
    global _entry_points_loaded
    for name in (m.strip() for m in os.environ.get(PLUGINS_ENV, "").split(",")):
        if not name or name in _plugins_imported:
            continue
        _plugins_imported.add(name)  # before importing: a plugin that looks a name up does not recurse
        try:
            importlib.import_module(name)
        except Exception as exc:
            _plugins_imported.discard(name)
            raise PluginError(f"{PLUGINS_ENV}: cannot import module {name!r} ({_first_line(exc)}); is its folder "
                              "on PYTHONPATH?") from exc
    if _entry_points_loaded:
        return
    _entry_points_loaded = True
    for point in metadata.entry_points(group=ENTRY_POINT_GROUP):
        try:
            point.load()
        except Exception as exc:
            dist = f" of {point.dist.name}" if point.dist is not None else ""
            raise PluginError(f"entry point {point.name} = {point.value}{dist} (group {ENTRY_POINT_GROUP}): cannot "
                              f"import it ({_first_line(exc)})") from exc


class Registry:
    """Names -> plugin classes (with preset arguments) of one kind, e.g. relevance methods.

    Args:
        kind: what the plugins are, for messages ("relevance method").
        base: their base class, or its dotted path (imported at first use, so this module stays light).
        package: the package whose import registers the shipped classes (imported at the first lookup).
        shipped: the names the package registers, for `--help` texts that must not import it.
    """

    def __init__(self, kind: str, base: type | str, package: str | None = None, shipped: tuple[str, ...] = ()) -> None:
        self.kind = kind
        self._base = base
        self.package = package
        self.shipped = tuple(shipped)
        self._entries: dict[str, Entry] = {}
        self._package_loaded = False

    @property
    def base(self) -> type:
        """The base class every plugin of this kind subclasses."""
        if isinstance(self._base, str):
            module, _, name = self._base.rpartition(".")
            self._base = getattr(importlib.import_module(module), name)
        return self._base

    # ------------------------------------------------------------------ registration
    def register(self, name: str, cls: T | None = None, **preset: Any) -> Any:
        """Register `cls` (with `preset` arguments) under `name`. Without `cls`, a class decorator:
        `@register("attnlrp")`; with it, a call: `register("cp_lrp", AttnLRP, attention_rule="cp")`."""
        if cls is None:
            def decorate(klass: T) -> T:
                self._add(name, klass, preset)
                return klass

            return decorate
        self._add(name, cls, preset)
        return cls

    def _add(self, name: str, cls: type, preset: dict[str, Any]) -> None:
        if not isinstance(name, str) or not _NAME.fullmatch(name):
            raise PluginError(f"{self.kind} name {name!r}: a name is a letter then letters, digits or _ (no dots, "
                              "which mark class paths)")
        if not (inspect.isclass(cls) and issubclass(cls, self.base)):
            raise PluginError(f"{self.kind} {name!r}: {cls!r} is not a subclass of {_path(self.base)}")
        try:
            inspect.signature(cls.__init__).bind_partial(None, **preset)
        except TypeError as exc:
            raise PluginError(f"{self.kind} {name!r}: {_path(cls)} does not take the preset {preset}: {exc}") from exc
        old = self._entries.get(name)
        if old is not None and _path(old.cls) != _path(cls):  # the same class again (a reloaded module) replaces
            raise PluginError(f"{self.kind} name {name!r} is taken by {_path(old.cls)}; register {_path(cls)} "
                              "under another name")
        self._entries[name] = Entry(name, cls, dict(preset))

    # ------------------------------------------------------------------ lookup
    def _load(self) -> None:
        if not self._package_loaded and self.package:
            self._package_loaded = True
            importlib.import_module(self.package)
        load_plugins()

    def names(self) -> list[str]:
        """Every registered name (shipped and plugins'), sorted."""
        self._load()
        return sorted(self._entries)

    def entries(self) -> dict[str, Entry]:
        """Every registered name with its class and preset."""
        self._load()
        return dict(self._entries)

    def resolve(self, spec: str) -> Entry:
        """The class and preset behind a registered name or a class path `pkg.module.Class`."""
        self._load()
        if isinstance(spec, str) and spec in self._entries:
            return self._entries[spec]
        if isinstance(spec, str) and "." in spec:
            return Entry(spec, self._import_class(spec))
        close = difflib.get_close_matches(str(spec), list(self._entries), n=3)
        hint = f" (did you mean {' or '.join(map(repr, close))}?)" if close else ""
        raise UnknownPluginError(f"unknown {self.kind} {spec!r}{hint}; registered: {', '.join(sorted(self._entries))}"
                                 f"; or a class path pkg.module.Class (a subclass of {_path(self.base)})")

    def class_of(self, spec: str) -> type:
        """The class behind a spec (for its class flags)."""
        return self.resolve(spec).cls

    def create(self, spec: str, **kwargs: Any) -> Any:
        """A new plugin: the class behind `spec` built with its preset, then `kwargs` on top."""
        entry = self.resolve(spec)
        arguments = {**entry.preset, **kwargs}
        try:
            inspect.signature(entry.cls.__init__).bind(None, **arguments)
        except TypeError as exc:
            raise PluginError(f"{self.kind} {spec!r} ({_path(entry.cls)}) cannot be built with {sorted(arguments)}: "
                              f"{exc}") from exc
        return entry.cls(**arguments)

    def _import_class(self, spec: str) -> type:
        parts = spec.split(".")
        if not all(parts):
            raise UnknownPluginError(f"{self.kind} {spec!r}: not a registered name nor a class path pkg.module.Class")
        missing: BaseException | None = None
        for cut in range(len(parts) - 1, 0, -1):
            module_name = ".".join(parts[:cut])
            try:
                obj: Any = importlib.import_module(module_name)
            except ModuleNotFoundError as exc:
                if exc.name and (module_name == exc.name or module_name.startswith(f"{exc.name}.")):
                    missing = missing or exc  # this prefix is no module: a shorter one may be, with a class inside
                    continue
                raise UnknownPluginError(f"{self.kind} {spec!r}: importing {module_name} failed "
                                         f"({_first_line(exc)})") from exc
            except Exception as exc:
                raise UnknownPluginError(f"{self.kind} {spec!r}: importing {module_name} failed "
                                         f"({_first_line(exc)})") from exc
            for attr in parts[cut:]:
                if not hasattr(obj, attr):
                    raise UnknownPluginError(f"{self.kind} {spec!r}: {module_name} has no {'.'.join(parts[cut:])}")
                obj = getattr(obj, attr)
            break
        else:
            raise UnknownPluginError(f"{self.kind} {spec!r}: no module of it imports ({_first_line(missing)}); is its "
                                     "folder on PYTHONPATH?") from missing
        if not (inspect.isclass(obj) and issubclass(obj, self.base)):
            raise UnknownPluginError(f"{self.kind} {spec!r} is not a subclass of {_path(self.base)}")
        if inspect.isabstract(obj):
            raise UnknownPluginError(f"{self.kind} {spec!r} is abstract: it does not implement "
                                     f"{', '.join(sorted(obj.__abstractmethods__))}")
        return obj


RELEVANCE = Registry("relevance method", "cft_lightning.relevance.base.RelevanceMethod",
                     package="cft_lightning.relevance", shipped=SHIPPED_RELEVANCE)
REGULARIZERS = Registry("regularizer", "cft_lightning.regularizers.base.Regularizer",
                        package="cft_lightning.regularizers", shipped=SHIPPED_REGULARIZERS)
register_relevance: Callable[..., Any] = RELEVANCE.register
register_regularizer: Callable[..., Any] = REGULARIZERS.register
