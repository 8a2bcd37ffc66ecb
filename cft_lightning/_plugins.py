"""What every plugin (regularizer, relevance method) shares: the arguments it was built with, and the
declaration of what a regularizer needs from the run.

- `RecordsInitArgs`: a base class that remembers the arguments an instance was constructed with
  (`init_args`, defaults filled in), whatever attribute names the class stores them under, so a checkpoint
  saved outside the CLI rebuilds the same plugin (`plugin_config`).
- `Requirements`: one typed place where a regularizer says which masks it reads, whether it calls the
  relevance method, differentiates through the model, needs the frozen reference's logits, trains on
  batches mixed with an alignment set, and which `trainer.precision` kinds it supports. The fine-tuner and
  the data module read it; nothing probes a plugin for attributes.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Any

__all__ = ["RecordsInitArgs", "Requirements", "plugin_config"]


@dataclass(frozen=True)
class Requirements:
    """What a regularizer needs from the run.

    Attributes:
        masks: mask kinds every training batch must carry (`batch["masks"][kind]`).
        relevance: it calls the relevance method (`model.relevance` must be set).
        autograd: it differentiates through the model itself (input gradients), also at evaluation.
        reference_logits: it needs the frozen reference's logits on training batches.
        alignment: (mask kind, share) when every training batch must hold that share of images with that
            mask kind (LVLM-VA's alignment set); the data module builds its batches from this.
        precisions: the precision kinds (`"32"`, `"bf16"`, `"16"`) it trains correctly under; the fine-tuner
            refuses any other `trainer.precision` at start-up.
    """

    masks: tuple[str, ...] = ()
    relevance: bool = False
    autograd: bool = False
    reference_logits: bool = False
    alignment: tuple[str, float] | None = None
    precisions: tuple[str, ...] = ("32", "bf16", "16")


def _bound_arguments(cls: type, args: tuple[Any, ...], kwargs: dict[str, Any]) -> dict[str, Any]:
    """The keyword arguments `cls(*args, **kwargs)` amounts to, with `cls.__init__`'s defaults filled in.
    `**kwargs` passed on to a parent's `__init__` are bound there too (one level per class in the MRO)."""
    recorded: dict[str, Any] = {}
    for klass in cls.__mro__:
        init = klass.__dict__.get("__init__")
        if init is None or klass is object:
            continue
        signature = inspect.signature(init)
        bound = signature.bind(None, *args, **kwargs)
        bound.apply_defaults()
        args, kwargs = (), {}
        for name, value in list(bound.arguments.items())[1:]:  # without self
            kind = signature.parameters[name].kind
            if kind is inspect.Parameter.VAR_POSITIONAL:
                args = tuple(value)
            elif kind is inspect.Parameter.VAR_KEYWORD:
                kwargs = dict(value)
            else:  # a subclass's own value wins over the default its parent would fill in
                recorded.setdefault(name, value)
        if not args and not kwargs:
            break
    return recorded


class RecordsInitArgs:
    """Remembers the arguments an instance was constructed with, as `init_args` (see the module docstring)."""

    _init_args: dict[str, Any]

    def __new__(cls, *args: Any, **kwargs: Any) -> Any:
        obj = super().__new__(cls)
        try:
            obj._init_args = _bound_arguments(cls, args, kwargs)
        except TypeError:  # a call __init__ will refuse with its own message
            obj._init_args = {}
        return obj

    @property
    def init_args(self) -> dict[str, Any]:
        """The constructor's arguments (defaults filled in): `type(self)(**self.init_args)` rebuilds it."""
        return dict(self._init_args)


def plugin_config(obj: Any) -> dict[str, Any]:
    """`{"class_path", "init_args"}` of a plugin, as LightningCLI writes it: rebuilds `obj` exactly when it
    records its arguments (`RecordsInitArgs`), else from the attributes named like its `__init__` arguments."""
    cls = type(obj)
    if isinstance(obj, RecordsInitArgs):
        init_args = obj.init_args
    else:  # a user's plugin without our base classes: its attributes named like its arguments
        params = inspect.signature(cls.__init__).parameters
        open_ended = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
        init_args = {k: v for k, v in vars(obj).items() if not k.startswith("_") and (open_ended or k in params)}
    return {"class_path": f"{cls.__module__}.{cls.__qualname__}", "init_args": init_args}
