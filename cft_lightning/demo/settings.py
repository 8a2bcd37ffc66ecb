"""What `cft demo` can be asked to do: its settings, its recipes (the methods it compares) and method groups.

Kept free of torch and Lightning imports so that `cft demo --help` is instant. A recipe names a registered
regularizer and relevance method (`cft_lightning.regularizers` / `cft_lightning.relevance`) with the arguments
they are built with; `demo/pipeline.py` builds them through the registries. Beside the recipes, `--methods`
takes `REGULARIZER[+RELEVANCE]`, each a registered name or a class path (`parse_method`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from cft_lightning._registry import SHIPPED_REGULARIZERS, SHIPPED_RELEVANCE
from cft_lightning.benchmarks.shortcut_parts import ShortcutPartsSpec
from cft_lightning.errors import PluginError

__all__ = ["ALL_METHODS", "CRITIC_KIND", "DEFAULT_RELEVANCE", "METHOD_GROUPS", "METHOD_NAMES", "METHOD_OPTIONS",
           "PROBE_METHODS", "RECIPES", "TABLE7_METHODS", "DemoSettings", "Recipe", "method_syntax", "parse_method"]


@dataclass(frozen=True)
class Recipe:
    """One `cft demo` method: a regularizer and (when it is guided) a relevance method, each a registered name
    or a class path, with the arguments it is built with."""

    regularizer: str
    relevance: str | None = None
    regularizer_args: dict[str, Any] = field(default_factory=dict)
    relevance_args: dict[str, Any] = field(default_factory=dict)


# the relevance method of a `REGULARIZER` given without `+RELEVANCE` whose requirements ask for one
DEFAULT_RELEVANCE = "attnlrp"

# every recipe `cft demo --methods` knows; every method fine-tunes the same pretrained model with the same
# learning rate and epochs (the demo's), and the loss weights of its paper (CFT Table 8 for ViT-B)
RECIPES: dict[str, Recipe] = {
    "plain": Recipe("plain", None, {"consistency_target": "label"}),
    "object": Recipe("object", "attnlrp"),
    "cft": Recipe("cft", "attnlrp"),
    # CFT with CP-LRP: no relevance through q and k (LXT's recommendation for ViTs)
    "cft_cp": Recipe("cft", "cp_lrp"),
    # the paper's "w/ ground-truth" ablation: consistency CE on the label instead of the model's own argmax
    "cft_gt": Recipe("cft", "attnlrp", {"consistency_target": "label"}),
    # the CFT release's regime: gradient rollout with attention gradients held constant
    "cft_rollout": Recipe("cft", "rollout"),
    # probes of why CFT moves maps but not decisions (docs/demo.md):
    # the map normalised by its positive maximum instead of min-max (a flat background at the minimum no
    # longer counts as "off"), the prediction explained instead of the label, the input end frozen, and
    # masks for the whole training split instead of a few images
    "cft_posmax": Recipe("cft", "attnlrp", relevance_args={"normalize": "positive_max"}),
    # the release's loss form: BCE averaged over all cells, so the (large) background outweighs the concepts
    "cft_release": Recipe("cft", "attnlrp", {"loss_form": "release"}),
    "cft_self": Recipe("cft", "attnlrp", {"relevance_target": "self"}),
    "cft_frozen": Recipe("cft", "attnlrp"),
    "cft_full": Recipe("cft", "attnlrp"),
    # the paper's Table 7: CFT with other relevance methods
    "cft_gradcam": Recipe("cft", "gradcam"),
    "cft_iia": Recipe("cft", "iia", relevance_args={"steps": 10}),
    "cft_ixg": Recipe("cft", "ixg"),
    "rrr": Recipe("rrr"),
    "gradmask": Recipe("gradmask"),
    "rrda": Recipe("rrda"),
    # positive control: RRDA with the object masks of the whole biased training split (every image, half of
    # them pasted on another class's background): shows the benchmark registers a repair when one happens
    "rrda_full": Recipe("rrda"),
    "robust_vit": Recipe("robust_vit", "rollout"),
    # LVLM-VA's alignment with an oracle critic: the benchmark's background masks as corrective masks.
    # These three keep the penalty summed over the batch of 8 (`batch_sum`), the form docs/demo.md's numbers
    # were measured with: 8 times the paper's per-image lambda (`reduction="sum"`, LVLMCritic's default)
    "lvlm_va": Recipe("lvlm_va", None, {"alignment_ratio": 0.5, "reduction": "batch_sum"}),
    # the same with LVLM-VA's DecoyMNIST lambda (1e5; lambda = 1 above is its value on real data)
    "lvlm_va_1e5": Recipe("lvlm_va", None, {"grad_weight": 1e5, "alignment_ratio": 0.5, "reduction": "batch_sum"}),
    # LVLM-VA's upper bound on a decoy benchmark: RRR on the ground-truth decoy masks of every few-shot image
    "rrr_decoy_gt": Recipe("rrr", None, {"grad_weight": 1.0, "cls_weight": 1.0, "mask_kind": "decoy",
                                         "mask_role": "irrelevant", "reduction": "batch_sum"}),
}
METHOD_NAMES = tuple(RECIPES)
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


def method_syntax() -> str:
    """What `--methods` takes besides the recipes and groups, for help texts and errors."""
    return (f"REGULARIZER[+RELEVANCE], each a registered name or a class path pkg.module.Class (regularizers: "
            f"{', '.join(SHIPPED_REGULARIZERS)}; relevance methods: {', '.join(SHIPPED_RELEVANCE)}; a guided "
            f"regularizer without +RELEVANCE gets {DEFAULT_RELEVANCE})")


def parse_method(spec: str) -> Recipe:
    """The recipe of a `--methods` entry: a named recipe, or `REGULARIZER[+RELEVANCE]` built with defaults.

    The entry names the method's folder and its row in the tables, so it is kept as written."""
    if spec in RECIPES:
        return RECIPES[spec]
    regularizer, plus, relevance = spec.partition("+")
    if not regularizer or (plus and not relevance) or "+" in relevance or "/" in spec or spec.strip() != spec:
        raise PluginError(f"cft demo --methods {spec!r}: expected a recipe, a group or {method_syntax()}")
    return Recipe(regularizer, relevance or None)


@dataclass
class DemoSettings:
    """Everything the demo does, with defaults that finish in minutes on 2 CPU cores.

    `cft demo` takes each field as a flag of the same name (the benchmark's fields too: `--num_classes`, ...),
    except the demo ViT's architecture (`depth`, `embed_dim`, `patch_size`), `critique_segments`, `batch_size`
    and `progress` (`--no_progress`), which stay at the values docs/demo.md's numbers were made with.

    Args:
        out: output folder
        seeds: seeds to run; each has its own starting model and few-shot draw
        methods: fine-tuning methods compared on the same starting model: recipes, groups, or
            REGULARIZER[+RELEVANCE] (`cft demo --help` lists them after the options; docs/demo.md)
        benchmark: the shortcut-parts benchmark that is generated (cached under `data_dir`)
        data_dir: benchmark folder (default: $CFT_CACHE or ~/.cache/cft_lightning, where the starting models
            are cached too)
        depth: transformer blocks of the demo ViT
        embed_dim: token width of the demo ViT
        patch_size: patch side of the demo ViT in pixels
        start: the starting model: 'pretrained' learns the parts on upstream images with uninformative
            backgrounds, then the biased split (the paper's regime); 'scratch' only the biased split
        pretrain_epochs: stage 1 of the pretrained start (parts, upstream data; calibrated, docs/demo.md)
        pretrain_lr: learning rate of stage 1 and of the scratch start
        scratch_epochs: the one stage of the scratch start
        shortcut_epochs: stage 2 of the pretrained start, on the biased training split (calibrated)
        shortcut_lr: learning rate of stage 2
        finetune_epochs: fine-tuning epochs of every few-shot method (the paper's 50)
        finetune_lr: AdamW learning rate of every method
        images_per_class: P, fine-tuning images per class (the paper's 3)
        class_fraction: share of the classes fine-tuned on: 1 (every class) or 0.5 (the paper's Table 4 split:
            OOD top-1 reported on fine-tuned and held-out classes)
        full_split_epochs: epochs of the methods trained on the whole training split (rrda_full, cft_full)
        fewshot_pool: few-shot images from the biased training split (train), or only those off their class's
            background (counterfactual)
        mask_source: masks for fine-tuning: the benchmark's, or made by the mask stage (pipeline: concepts
            validated and grounded, the oracle grounder standing in for Grounded-SAM)
        critic: lvlm_va's corrective masks: the background mask on the low-entropy half (oracle_mask), or the
            critique stage with the oracle critic on the decoy masks (pipeline; needs a decoy benchmark)
        critique_segments: PPEPS-WGM segments per image of the critique stage (critic pipeline)
        batch_size: training batch size of every stage and method
        threads: PyTorch threads for training and testing (1: the starting models and numbers of docs/demo.md
            come out again with the same torch build; more threads are faster but train other models, cached
            separately)
        progress: progress bars (else one line per stage)
    """

    out: str = "runs/demo"
    seeds: list[int] = field(default_factory=lambda: [0])
    methods: list[str] = field(default_factory=lambda: ["plain", "object", "cft"])
    benchmark: ShortcutPartsSpec = field(default_factory=ShortcutPartsSpec)
    data_dir: str | None = None  # default: the package cache
    depth: int = 4
    embed_dim: int = 192
    patch_size: int = 8
    # the starting model (demo/start.py): "pretrained" (parts first, then the biased split) or "scratch"
    start: Literal["pretrained", "scratch"] = "pretrained"
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
    fewshot_pool: Literal["train", "counterfactual"] = "train"  # biased, like the rest, or off-background only
    # "benchmark": the generator's masks; "pipeline": the concept bank validated and grounded by the mask stage
    # (cft concepts validate + cft masks generate, with the oracle grounder standing in for Grounded-SAM)
    mask_source: Literal["benchmark", "pipeline"] = "benchmark"
    # LVLM-VA's corrective masks: "oracle_mask" (the background mask on the low-entropy half, no critique
    # stage) or "pipeline" (the critique stage: sampling, attribution, PPEPS-WGM, oracle critic on the
    # benchmark's decoy masks; needs a decoy benchmark)
    critic: Literal["oracle_mask", "pipeline"] = "oracle_mask"
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
