"""Mixed precision: the float32 regions of the relevance methods and objectives, and the precisions a plugin
declares it supports.

Under `trainer.precision: bf16-mixed` (or `16-mixed`) Lightning runs every step inside `torch.autocast`: matrix
products and convolutions run in the low-precision type, parameters stay float32. A few operations of the
guided objectives lose too much there (a softmax VJP and the LayerNorm rule subtract nearly equal numbers, a
[eps, 1 - eps] clamp rounds to [eps, 1] in bfloat16, so log(1 - Phi) becomes -inf); each runs in a local
`float32_region` on `upcast` inputs, with a comment saying why. Nothing casts a whole model.

Every `RelevanceMethod` and `Regularizer` declares `precisions`, the precision kinds it supports (`"32"`,
`"bf16"`, `"16"`); `check_precision` refuses a run whose `trainer.precision` is not among them, at start-up.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, Literal

import torch
from torch import Tensor

from cft_lightning.errors import UnsupportedPrecisionError

__all__ = ["ALL_PRECISIONS", "PrecisionKind", "check_precision", "check_run_precision", "float32_region",
           "precision_kind", "upcast"]

PrecisionKind = Literal["32", "bf16", "16"]
ALL_PRECISIONS: tuple[PrecisionKind, ...] = ("32", "bf16", "16")

_LOW = (torch.float16, torch.bfloat16)


def upcast(t: Tensor) -> Tensor:
    """`t` in float32 when it is float16 or bfloat16; any other tensor (float32, float64, integers) as it is."""
    return t.float() if t.dtype in _LOW else t


@contextmanager
def float32_region(like: Tensor) -> Iterator[None]:
    """Autocast off for `like`'s device type: the operations inside run in their inputs' dtype (`upcast` them)."""
    with torch.autocast(like.device.type, enabled=False):
        yield


def precision_kind(precision: str | int | None) -> PrecisionKind | None:
    """The kind of a Lightning precision setting: `"bf16"` for bf16-mixed/bf16-true, `"16"` for 16-mixed/16-true,
    `"32"` for 32-true; None for what no flag describes (64-true, transformer-engine, ...), which is not checked."""
    text = str(precision)
    if text.startswith("bf16"):
        return "bf16"
    if text.startswith("16"):
        return "16"
    if text.startswith("32"):
        return "32"
    return None


def check_precision(precision: str | int | None, plugins: dict[str, tuple[type, tuple[str, ...]]]) -> None:
    """Raise one line naming the first plugin whose declared precisions do not include the run's.

    `plugins`: config key (e.g. `model.relevance`) -> (the plugin's class, its declared precision kinds).
    """
    kind = precision_kind(precision)
    if kind is None:
        return
    for key, (cls, supported) in plugins.items():
        if kind in supported:
            continue
        use = " or ".join(f"`{_SETTING[k]}`" for k in ("bf16", "32") if k in supported)
        raise UnsupportedPrecisionError(
            f"{key} {cls.__name__} does not support trainer.precision {precision}: set trainer.precision to {use} "
            f"(supported: {', '.join(supported)}; docs/relevance.md, Mixed precision)"
        )


def check_run_precision(precision: str | int | None, stage: str, relevance: Any, regularizer: Any) -> None:
    """The fine-tuner's start-up check: the relevance method's declared precisions in every stage (test explains
    too), the regularizer's (its `requirements`) in the stages that run it (fit, validate). Typed `Any`: the
    plugin bases import this module, so naming them here would be an import cycle."""
    plugins = {} if relevance is None else {"model.relevance": (type(relevance), tuple(relevance.precisions))}
    if stage in ("fit", "validate"):
        plugins["model.regularizer"] = (type(regularizer), regularizer.requirements.precisions)
    check_precision(precision, plugins)


_SETTING = {"bf16": "bf16-mixed", "16": "16-mixed", "32": "32-true"}
