"""`cft critique`: LVLM-VA's corrective masks for a trained model, then `cft fit` with the `LVLMCritic` regularizer.

    cft critique --ckpt runs/isic/last.ckpt --data data/isic/train --descriptions isic_classes.yaml \\
        --out data/masks/isic_critic --llm gpt-4o --samples 64 --segments 4 --devices 4
    cft fit --config configs/baselines/lvlm_va_resnet50.yaml --data.masks data/masks/isic_critic ...

The key is read from the environment variable `--api_key_env` (default OPENAI_API_KEY) and handed to the
client only. `--critic oracle --oracle_masks STORE --oracle_kind decoy` replaces the LLMs by ground truth.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from cft_lightning.critique.attribution import ATTRIBUTIONS, build_attributor, is_vit
from cft_lightning.errors import CommandFailed, DataError, UnknownPluginError

__all__ = ["main"]


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="cft critique", description="LVLM-VA corrective masks (mask kind `critic`).")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--ckpt", help="a `cft fit` checkpoint: its fine-tuned model is critiqued")
    src.add_argument("--model", help="any timm model name (with --weights or --pretrained)")
    p.add_argument("--weights", help="with --model: a local weight file")
    p.add_argument("--pretrained", action="store_true", help="with --model: timm's hub weights")
    p.add_argument("--num_classes", type=int, default=None, help="with --model: head size")
    p.add_argument("--data", required=True, help="training image folder (<class>/<image>)")
    p.add_argument("--classes", help="file with one class id per line in the model's head order "
                   "(default: the sorted class folders)")
    p.add_argument("--descriptions", help="YAML/JSON {class id: expert description} ('*' = fallback); "
                   "required for --critic lvlm")
    p.add_argument("--out", required=True, help="mask store for the `critic` masks")
    p.add_argument("--samples", type=int, default=64,
                   help="N, the size of the alignment set: the N training images of lowest predictive entropy "
                   "(default: %(default)s; LVLM-VA does not publish its N)")
    p.add_argument("--segments", type=int, default=4,
                   help="J, PPEPS-WGM segments per image that the critic judges (default: %(default)s; unpublished)")
    p.add_argument("--min_success", type=float, default=1.0,
                   help="fraction of the alignment set that must get a corrective mask, else exit 1 after writing "
                   "the masks and the report (default: %(default)s, every image)")
    p.add_argument("--target", default="label", choices=["label", "prediction"],
                   help="class the attribution explains (default: %(default)s)")
    p.add_argument("--attribution", default="auto",
                   help=f"{', '.join(ATTRIBUTIONS)}, a relevance method a plugin registers (CFT_PLUGINS) or a class "
                   "path pkg.module.Class; auto: deeplift_shap for CNNs/MLPs, ixg for ViTs (default: %(default)s)")
    p.add_argument("--shap_baselines", type=int, default=8,
                   help="DeepLIFT-SHAP: K random training images (default: %(default)s)")
    p.add_argument("--critic", default="lvlm", choices=["lvlm", "oracle"],
                   help="lvlm: the critic and judge LLMs; oracle: ground-truth masks decide (default: %(default)s)")
    p.add_argument("--oracle_masks", help="--critic oracle: mask store with the ground-truth spurious masks")
    p.add_argument("--oracle_kind", default="decoy", help="--critic oracle: their mask kind (default: %(default)s)")
    p.add_argument("--oracle_threshold", type=float, default=0.5,
                   help="--critic oracle: share of a segment inside the spurious mask that makes it spurious "
                   "(default: %(default)s)")
    p.add_argument("--llm", default="gpt-4o",
                   help="critic model (it must read images), as the endpoint names it (default: %(default)s)")
    p.add_argument("--judge_llm", default=None, help="judge model (default: --llm)")
    p.add_argument("--base_url", default=None, help="OpenAI-compatible endpoint (default: OpenAI or OPENAI_BASE_URL)")
    p.add_argument("--api_key_env", default="OPENAI_API_KEY",
                   help="environment variable holding the key (default: %(default)s; never written anywhere)")
    p.add_argument("--judge_examples", default=None, help="few-shot examples YAML (default: the shipped ones)")
    p.add_argument("--critic_max_tokens", type=int, default=1500,
                   help="longest critic answer in tokens (default: %(default)s)")
    p.add_argument("--temperature", type=float, default=0.0, help="sampling temperature (default: %(default)s)")
    p.add_argument("--retries", type=int, default=2,
                   help="new attempts after refusals / malformed verdicts (default: %(default)s)")
    p.add_argument("--no_structured", action="store_true", help="do not send response_format to the judge")
    p.add_argument("--timeout", type=float, default=120.0, help="seconds per request (default: %(default)s)")
    p.add_argument("--price_in", type=float, default=None, help="USD per 1M prompt tokens (cost report)")
    p.add_argument("--price_out", type=float, default=None, help="USD per 1M completion tokens")
    p.add_argument("--cache", default=None, help="answer cache (default: <out>/critique/llm_cache)")
    p.add_argument("--batch_size", type=int, default=16, help="images per predict step (default: %(default)s)")
    p.add_argument("--concurrency", type=int, default=4,
                   help="images critiqued at once (concurrent LLM requests) (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="k-means initialisation of PPEPS-WGM (default: %(default)s)")
    p.add_argument("--accelerator", default="cpu", help="Lightning accelerator (default: %(default)s)")
    p.add_argument("--devices", default="1", help="devices per node (default: %(default)s)")
    p.add_argument("--num_nodes", type=int, default=1, help="nodes (default: %(default)s)")
    p.add_argument("--no_progress", action="store_true", help="no progress bar")
    return p


def _items(data: Path, classes: list[str]) -> list[tuple[str, int]]:
    from cft_lightning.concepts.validate import images_by_class

    found = images_by_class(data)
    unknown = sorted(set(found) - set(classes))
    if unknown:
        raise DataError(f"--data {data}: class folder(s) {unknown[:5]} are not in the class list")
    index = {c: i for i, c in enumerate(classes)}
    return [(rel, index[cls]) for cls, rels in sorted(found.items()) for rel in rels]


def main(argv: list[str] | None = None) -> None:
    """Entry point of `cft critique`."""
    args = _parser().parse_args(argv)
    import torch

    from cft_lightning.concepts.llm import CachedChat
    from cft_lightning.critique.critic import CriticAndJudge, OracleCritic, load_descriptions, load_judge_examples
    from cft_lightning.critique.run import CritiqueSettings, run_critique
    from cft_lightning.explain import load_models
    from cft_lightning.models.backbone import resolve_data_config

    if args.samples < 1 or args.segments < 2 or args.batch_size < 1:
        raise DataError("--samples >= 1, --segments >= 2 and --batch_size >= 1 are required")
    if not 0.0 <= args.min_success <= 1.0:
        raise DataError(f"--min_success must be a fraction in [0, 1], got {args.min_success}")
    data = Path(args.data)
    if not data.is_dir():
        raise DataError(f"--data {data} is not a folder")
    if args.attribution not in ("auto", "deeplift_shap"):  # a relevance method: resolved before the model loads
        from cft_lightning.relevance import relevance_class

        try:
            relevance_class(args.attribution)
        except UnknownPluginError as exc:
            raise UnknownPluginError(f"--attribution: {exc}; or auto, deeplift_shap") from exc
    model = list(load_models(args).values())[-1].eval()  # a checkpoint: its fine-tuned model
    classes = (Path(args.classes).read_text(encoding="utf-8").split() if args.classes
               else sorted(p.name for p in data.iterdir() if p.is_dir()))
    head = getattr(model, "num_classes", None)
    if head is not None and head < len(classes):
        raise DataError(f"the model's head has {head} classes, the class list {len(classes)}")
    items = _items(data, classes)
    config = resolve_data_config(model)
    baselines = None
    if args.attribution in ("auto", "deeplift_shap") and not is_vit(model):
        from cft_lightning.data.image_folder import load_image
        from cft_lightning.data.transforms import JointTransform

        transform = JointTransform(config, train=False)
        pick = torch.randperm(len(items), generator=torch.Generator().manual_seed(args.seed))[:args.shap_baselines]
        baselines = torch.stack([transform(load_image(data / items[i][0]))[0] for i in pick.tolist()])
        if len(baselines) < 2:
            raise DataError("DeepLIFT-SHAP needs at least 2 baseline images (--shap_baselines, and the data)")
    attributor = build_attributor(args.attribution, model, baselines)
    truth, usage, prices = None, None, None
    descriptions: dict[str, str] = {}
    if args.critic == "oracle":
        if not args.oracle_masks:
            raise DataError("--critic oracle needs --oracle_masks")
        critic: Any = OracleCritic(args.oracle_threshold)
        truth = (args.oracle_masks, args.oracle_kind)
        descriptions = load_descriptions(args.descriptions) if args.descriptions else {"*": "(oracle)"}
    else:
        if not args.descriptions:
            raise DataError("--critic lvlm needs --descriptions (a YAML/JSON file {class id: description})")
        descriptions = load_descriptions(args.descriptions)
        cache = args.cache or str(Path(args.out) / "critique" / "llm_cache")
        common = dict(base_url=args.base_url, api_key_env=args.api_key_env, temperature=args.temperature,
                      timeout=args.timeout)
        chat = CachedChat(args.llm, cache, max_tokens=args.critic_max_tokens, **common)
        judge = CachedChat(args.judge_llm or args.llm, cache, max_tokens=400, **common)
        critic = CriticAndJudge(chat, judge, load_judge_examples(args.judge_examples), retries=args.retries,
                            structured=not args.no_structured)
        usage = {"critic": chat.usage, "judge": judge.usage}
        if args.price_in is not None and args.price_out is not None:
            prices = (args.price_in, args.price_out)
    devices: Any = int(args.devices) if str(args.devices).isdigit() else args.devices
    settings = CritiqueSettings(samples=args.samples, segments=args.segments, target=args.target,
                                batch_size=args.batch_size, concurrency=args.concurrency, seed=args.seed,
                                progress=not args.no_progress,
                                trainer=dict(accelerator=args.accelerator, devices=devices, num_nodes=args.num_nodes))
    summary = run_critique(model, config, data, items, classes, attributor, critic, args.out, descriptions,
                           settings, truth=truth, usage=usage, prices=prices)
    if summary is not None:
        cost = f", cost ${summary['cost_usd']}" if "cost_usd" in summary else ""
        print(f"cft critique: {summary['masks_written']}/{summary['alignment_set']} corrective masks in {args.out} "
              f"({summary['with_spurious_segment']} with a spurious segment, {len(summary['failed'])} failed{cost}); "
              f"report: {args.out}/critique/report.md")
        written, wanted = summary["masks_written"], summary["alignment_set"]
        if written == 0 or written < args.min_success * wanted:
            first = next(iter(summary["failed"].items()), None)
            example = f" (e.g. {first[0]}: {first[1]})" if first else ""
            raise CommandFailed(f"{wanted - written} of {wanted} images got no corrective mask{example}; "
                                f"--min_success is {args.min_success:g}; every reason is in {args.out}/critique/"
                                "report.md, and a rerun critiques only the images without a mask")
