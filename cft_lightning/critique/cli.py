"""`cft critique`: LVLM-VA's corrective masks for a trained model, then `cft fit` with the `LVLMCritic` regularizer.

    cft critique --ckpt runs/isic/last.ckpt --data data/isic/train --descriptions isic_classes.yaml \\
        --out data/masks/isic_critic --llm gpt-4o --samples 64 --segments 4 --devices 4
    cft fit --config configs/baselines/lvlm_va_resnet50.yaml --data.masks data/masks/isic_critic ...

The key is read from the environment variable `--api_key_env` (default OPENAI_API_KEY) and handed to the
client only. `--critic oracle --oracle_masks STORE --oracle_kind decoy` replaces the LLMs by ground truth. The
options also come from YAML (`--config FILE`; `--print_config` writes one).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from cft_lightning._tool_cli import Tool
from cft_lightning.critique.attribution import ATTRIBUTIONS, build_attributor, is_vit
from cft_lightning.errors import CommandFailed, DataError, UnknownPluginError

__all__ = ["TOOL", "critique_command", "main"]


def _items(data: Path, classes: list[str]) -> list[tuple[str, int]]:
    from cft_lightning.concepts.validate import images_by_class

    found = images_by_class(data)
    unknown = sorted(set(found) - set(classes))
    if unknown:
        raise DataError(f"--data {data}: class folder(s) {unknown[:5]} are not in the class list")
    index = {c: i for i, c in enumerate(classes)}
    return [(rel, index[cls]) for cls, rels in sorted(found.items()) for rel in rels]


def critique_command(
    data: str,
    out: str,
    ckpt: str | None = None,
    model: str | None = None,
    weights: str | None = None,
    pretrained: bool = False,
    num_classes: int | None = None,
    classes: str | None = None,
    descriptions: str | None = None,
    samples: int = 64,
    segments: int = 4,
    min_success: float = 1.0,
    target: Literal["label", "prediction"] = "label",
    attribution: str = "auto",
    shap_baselines: int = 8,
    critic: Literal["lvlm", "oracle"] = "lvlm",
    oracle_masks: str | None = None,
    oracle_kind: str = "decoy",
    oracle_threshold: float = 0.5,
    llm: str = "gpt-4o",
    judge_llm: str | None = None,
    base_url: str | None = None,
    api_key_env: str = "OPENAI_API_KEY",
    judge_examples: str | None = None,
    critic_max_tokens: int = 1500,
    temperature: float = 0.0,
    retries: int = 2,
    no_structured: bool = False,
    timeout: float = 120.0,
    price_in: float | None = None,
    price_out: float | None = None,
    cache: str | None = None,
    batch_size: int = 16,
    concurrency: int = 4,
    seed: int = 0,
    accelerator: str = "cpu",
    devices: int | str = 1,
    num_nodes: int = 1,
    no_progress: bool = False,
) -> None:
    """LVLM-VA corrective masks (mask kind `critic`) for a `cft fit` checkpoint (--ckpt) or a timm model (--model).

    Args:
        data: training image folder (<class>/<image>)
        out: mask store for the `critic` masks
        ckpt: a `cft fit` checkpoint: its fine-tuned model is critiqued
        model: any timm model name (with --weights or --pretrained)
        weights: with --model: a local weight file
        pretrained: with --model: timm's hub weights
        num_classes: with --model: head size (null: the model's)
        classes: file with one class id per line in the model's head order (null: the sorted class folders)
        descriptions: YAML/JSON {class id: expert description} ('*' = fallback); required for --critic lvlm
        samples: N, the size of the alignment set: the N training images of lowest predictive entropy (LVLM-VA
            does not publish its N)
        segments: J, PPEPS-WGM segments per image that the critic judges (unpublished)
        min_success: fraction of the alignment set that must get a corrective mask, else exit 1 after writing the
            masks and the report (1: every image)
        target: class the attribution explains
        attribution: auto (deeplift_shap for CNNs/MLPs, ixg for ViTs), deeplift_shap, a relevance method
            (listed after the options; a name a plugin registers, CFT_PLUGINS) or a class path pkg.module.Class
        shap_baselines: DeepLIFT-SHAP: K random training images
        critic: lvlm: the critic and judge LLMs; oracle: ground-truth masks decide
        oracle_masks: --critic oracle: mask store with the ground-truth spurious masks
        oracle_kind: --critic oracle: their mask kind
        oracle_threshold: --critic oracle: share of a segment inside the spurious mask that makes it spurious
        llm: critic model (it must read images), as the endpoint names it
        judge_llm: judge model (null: --llm)
        base_url: OpenAI-compatible endpoint (null: OpenAI or OPENAI_BASE_URL)
        api_key_env: environment variable holding the key (never written anywhere)
        judge_examples: few-shot examples YAML (null: the shipped ones)
        critic_max_tokens: longest critic answer in tokens
        temperature: sampling temperature
        retries: new attempts after refusals / malformed verdicts
        no_structured: do not send response_format to the judge
        timeout: seconds per request
        price_in: USD per 1M prompt tokens (cost report)
        price_out: USD per 1M completion tokens (cost report)
        cache: answer cache (null: <out>/critique/llm_cache)
        batch_size: images per predict step
        concurrency: images critiqued at once (concurrent LLM requests)
        seed: k-means initialisation of PPEPS-WGM
        accelerator: Lightning accelerator
        devices: devices per node, a number or auto
        num_nodes: nodes (machines)
        no_progress: no progress bar
    """
    from cft_lightning.explain import check_source, load_models

    check_source(ckpt, model)  # the flags' own checks first: one line, before torch loads
    if samples < 1 or segments < 2 or batch_size < 1:
        raise DataError("--samples >= 1, --segments >= 2 and --batch_size >= 1 are required")
    if not 0.0 <= min_success <= 1.0:
        raise DataError(f"--min_success must be a fraction in [0, 1], got {min_success}")
    folder = Path(data)
    if not folder.is_dir():
        raise DataError(f"--data {folder} is not a folder")
    import torch

    from cft_lightning.concepts.llm import CachedChat
    from cft_lightning.critique.critic import CriticAndJudge, OracleCritic, load_descriptions, load_judge_examples
    from cft_lightning.critique.run import CritiqueSettings, run_critique
    from cft_lightning.models.backbone import resolve_data_config

    if attribution not in ("auto", "deeplift_shap"):  # a relevance method: resolved before the model loads
        from cft_lightning.relevance import relevance_class

        try:
            relevance_class(attribution)
        except UnknownPluginError as exc:
            raise UnknownPluginError(f"--attribution: {exc}; or auto, deeplift_shap") from exc
    models = load_models(ckpt, model, pretrained, weights, num_classes)
    network = list(models.values())[-1].eval()  # a checkpoint: its fine-tuned model
    class_ids = (Path(classes).read_text(encoding="utf-8").split() if classes
                 else sorted(p.name for p in folder.iterdir() if p.is_dir()))
    head = getattr(network, "num_classes", None)
    if head is not None and head < len(class_ids):
        raise DataError(f"the model's head has {head} classes, the class list {len(class_ids)}")
    items = _items(folder, class_ids)
    config = resolve_data_config(network)
    baselines = None
    if attribution in ("auto", "deeplift_shap") and not is_vit(network):
        from cft_lightning.data.image_folder import load_image
        from cft_lightning.data.transforms import JointTransform

        transform = JointTransform(config, train=False)
        pick = torch.randperm(len(items), generator=torch.Generator().manual_seed(seed))[:shap_baselines]
        baselines = torch.stack([transform(load_image(folder / items[i][0]))[0] for i in pick.tolist()])
        if len(baselines) < 2:
            raise DataError("DeepLIFT-SHAP needs at least 2 baseline images (--shap_baselines, and the data)")
    attributor = build_attributor(attribution, network, baselines)
    truth, usage, prices = None, None, None
    judge_by: Any
    if critic == "oracle":
        if not oracle_masks:
            raise DataError("--critic oracle needs --oracle_masks")
        judge_by = OracleCritic(oracle_threshold)
        truth = (oracle_masks, oracle_kind)
        expert = load_descriptions(descriptions) if descriptions else {"*": "(oracle)"}
    else:
        if not descriptions:
            raise DataError("--critic lvlm needs --descriptions (a YAML/JSON file {class id: description})")
        expert = load_descriptions(descriptions)
        answers = cache or str(Path(out) / "critique" / "llm_cache")
        common = dict(base_url=base_url, api_key_env=api_key_env, temperature=temperature, timeout=timeout)
        chat = CachedChat(llm, answers, max_tokens=critic_max_tokens, **common)
        judge = CachedChat(judge_llm or llm, answers, max_tokens=400, **common)
        judge_by = CriticAndJudge(chat, judge, load_judge_examples(judge_examples), retries=retries,
                                  structured=not no_structured)
        usage = {"critic": chat.usage, "judge": judge.usage}
        if price_in is not None and price_out is not None:
            prices = (price_in, price_out)
    settings = CritiqueSettings(samples=samples, segments=segments, target=target, batch_size=batch_size,
                                concurrency=concurrency, seed=seed, progress=not no_progress,
                                trainer=dict(accelerator=accelerator, devices=devices, num_nodes=num_nodes))
    summary = run_critique(network, config, folder, items, class_ids, attributor, judge_by, out, expert,
                           settings, truth=truth, usage=usage, prices=prices)
    if summary is not None:
        cost = f", cost ${summary['cost_usd']}" if "cost_usd" in summary else ""
        print(f"cft critique: {summary['masks_written']}/{summary['alignment_set']} corrective masks in {out} "
              f"({summary['with_spurious_segment']} with a spurious segment, {len(summary['failed'])} failed{cost}); "
              f"report: {out}/critique/report.md")
        written, wanted = summary["masks_written"], summary["alignment_set"]
        if written == 0 or written < min_success * wanted:
            first = next(iter(summary["failed"].items()), None)
            example = f" (e.g. {first[0]}: {first[1]})" if first else ""
            raise CommandFailed(f"{wanted - written} of {wanted} images got no corrective mask{example}; "
                                f"--min_success is {min_success:g}; every reason is in {out}/critique/"
                                "report.md, and a rerun critiques only the images without a mask")


TOOL = Tool(critique_command, prog="cft critique", epilog=(
    f"--attribution takes {', '.join(ATTRIBUTIONS)}, a relevance method a plugin registers (CFT_PLUGINS) or a "
    "class path pkg.module.Class. Then: cft fit --config configs/baselines/lvlm_va_resnet50.yaml --data.masks "
    "OUT (the `LVLMCritic` regularizer reads the `critic` masks)."))


def main(argv: list[str] | None = None) -> None:
    """Entry point of `cft critique`: flags, or a YAML file with --config (`cft critique --print_config`)."""
    TOOL(argv)
