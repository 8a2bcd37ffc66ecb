"""`cft explain`: relevance overlays (PNG) of the Original and the fine-tuned model, or of any timm model.

    cft explain --ckpt runs/vit_b_cft/.../last.ckpt --images val/ --method attnlrp --out runs/explain
    cft explain --model vit_base_patch16_224.augreg2_in21k_ft_in1k --pretrained --images img.jpg --method gradcam
    cft explain --model vit_tiny_patch16_224 --weights tiny.pth --images imgs/ --masks store/ --mask_kind concept
    cft explain --ckpt runs/digits/.../last.ckpt --images digits/ --method gradcam --layer layer3

One PNG per image (its path relative to `--images`, as .png): the image as the model sees it (the run's
evaluation transform: with `--ckpt` the run's own `data.data_config`, else the model's timm data config), the
mask when a mask store is given, then one overlay per model with its prediction under it, and a colour bar.
Classes are named by `--classes` (ImageNet's names for a 1000-class head by default, indices otherwise); an
image inside a folder named after a class has that class as its true class, written under the image and in
`explain.json`, which lists every image's explained class and prediction per model. Images are explained in
batches.
"""

from __future__ import annotations

import argparse
import json
import pickle
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cft_lightning._registry import SHIPPED_RELEVANCE
from cft_lightning.errors import DataError

if TYPE_CHECKING:  # torch, timm and the relevance methods load when a command runs, not for `--help`
    from torch import nn

    from cft_lightning.data.mask_store import MaskStore
    from cft_lightning.relevance import RelevanceMethod

__all__ = ["explain", "load_models", "main", "run_data_config"]


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="cft explain", description="Write relevance overlays (PNG) for images.")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--ckpt", help="a `cft fit` checkpoint: explains its Original (reference) and fine-tuned model")
    src.add_argument("--model", help="any timm model name (with --pretrained or --weights)")
    p.add_argument("--pretrained", action="store_true", help="with --model: timm's pretrained weights (hub)")
    p.add_argument("--weights", help="with --model: a local weight file (.pth/.bin/.safetensors/.ckpt)")
    p.add_argument("--num_classes", type=int, default=None, help="with --model: head size (default: the model's)")
    p.add_argument("--images", required=True, nargs="+", help="image files and/or folders (searched recursively)")
    p.add_argument("--method", default="attnlrp",
                   help=f"relevance method: {', '.join(SHIPPED_RELEVANCE)}, a name a plugin registers (CFT_PLUGINS) "
                   "or a class path pkg.module.Class (docs/extending.md) (default: %(default)s)")
    p.add_argument("--layer", default=None,
                   help="with a --method that explains one layer (gradcam, grad_x_act): the module explained, a "
                   "dotted path (e.g. "
                   "layer3 or stages.-2 for a CNN, blocks.-1.norm1 for a ViT; default: the method's choice, "
                   "gradcam the last feature stage, grad_x_act the one before)")
    p.add_argument("--target", default="pred",
                   help="class to explain: `pred` (each model's prediction) or a class index (default: pred)")
    p.add_argument("--masks", help="mask store whose masks are drawn beside the maps (keys: paths under --images)")
    p.add_argument("--mask_kind", default="concept", help="mask kind to draw (default: %(default)s)")
    p.add_argument("--classes", default=None,
                   help="class names for the labels: 'imagenet', a text file with one class per line, or a folder "
                   "whose sorted sub-folders are the classes (default: imagenet for a 1000-class head, else "
                   "indices)")
    p.add_argument("--out", default="runs/explain", help="output folder (default: %(default)s)")
    p.add_argument("--batch_size", type=int, default=16, help="images explained at once (default: %(default)s)")
    p.add_argument("--no_progress", action="store_true", help="no progress bar")
    return p


def load_models(args: argparse.Namespace) -> dict[str, nn.Module]:
    """{"original": reference, "fine_tuned": model} from a checkpoint, or {"model": model} from a timm name."""
    from cft_lightning.models.backbone import BackboneSpec, build_backbone

    if args.ckpt:
        from cft_lightning.models import GuidedFineTuner

        if not Path(args.ckpt).is_file():
            raise DataError(f"--ckpt: {args.ckpt} does not exist")
        try:  # weights only: a checkpoint that would run pickled code is refused, not executed
            module = GuidedFineTuner.load_from_checkpoint(args.ckpt, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as exc:
            raise DataError(f"--ckpt: {args.ckpt} holds more than tensors and plain data (refused: loading it "
                            f"would run pickled code): {str(exc).splitlines()[0]}") from exc
        if module.reference is None:
            return {"fine_tuned": module.backbone.eval()}
        return {"original": module.reference.eval(), "fine_tuned": module.backbone.eval()}
    if not (args.pretrained or args.weights):
        raise DataError("--model needs --pretrained (hub weights) or --weights <file>; random weights explain nothing")
    spec = BackboneSpec(name=args.model, pretrained=True, checkpoint_path=args.weights, num_classes=args.num_classes)
    return {"model": build_backbone(spec, weights_flag="--weights").eval()}


def run_data_config(ckpt: str | Path) -> dict[str, Any] | None:
    """The data config the run of a `cft fit` checkpoint used: saved in the checkpoint (`on_save_checkpoint`),
    else `data.data_config` of the run's saved `config*.yaml` next to it; None when neither says (the run
    used the model's timm config)."""
    import torch

    from cft_lightning.models.fine_tuner import DATA_CONFIG_KEY

    try:
        saved = torch.load(ckpt, map_location="cpu", weights_only=True, mmap=True).get(DATA_CONFIG_KEY)
    except RuntimeError:  # not a zip-format checkpoint, which mmap needs: read it whole
        saved = torch.load(ckpt, map_location="cpu", weights_only=True).get(DATA_CONFIG_KEY)
    if saved is not None:
        return dict(saved)
    import yaml

    path = Path(ckpt).resolve()
    for folder in (path.parent, path.parent.parent):  # <run>/checkpoints/last.ckpt, <run>/config.yaml
        for config in sorted(folder.glob("config*.yaml")):
            try:
                data = (yaml.safe_load(config.read_text()) or {}).get("data") or {}
            except (OSError, yaml.YAMLError, AttributeError):
                continue
            if "data_config" in data:
                return data["data_config"]
    return None


def _collect(paths: list[str]) -> list[tuple[Path, str]]:
    """(file, key) pairs: the key is the path relative to its folder argument (or the file name)."""
    from cft_lightning.data.image_folder import is_image_file
    found: list[tuple[Path, str]] = []
    for raw in paths:
        path = Path(raw)
        if path.is_dir():
            found += [(f, f.relative_to(path).as_posix()) for f in sorted(path.rglob("*"))
                      if f.is_file() and is_image_file(f.name)]
        elif path.is_file():
            found.append((path, path.name))
        else:
            raise DataError(f"--images: {raw} does not exist")
    if not found:
        raise DataError(f"--images: no image files in {paths}")
    return found


def class_names_for(spec: str | None, model: nn.Module) -> list[str] | None:
    """`--classes`: 'imagenet', a class-list file or a folder of class folders; by default ImageNet's classes for
    a 1000-class head, None (indices) otherwise."""
    from cft_lightning.data.image_folder import imagenet_classes, resolve_class_list

    outputs = getattr(model, "num_classes", None)
    if spec is None:
        return imagenet_classes() if outputs == 1000 else None
    try:
        folder = spec != "imagenet" and Path(spec).is_dir()
        names = resolve_class_list(None, spec) if folder else resolve_class_list(spec)
    except DataError as exc:
        raise DataError(f"--classes {spec}: {exc}") from exc
    if outputs is not None and len(names) != outputs:
        raise DataError(f"--classes {spec}: {len(names)} classes, but the model has {outputs} outputs")
    return names


def _true_class(key: str, class_names: list[str] | None) -> int | None:
    """The class of an image inside a folder named after a class (`<class>/<file>` under --images), else None."""
    parent = Path(key).parent.name
    return class_names.index(parent) if class_names and parent in class_names else None


def explain(models: dict[str, nn.Module], method: RelevanceMethod, images: list[tuple[Path, str]], out: Path,
            target: str = "pred", masks: MaskStore | None = None, mask_kind: str = "concept",
            batch_size: int = 16, progress: bool = True, data_config: dict[str, Any] | None = None,
            class_names: list[str] | None = None) -> list[dict[str, Any]]:
    """Explain every image with every model, write one overlay PNG per image and return the records.
    `data_config`: the evaluation transform's timm data config (None: the first model's own); `class_names`:
    the labels' names (None: indices)."""
    import torch
    from rich.progress import track

    from cft_lightning.data.image_folder import load_image
    from cft_lightning.data.transforms import JointTransform
    from cft_lightning.evaluation.overlays import explain_models, rows_of, save_overlays
    from cft_lightning.evaluation.plots import class_labels
    from cft_lightning.models.backbone import resolve_data_config

    first = next(iter(models.values()))
    for m in models.values():
        method.check_model(m)
    config = dict(data_config) if data_config is not None else resolve_data_config(first)
    transform = JointTransform(config, train=False)
    records: list[dict[str, Any]] = []
    batches = [images[i : i + batch_size] for i in range(0, len(images), batch_size)]
    for chunk in track(batches, description="explaining", disable=not progress):
        tensors, shown = [], []
        for path, key in chunk:
            mask = {mask_kind: masks.read(key, mask_kind)} if masks is not None else {}
            tensor, tmasks = transform(load_image(path), mask)
            tensors.append(tensor)
            shown.append(tmasks.get(mask_kind))
        batch = torch.stack(tensors)
        targets = None if target == "pred" else torch.full((len(chunk),), int(target), dtype=torch.long)
        explained = explain_models(models, method, batch, targets)
        preds = {name: rel.logits.argmax(1) for name, rel in explained.items()}
        for i, (path, key) in enumerate(chunk):
            mask = None if masks is None else shown[i].numpy()[None]
            png = out / Path(key).with_suffix(".png")
            truth = _true_class(key, class_names)
            predicted = {name: class_labels(preds[name][i : i + 1], class_names) for name in models}
            save_overlays(png, batch[i : i + 1], config, rows_of(explained, slice(i, i + 1)), class_names,
                          labels=None if truth is None else [truth], masks=mask, mask_title=f"{mask_kind} mask")
            record: dict[str, Any] = {"image": str(path), "png": str(png)}
            if truth is not None:
                record.update(true_class=truth, true_name=class_labels([truth], class_names)[0])
            for name in models:
                record[name] = {"explained_class": int(explained[name].targets[i]),
                                "predicted_class": int(preds[name][i])}
                if class_names:
                    record[name]["predicted_name"] = predicted[name][0]
            records.append(record)
    return records


def main(argv: list[str] | None = None) -> None:
    """Entry point of `cft explain`."""
    args = _parser().parse_args(argv)
    import torch

    from cft_lightning.data.mask_store import MaskStore
    from cft_lightning.errors import UnsupportedModelError
    from cft_lightning.models.backbone import resolve_data_config

    if args.target != "pred" and not args.target.lstrip("-").isdigit():
        raise DataError(f"--target must be 'pred' or a class index, got {args.target!r}")
    if args.batch_size < 1:
        raise DataError("--batch_size must be >= 1")
    from cft_lightning.relevance import create_relevance, list_relevance, relevance_class

    if args.layer is not None and not relevance_class(args.method).explains_layer:
        layered = [name for name in list_relevance() if relevance_class(name).explains_layer]
        raise DataError(f"--layer applies to a --method that explains one layer ({', '.join(layered)}), "
                        f"not {args.method!r}")
    method = create_relevance(args.method, **({"layer": args.layer} if args.layer else {}))
    models = load_models(args)
    images = _collect(args.images)
    masks = MaskStore(args.masks) if args.masks else None
    if masks is not None:
        missing = [key for _, key in images if not masks.has(key, args.mask_kind)]
        if missing:
            raise DataError(f"--masks: {len(missing)} image(s) have no {args.mask_kind!r} mask in {args.masks}, "
                            f"e.g. {masks.path(missing[0], args.mask_kind)}")
    out = Path(args.out)
    data_config = run_data_config(args.ckpt) if args.ckpt else None
    try:
        for model in models.values():
            method.check_model(model)
    except UnsupportedModelError as err:
        raise UnsupportedModelError(f"--method {args.method}{f' --layer {args.layer}' if args.layer else ''}: "
                                    f"{err}") from err
    class_names = class_names_for(args.classes, next(iter(models.values())))
    with torch.enable_grad():
        records = explain(models, method, images, out, args.target, masks, args.mask_kind, args.batch_size,
                          progress=not args.no_progress, data_config=data_config, class_names=class_names)
    summary: dict[str, Any] = {"method": args.method}
    if method.explains_layer:
        summary["layer"] = method.layer_for(next(iter(models.values())))
    summary["data_config"] = data_config or resolve_data_config(next(iter(models.values())))
    (out / "explain.json").write_text(json.dumps({**summary, "images": records}, indent=2) + "\n")
    print(f"cft explain: {len(records)} overlay(s) in {out} (method {args.method}, models {', '.join(models)})")
