"""`cft masks`: build the mask store.

    cft masks import --format imagenet-s --src ImageNet-S/train-semi-segmentation --out data/masks/imagenet
    cft masks import --format binary --src my_masks/ --kind concept --out data/masks/mine
    cft masks generate --images data/imagenet/train --concepts validated.json --out data/masks/imagenet \\
        --accelerator gpu --devices 8 --num_nodes 2

Each subcommand also reads its options from YAML (`--config FILE`) and prints them (`--print_config`).
"""

from __future__ import annotations

from typing import Literal

from cft_lightning._tool_cli import Subcommands, Tool
from cft_lightning.errors import CommandFailed, DataError
from cft_lightning.masks.grounding_options import GROUNDING, GroundingOptions
from cft_lightning.masks.importers import import_binary_masks, import_imagenet_s

__all__ = ["TOOL", "generate_command", "import_command", "main"]


def import_command(
    format: Literal["imagenet-s", "binary"],
    src: str,
    out: str,
    kind: str | None = None,
    overwrite: bool = False,
    no_progress: bool = False,
) -> None:
    """Import existing masks (ImageNet-S PNGs, or binary PNGs) into a store.

    Args:
        format: imagenet-s: ImageNet-S class-index PNGs (object masks); binary: one 0/255 PNG per image
        src: folder of PNG masks, laid out like the images (<class>/<name>.png)
        out: mask store root
        kind: mask kind (null: object for imagenet-s; required for binary)
        overwrite: replace masks that exist (false: keep them)
        no_progress: no progress bar
    """
    if format == "imagenet-s":
        counts = import_imagenet_s(src, out, kind or "object", overwrite, not no_progress)
    else:
        if not kind:
            raise DataError("cft masks import --format binary needs --kind (e.g. concept, object, critic)")
        counts = import_binary_masks(src, out, kind, overwrite, not no_progress)
    print(f"cft masks import: {counts['written']} written, {counts['skipped']} kept (already there), "
          f"{counts['empty']} empty, into {out}")


def generate_command(
    images: str,
    concepts: str,
    out: str,
    grounder: Literal["grounded_sam", "oracle"] = "grounded_sam",
    oracle_masks: str | None = None,
    grounding: GroundingOptions = GROUNDING,
    batch_size: int = 8,
    accelerator: str = "auto",
    devices: int | str = "auto",
    num_nodes: int = 1,
    precision: Literal["32-true", "bf16-mixed"] = "32-true",
    no_progress: bool = False,
) -> None:
    """Ground every concept of each image's class (GroundingDINO + SAM).

    Args:
        images: image folder (<class>/<image>)
        concepts: concept bank JSON (`cft concepts`, validated or not)
        out: mask store root
        grounder: grounded_sam: the models; oracle: masks looked up in --oracle_masks (embedded benchmark)
        oracle_masks: mask store of the oracle grounder
        grounding: the Grounded-SAM models and thresholds (flags --detector, --segmenter, ...)
        batch_size: images per predict step
        accelerator: Lightning accelerator: cpu, gpu, auto
        devices: devices per node, a number or auto
        num_nodes: number of nodes (machines)
        precision: the models' arithmetic: 32-true, or bf16-mixed (bfloat16 autocast; GPUs from Ampere on),
            which the store's manifest records
        no_progress: no progress bar
    """
    import json
    from pathlib import Path

    import lightning as L

    from cft_lightning.concepts.bank import load_concept_bank
    from cft_lightning.concepts.validate import OracleGrounder, images_by_class
    from cft_lightning.data.mask_store import MaskStore
    from cft_lightning.masks.predict import MaskGeneration, generation_loader

    bank = load_concept_bank(concepts)
    MaskStore(out).check_concept_bank(concepts)  # masks of two banks are never mixed in one store
    found_images = {cls: rels for cls, rels in images_by_class(images).items() if cls in bank}
    if not found_images:
        raise DataError(f"--images {images} has no class folder named in {concepts}")
    if grounder == "oracle":
        if not oracle_masks:
            raise DataError("--grounder oracle needs --oracle_masks")
        ground = OracleGrounder(oracle_masks)
    else:
        from cft_lightning.masks.grounded_sam import GroundedSAM

        ground = GroundedSAM(images, grounding.detector, grounding.segmenter, grounding.box_threshold,
                             grounding.text_threshold)
    trainer = L.Trainer(accelerator=accelerator, devices=devices, num_nodes=num_nodes, precision=precision,
                        logger=False, enable_progress_bar=not no_progress, enable_model_summary=False,
                        default_root_dir=out)
    trainer.predict(MaskGeneration(ground, bank, out), generation_loader(found_images, batch_size),
                    return_predictions=False)
    if trainer.is_global_zero:
        MaskStore(out).update_manifest(
            kinds=["concept", "object"], concept_bank=concepts,
            models={"grounder": grounder, **({"detector": grounding.detector, "segmenter": grounding.segmenter,
                                              "precision": precision} if grounder == "grounded_sam" else {})},
            thresholds={"box": grounding.box_threshold, "text": grounding.text_threshold})
        records = [json.loads(line) for log in sorted(Path(out, "logs").glob("*.jsonl"))
                   for line in log.read_text().splitlines()]
        done = {r["image"] for r in records if not r["skipped"]}  # over this run and the ones it resumed
        empty = sum(bool(r.get("empty")) for r in records if not r["skipped"])
        found = [r["concepts_found"] for r in records if not r["skipped"]]
        mean = sum(found) / len(found) if found else 0.0
        print(f"cft masks generate: {sum(map(len, found_images.values()))} images, {len(done)} written so far, "
              f"{mean:.2f} concepts found per image, {empty} empty concept mask(s); logs in {out}/logs")
        if not done:
            raise CommandFailed(f"cft masks generate wrote no mask into {out} (logs in {out}/logs)")


TOOL = Subcommands("cft masks", "Build the mask store.", {
    "import": Tool(import_command, prog="cft masks import"),
    "generate": Tool(generate_command, prog="cft masks generate", flatten=("grounding",)),
})


def main(argv: list[str] | None = None) -> None:
    """Entry point of `cft masks`."""
    TOOL(argv)
