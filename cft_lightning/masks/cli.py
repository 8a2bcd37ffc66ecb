"""`cft masks`: build the mask store.

    cft masks import --format imagenet-s --src ImageNet-S/train-semi-segmentation --out data/masks/imagenet
    cft masks import --format binary --src my_masks/ --kind concept --out data/masks/mine
"""

from __future__ import annotations

import argparse

from cft_lightning.masks.importers import import_binary_masks, import_imagenet_s

__all__ = ["main"]


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="cft masks", description="Build the mask store.")
    sub = p.add_subparsers(dest="command", required=True)
    imp = sub.add_parser("import", help="import existing masks (ImageNet-S PNGs, or binary PNGs) into a store")
    imp.add_argument("--format", required=True, choices=["imagenet-s", "binary"])
    imp.add_argument("--src", required=True, help="folder of PNG masks, laid out like the images (<class>/<name>.png)")
    imp.add_argument("--out", required=True, help="mask store root")
    imp.add_argument("--kind", default=None, help="mask kind (default: object for imagenet-s; required for binary)")
    imp.add_argument("--overwrite", action="store_true", help="replace masks that exist (default: keep them)")
    imp.add_argument("--no_progress", action="store_true")
    return p


def main(argv: list[str] | None = None) -> None:
    """Entry point of `cft masks`."""
    args = _parser().parse_args(argv)
    if args.format == "imagenet-s":
        counts = import_imagenet_s(args.src, args.out, args.kind or "object", args.overwrite, not args.no_progress)
    else:
        if not args.kind:
            raise ValueError("cft masks import --format binary needs --kind (e.g. concept, object, critic)")
        counts = import_binary_masks(args.src, args.out, args.kind, args.overwrite, not args.no_progress)
    print(f"cft masks import: {counts['written']} written, {counts['skipped']} kept (already there), "
          f"{counts['empty']} empty, into {args.out}")
