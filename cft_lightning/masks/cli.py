"""`cft masks`: build the mask store.

    cft masks import --format imagenet-s --src ImageNet-S/train-semi-segmentation --out data/masks/imagenet
    cft masks import --format binary --src my_masks/ --kind concept --out data/masks/mine
    cft masks generate --images data/imagenet/train --concepts validated.json --out data/masks/imagenet \
        --accelerator gpu --devices 8 --num_nodes 2
"""

from __future__ import annotations

import argparse

from cft_lightning.errors import CommandFailed
from cft_lightning.masks.grounding_options import add_grounding_options
from cft_lightning.masks.importers import import_binary_masks, import_imagenet_s

__all__ = ["main"]


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="cft masks", description="Build the mask store.")
    sub = p.add_subparsers(dest="command", required=True)
    imp = sub.add_parser("import", help="import existing masks (ImageNet-S PNGs, or binary PNGs) into a store")
    imp.add_argument("--format", required=True, choices=["imagenet-s", "binary"],
                     help="imagenet-s: ImageNet-S class-index PNGs (object masks); binary: one 0/255 PNG per image")
    imp.add_argument("--src", required=True, help="folder of PNG masks, laid out like the images (<class>/<name>.png)")
    imp.add_argument("--out", required=True, help="mask store root")
    imp.add_argument("--kind", default=None, help="mask kind (default: object for imagenet-s; required for binary)")
    imp.add_argument("--overwrite", action="store_true", help="replace masks that exist (default: keep them)")
    imp.add_argument("--no_progress", action="store_true", help="no progress bar")
    gen = sub.add_parser("generate", help="ground every concept of each image's class (GroundingDINO + SAM)")
    gen.add_argument("--images", required=True, help="image folder (<class>/<image>)")
    gen.add_argument("--concepts", required=True, help="concept bank JSON (`cft concepts`, validated or not)")
    gen.add_argument("--out", required=True, help="mask store root")
    gen.add_argument("--grounder", default="grounded_sam", choices=["grounded_sam", "oracle"],
                     help="grounded_sam: the models; oracle: masks looked up in --oracle_masks (embedded "
                     "benchmark) (default: %(default)s)")
    gen.add_argument("--oracle_masks", help="mask store of the oracle grounder")
    add_grounding_options(gen)
    gen.add_argument("--batch_size", type=int, default=8, help="images per predict step (default: %(default)s)")
    gen.add_argument("--accelerator", default="auto",
                     help="Lightning accelerator: cpu, gpu, auto (default: %(default)s)")
    gen.add_argument("--devices", default="auto", help="devices per node, a number or auto (default: %(default)s)")
    gen.add_argument("--num_nodes", type=int, default=1, help="nodes (default: %(default)s)")
    gen.add_argument("--no_progress", action="store_true", help="no progress bar")
    return p


def _generate(args: argparse.Namespace) -> None:
    import json
    from pathlib import Path

    import lightning as L

    from cft_lightning.concepts.bank import load_concept_bank
    from cft_lightning.concepts.validate import OracleGrounder, images_by_class
    from cft_lightning.data.mask_store import MaskStore
    from cft_lightning.masks.predict import MaskGeneration, generation_loader

    bank = load_concept_bank(args.concepts)
    MaskStore(args.out).check_concept_bank(args.concepts)  # masks of two banks are never mixed in one store
    images = {cls: rels for cls, rels in images_by_class(args.images).items() if cls in bank}
    if not images:
        raise ValueError(f"--images {args.images} has no class folder named in {args.concepts}")
    if args.grounder == "oracle":
        if not args.oracle_masks:
            raise ValueError("--grounder oracle needs --oracle_masks")
        grounder = OracleGrounder(args.oracle_masks)
    else:
        from cft_lightning.masks.grounded_sam import GroundedSAM

        grounder = GroundedSAM(args.images, args.detector, args.segmenter, args.box_threshold, args.text_threshold)
    devices = int(args.devices) if str(args.devices).isdigit() else args.devices
    trainer = L.Trainer(accelerator=args.accelerator, devices=devices, num_nodes=args.num_nodes, logger=False,
                        enable_progress_bar=not args.no_progress, enable_model_summary=False,
                        default_root_dir=args.out)
    trainer.predict(MaskGeneration(grounder, bank, args.out), generation_loader(images, args.batch_size),
                    return_predictions=False)
    if trainer.is_global_zero:
        MaskStore(args.out).update_manifest(
            kinds=["concept", "object"], concept_bank=args.concepts,
            models={"grounder": args.grounder, **({"detector": args.detector, "segmenter": args.segmenter}
                                                  if args.grounder == "grounded_sam" else {})},
            thresholds={"box": args.box_threshold, "text": args.text_threshold})
        records = [json.loads(line) for log in sorted(Path(args.out, "logs").glob("*.jsonl"))
                   for line in log.read_text().splitlines()]
        done = {r["image"] for r in records if not r["skipped"]}  # over this run and the ones it resumed
        empty = sum(bool(r.get("empty")) for r in records if not r["skipped"])
        found = [r["concepts_found"] for r in records if not r["skipped"]]
        mean = sum(found) / len(found) if found else 0.0
        print(f"cft masks generate: {sum(map(len, images.values()))} images, {len(done)} written so far, "
              f"{mean:.2f} concepts found per image, {empty} empty concept mask(s); logs in {args.out}/logs")
        if not done:
            raise CommandFailed(f"cft masks generate wrote no mask into {args.out} (logs in {args.out}/logs)")


def main(argv: list[str] | None = None) -> None:
    """Entry point of `cft masks`."""
    args = _parser().parse_args(argv)
    if args.command == "generate":
        _generate(args)
        return
    if args.format == "imagenet-s":
        counts = import_imagenet_s(args.src, args.out, args.kind or "object", args.overwrite, not args.no_progress)
    else:
        if not args.kind:
            raise ValueError("cft masks import --format binary needs --kind (e.g. concept, object, critic)")
        counts = import_binary_masks(args.src, args.out, args.kind, args.overwrite, not args.no_progress)
    print(f"cft masks import: {counts['written']} written, {counts['skipped']} kept (already there), "
          f"{counts['empty']} empty, into {args.out}")
