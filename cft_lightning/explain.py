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

import json
import pickle
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cft_lightning._registry import SHIPPED_RELEVANCE
from cft_lightning._tool_cli import Tool
from cft_lightning.errors import DataError

if TYPE_CHECKING:  # torch, timm and the relevance methods load when a command runs, not for `--help`
    from torch import nn

    from cft_lightning.data.mask_store import MaskStore
    from cft_lightning.relevance import RelevanceMethod

__all__ = ["TOOL", "check_source", "explain", "explain_command", "load_models", "main", "run_data_config"]


def check_source(ckpt: str | None, model: str | None) -> None:
    """Exactly one of `--ckpt` and `--model` (a one-line error before anything loads)."""
    if ckpt is None and model is None:
        raise DataError("one of --ckpt (a `cft fit` checkpoint) and --model (a timm model name) is required")
    if ckpt is not None and model is not None:
        raise DataError("--ckpt and --model exclude each other: give one")


def load_models(ckpt: str | None = None, model: str | None = None, pretrained: bool = False,
                weights: str | None = None, num_classes: int | None = None) -> dict[str, nn.Module]:
    """{"original": reference, "fine_tuned": model} from a `cft fit` checkpoint, or {"model": model} from a timm
    name with hub (`pretrained`) or local (`weights`) weights; exactly one of `ckpt` and `model` (the flags of
    `cft explain` and `cft critique`)."""
    from cft_lightning.models.backbone import BackboneSpec, build_backbone

    check_source(ckpt, model)
    if ckpt is not None:
        from cft_lightning.models import GuidedFineTuner

        if not Path(ckpt).is_file():
            raise DataError(f"--ckpt: {ckpt} does not exist")
        try:  # weights only: a checkpoint that would run pickled code is refused, not executed
            module = GuidedFineTuner.load_from_checkpoint(ckpt, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as exc:
            raise DataError(f"--ckpt: {ckpt} holds more than tensors and plain data (refused: loading it "
                            f"would run pickled code): {str(exc).splitlines()[0]}") from exc
        if module.reference is None:
            return {"fine_tuned": module.backbone.eval()}
        return {"original": module.reference.eval(), "fine_tuned": module.backbone.eval()}
    if not (pretrained or weights):
        raise DataError("--model needs --pretrained (hub weights) or --weights <file>; random weights explain nothing")
    spec = BackboneSpec(name=model, pretrained=True, checkpoint_path=weights, num_classes=num_classes)
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


def explain_command(
    images: list[str],
    ckpt: str | None = None,
    model: str | None = None,
    pretrained: bool = False,
    weights: str | None = None,
    num_classes: int | None = None,
    method: str = "attnlrp",
    layer: str | None = None,
    target: str = "pred",
    masks: str | None = None,
    mask_kind: str = "concept",
    classes: str | None = None,
    out: str = "runs/explain",
    batch_size: int = 16,
    no_progress: bool = False,
) -> None:
    """Write relevance overlays (PNG) for images, from a `cft fit` checkpoint (--ckpt) or a timm model (--model).

    Args:
        images: image files and/or folders (searched recursively)
        ckpt: a `cft fit` checkpoint: explains its Original (reference) and fine-tuned model
        model: any timm model name (with --pretrained or --weights)
        pretrained: with --model: timm's pretrained weights (hub)
        weights: with --model: a local weight file (.pth/.bin/.safetensors/.ckpt)
        num_classes: with --model: head size (null: the model's)
        method: relevance method: a registered name (listed after the options) or a class path
            pkg.module.Class (docs/extending.md)
        layer: with a --method that explains one layer (gradcam, grad_x_act): the module explained, a dotted
            path (e.g. layer3 or stages.-2 for a CNN, blocks.-1.norm1 for a ViT; null: the method's choice,
            gradcam the last feature stage, grad_x_act the one before)
        target: class to explain: `pred` (each model's prediction) or a class index
        masks: mask store whose masks are drawn beside the maps (keys: paths under --images)
        mask_kind: mask kind to draw
        classes: class names for the labels: 'imagenet', a text file with one class per line, or a folder whose
            sorted sub-folders are the classes (null: imagenet for a 1000-class head, else indices)
        out: output folder
        batch_size: images explained at once
        no_progress: no progress bar
    """
    check_source(ckpt, model)  # the flags' own checks first: one line, before torch loads
    if target != "pred" and not target.lstrip("-").isdigit():
        raise DataError(f"--target must be 'pred' or a class index, got {target!r}")
    if batch_size < 1:
        raise DataError("--batch_size must be >= 1")
    import torch

    from cft_lightning.data.mask_store import MaskStore
    from cft_lightning.errors import UnsupportedModelError
    from cft_lightning.models.backbone import resolve_data_config
    from cft_lightning.relevance import create_relevance, list_relevance, relevance_class

    if layer is not None and not relevance_class(method).explains_layer:
        layered = [name for name in list_relevance() if relevance_class(name).explains_layer]
        raise DataError(f"--layer applies to a --method that explains one layer ({', '.join(layered)}), "
                        f"not {method!r}")
    relevance = create_relevance(method, **({"layer": layer} if layer else {}))
    models = load_models(ckpt, model, pretrained, weights, num_classes)
    found = _collect(images)
    store = MaskStore(masks) if masks else None
    if store is not None:
        missing = [key for _, key in found if not store.has(key, mask_kind)]
        if missing:
            raise DataError(f"--masks: {len(missing)} image(s) have no {mask_kind!r} mask in {masks}, "
                            f"e.g. {store.path(missing[0], mask_kind)}")
    folder = Path(out)
    data_config = run_data_config(ckpt) if ckpt else None
    try:
        for network in models.values():
            relevance.check_model(network)
    except UnsupportedModelError as err:
        raise UnsupportedModelError(f"--method {method}{f' --layer {layer}' if layer else ''}: {err}") from err
    class_names = class_names_for(classes, next(iter(models.values())))
    with torch.enable_grad():
        records = explain(models, relevance, found, folder, target, store, mask_kind, batch_size,
                          progress=not no_progress, data_config=data_config, class_names=class_names)
    summary: dict[str, Any] = {"method": method}
    if relevance.explains_layer:
        summary["layer"] = relevance.layer_for(next(iter(models.values())))
    summary["data_config"] = data_config or resolve_data_config(next(iter(models.values())))
    (folder / "explain.json").write_text(json.dumps({**summary, "images": records}, indent=2) + "\n")
    print(f"cft explain: {len(records)} overlay(s) in {folder} (method {method}, models {', '.join(models)})")


TOOL = Tool(explain_command, prog="cft explain", epilog=(
    f"--method takes {', '.join(SHIPPED_RELEVANCE)}, a name a plugin registers (CFT_PLUGINS) or a class path "
    "pkg.module.Class (docs/extending.md). Example: cft explain --ckpt runs/vit_b_cft/.../last.ckpt --images val/ "
    "--method attnlrp --out runs/explain"))


def main(argv: list[str] | None = None) -> None:
    """Entry point of `cft explain`: flags, or a YAML file with --config (`cft explain --print_config` writes one)."""
    TOOL(argv)
