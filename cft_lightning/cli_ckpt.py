"""Command-line `model.*` flags next to `--ckpt_path FILE`: honoured, not silently replaced.

LightningCLI (>= 2.3) reads the checkpoint's saved hyperparameters and puts them over the parsed `model.*`
config, so `cft test --ckpt_path FILE --model.track_reference false` used to test with the reference anyway.
Here the checkpoint's values replace the config *file's* `model.*` (the weights were trained with them), and
every `--model.*` flag given on the command line is put back on top. Flags that would change the network the
weights belong to (`model.backbone.name`, `num_classes`, `model_kwargs`) cannot be honoured: when they differ
from the checkpoint's, the command stops with one line naming the key. See docs/results.md.
"""

from __future__ import annotations

import copy
import sys
from collections.abc import Sequence
from typing import Any

from cft_lightning.errors import DataError

__all__ = ["ARCHITECTURE_KEYS", "command_line_model_keys", "honour_model_overrides"]

# what the checkpoint's weights fit: only the checkpoint's own values are possible
ARCHITECTURE_KEYS = ("model.backbone.name", "model.backbone.num_classes", "model.backbone.model_kwargs")


def command_line_model_keys(argv: Sequence[str]) -> list[str]:
    """The `model...` keys set by `--model...` flags in `argv` (`--model.lr 1`, `--model.lr=1`, `--model {...}`),
    in order, without duplicates."""
    keys: list[str] = []
    for token in argv:
        if not isinstance(token, str) or not token.startswith("--model"):
            continue
        key = token[2:].split("=", 1)[0]
        if (key == "model" or key.startswith("model.")) and key not in keys:
            keys.append(key)
    return keys


def _locate(ns: Any, key: str) -> str | None:
    """The key of `ns` that a flag's key names (`model.relevance.layer` -> `model.relevance.init_args.layer` for a
    class given by `class_path`/`init_args`); None when `ns` has no such entry."""
    found: list[str] = []
    node = ns
    for part in key.split("."):
        if not hasattr(node, "__contains__") or not hasattr(node, "get"):
            return None
        if part not in node and part not in ("class_path", "init_args", "dict_kwargs"):
            init_args = node.get("init_args")
            if init_args is not None and hasattr(init_args, "__contains__") and part in init_args:
                found.append("init_args")
                node = init_args
        if part not in node:
            return None
        found.append(part)
        node = node[part]
    return ".".join(found)


def _get(ns: Any, key: str) -> Any:
    located = _locate(ns, key)
    return None if located is None else ns[located]


def _plain(value: Any) -> Any:
    """A Namespace / dict / tuple tree as plain dicts and lists, for comparison."""
    if hasattr(value, "as_dict"):
        value = value.as_dict()
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    return value


def honour_model_overrides(before: Any, after: Any, subcommand: str, argv: Sequence[str], ckpt_path: str) -> list[str]:
    """Put the command line's `model.*` values (in `before`, the config parsed from file and flags) back into
    `after` (the config once the checkpoint's hyperparameters are applied). Raises DataError for an
    architecture key whose command-line value differs from the checkpoint's. Returns the keys whose value
    now differs from the checkpoint's."""
    before_sub, after_sub = before[subcommand], after[subcommand]
    keys = command_line_model_keys(argv)
    for key in keys:
        for arch in ARCHITECTURE_KEYS:
            covered = arch == key or arch.startswith(key + ".") or key.startswith(arch + ".")
            if covered and _plain(_get(before_sub, arch)) != _plain(_get(after_sub, arch)):
                raise DataError(
                    f"--{arch} {_plain(_get(before_sub, arch))!r} differs from the checkpoint's "
                    f"{_plain(_get(after_sub, arch))!r} ({ckpt_path}): its weights fit only the network they were "
                    "trained with; drop the flag"
                )
    changed: list[str] = []
    for key in keys:
        source = _locate(before_sub, key)
        if source is None:
            continue
        if source not in after_sub:  # the checkpoint has another plugin class there: the whole plugin
            source = ".".join(source.split(".")[:2])
        value = copy.deepcopy(before_sub[source])
        if source not in after_sub or _plain(value) != _plain(after_sub[source]):
            changed.append(key)
        after_sub[source] = value
    if changed:
        print(f"cft: model settings from the checkpoint {ckpt_path}, except {', '.join(changed)} (command line)",
              file=sys.stderr)
    return changed
