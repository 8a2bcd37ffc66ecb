"""What `cft demo` can be asked to do: its settings and the names of its methods and method groups.

Kept free of torch and Lightning imports so that `cft demo --help` is instant; the methods themselves (the
regularizer and relevance factories) are in `demo/pipeline.py`, which checks that both lists agree.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from cft_lightning.benchmarks.shortcut_parts import ShortcutPartsSpec

__all__ = ["ALL_METHODS", "CRITIC_KIND", "METHOD_GROUPS", "METHOD_NAMES", "METHOD_OPTIONS", "PROBE_METHODS",
           "TABLE7_METHODS", "DemoSettings"]

# every method `cft demo --methods` knows (`demo/pipeline.py` METHODS: what each one is)
METHOD_NAMES = (
    "plain",
    "object",
    "cft",
    "cft_cp",
    "cft_gt",
    "cft_rollout",
    "cft_posmax",
    "cft_release",
    "cft_self",
    "cft_frozen",
    "cft_full",
    "cft_gradcam",
    "cft_iia",
    "cft_ixg",
    "rrr",
    "gradmask",
    "rrda",
    "rrda_full",
    "robust_vit",
    "lvlm_va",
    "lvlm_va_1e5",
    "rrr_decoy_gt",
)
# methods that change more than the objective: `frozen` backbone parameter prefixes, `full_split` (every
# training image of every class, `DemoSettings.full_split_epochs` epochs, instead of the few-shot subset)
METHOD_OPTIONS: dict[str, dict[str, Any]] = {
    "cft_frozen": {"frozen": ["patch_embed", "pos_embed", "cls_token", "blocks.0"]},
    "cft_full": {"full_split": True},
    "rrda_full": {"full_split": True},
}
# `cft demo --methods all`: the controls, CFT (three relevance regimes) and every baseline
ALL_METHODS = ["plain", "object", "cft", "cft_cp", "cft_rollout", "rrr", "gradmask", "rrda", "robust_vit",
               "lvlm_va", "rrda_full"]
# `cft demo --methods probes`: the variants that ask why CFT moves maps but not decisions
PROBE_METHODS = ["cft", "cft_gt", "cft_self", "cft_posmax", "cft_release", "cft_frozen", "cft_full"]
# `cft demo --methods table7`: CFT with each relevance method (the paper's Table 7 ablation)
TABLE7_METHODS = ["cft", "cft_rollout", "cft_iia", "cft_gradcam", "cft_ixg"]
METHOD_GROUPS = {"all": ALL_METHODS, "table7": TABLE7_METHODS, "probes": PROBE_METHODS}
CRITIC_KIND = "critic"


@dataclass
class DemoSettings:
    """Everything the demo does, with defaults that finish in minutes on 2 CPU cores."""

    out: str = "runs/demo"
    seeds: list[int] = field(default_factory=lambda: [0])
    methods: list[str] = field(default_factory=lambda: ["plain", "object", "cft"])
    benchmark: ShortcutPartsSpec = field(default_factory=ShortcutPartsSpec)
    data_dir: str | None = None  # default: the package cache
    depth: int = 4
    embed_dim: int = 192
    patch_size: int = 8
    # the starting model (demo/start.py): "pretrained" (parts first, then the biased split) or "scratch"
    start: str = "pretrained"
    # stage 1 (parts, upstream data) of the pretrained start: 30 epochs (calibrated, docs/demo.md); the scratch
    # start's only stage keeps its 15 epochs (`scratch_epochs`)
    pretrain_epochs: int = 30
    pretrain_lr: float = 1e-3
    scratch_epochs: int = 15
    shortcut_epochs: int = 6  # stage 2 of the pretrained start: the biased training split (calibrated)
    shortcut_lr: float = 1e-3
    finetune_epochs: int = 50  # the paper's 50 epochs
    finetune_lr: float = 1e-4
    images_per_class: int = 3  # the paper fine-tunes on three images per class
    class_fraction: float = 1.0  # every class fine-tuned; 0.5: the paper's Table 4 split
    full_split_epochs: int = 2  # methods with METHOD_OPTIONS full_split (1,200 images at the default size)
    fewshot_pool: str = "train"  # "train" (biased, like the rest) or "counterfactual" (off-background only)
    # "benchmark": the generator's masks; "pipeline": the concept bank validated and grounded by the mask stage
    # (cft concepts validate + cft masks generate, with the oracle grounder standing in for Grounded-SAM)
    mask_source: str = "benchmark"
    # LVLM-VA's corrective masks: "oracle_mask" (the background mask on the low-entropy half, no critique
    # stage) or "pipeline" (the critique stage: sampling, attribution, PPEPS-WGM, oracle critic on the
    # benchmark's decoy masks; needs a decoy benchmark)
    critic: str = "oracle_mask"
    critique_segments: int = 4
    batch_size: int = 8
    # PyTorch threads for everything the demo trains and tests. Float sums run in another order on another
    # thread count, and 30 epochs amplify that into another starting model (seed 0 on 2 threads: stage-1 OOD
    # 66.0 instead of 80.0); on 1 thread the models and numbers in docs/demo.md come out again (checked on
    # another run of stage 1: the same accuracies to the last image) with the same torch build.
    threads: int = 1
    progress: bool = True

    def backbone(self, checkpoint: str | None) -> Any:
        """The demo ViT's `BackboneSpec`, with weights from `checkpoint` (None: random)."""
        from cft_lightning.models import BackboneSpec

        kwargs = dict(img_size=self.benchmark.image_size, patch_size=self.patch_size, depth=self.depth,
                      embed_dim=self.embed_dim, num_heads=3)
        return BackboneSpec("vit_tiny_patch16_224", pretrained=False, checkpoint_path=checkpoint,
                            num_classes=self.benchmark.num_classes, model_kwargs=kwargs)
