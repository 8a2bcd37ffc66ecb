"""`GuidedFineTuner`: the LightningModule that fine-tunes a timm backbone with a relevance-guided objective.

It holds three plugins (the backbone spec, a `RelevanceMethod` and a `Regularizer`) and a frozen
reference copy of the starting model. The reference is the "Original" column of every result table and
the optional consistency target; it runs under `torch.inference_mode()`, is not a registered submodule
(so it never enters a checkpoint or the DDP wrapper) and follows the module across devices and dtypes.
"""

from __future__ import annotations

import copy
import importlib
import json
import math
from collections.abc import Callable
from dataclasses import asdict
from typing import Any

import lightning as L
import torch
from lightning.pytorch.core.mixins.hparams_mixin import _given_hyperparameters
from lightning.pytorch.plugins.precision import MixedPrecision
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor, nn

from cft_lightning._plugins import Requirements, plugin_config
from cft_lightning._precision import check_run_precision
from cft_lightning.errors import NonFiniteLossError, UnsupportedModelError
from cft_lightning.evaluation.metrics import accuracy_metrics
from cft_lightning.evaluation.stage import Evaluation
from cft_lightning.evaluation.test_plan import TestPlan, plan_of
from cft_lightning.models.backbone import BackboneSpec, build_backbone, freeze, resolve_data_config
from cft_lightning.models.input_size import input_size_warning, native_image_size
from cft_lightning.regularizers.base import Regularizer, RegularizerOutput
from cft_lightning.relevance.base import RelevanceMethod

__all__ = ["DATA_CONFIG_KEY", "GuidedFineTuner", "NonFiniteLossError"]

DATA_CONFIG_KEY = "cft_data_config"  # the checkpoint entry with the run's data config (`on_save_checkpoint`)

_STAGES = ("train", "val")  # test metrics live in the Evaluator


def _from_config(value: Any) -> Any:
    """A plugin given as `{"class_path": ..., "init_args": {...}}` (hparams of a checkpoint), instantiated."""
    if not (isinstance(value, dict) and "class_path" in value):
        return value
    module_name, _, class_name = value["class_path"].rpartition(".")
    cls = getattr(importlib.import_module(module_name), class_name)
    return cls(**value.get("init_args", {}))


def _freeze_by_prefix(model: nn.Module, prefixes: list[str]) -> list[str]:
    """Set requires_grad=False on the parameters whose name equals or starts with `prefix.`; the frozen names."""
    names = [n for n, _ in model.named_parameters()]
    matches = {p: [n for n in names if n == p or n.startswith(p.rstrip(".") + ".")] for p in prefixes}
    unknown = [p for p, found in matches.items() if not found]
    if unknown:
        raise ValueError(f"model.frozen: {unknown} name no parameter of the backbone (e.g. {names[:4]})")
    chosen = {n for found in matches.values() for n in found}
    for name, param in model.named_parameters():
        if name in chosen:
            param.requires_grad_(False)
    if chosen and len(chosen) == len(names):
        raise ValueError("model.frozen freezes every parameter of the backbone: nothing would be trained")
    return sorted(chosen)


def _check_relevance(relevance: RelevanceMethod, model: nn.Module, name: str, training: bool) -> None:
    """One line naming the method and the model when `relevance` cannot explain `model`: in training mode when
    the objective trains on the maps, else in eval mode (test and pictures only: dropout does not matter)."""
    was_training = model.training
    model.train(training)
    try:
        relevance.check_model(model)
    except UnsupportedModelError as err:
        raise UnsupportedModelError(f"model.relevance {type(relevance).__name__} cannot explain {name}: {err}") from err
    finally:
        model.train(was_training)


class GuidedFineTuner(L.LightningModule):
    """Fine-tunes `backbone` with `regularizer` (which may guide the `relevance` maps), logging every loss term
    and the top-1/top-5 accuracy of the fine-tuned model and of its frozen starting point; `cft test` scores
    both with an `Evaluation` built from the data module's `TestPlan` (received in `setup`)."""

    def __init__(
        self,
        backbone: BackboneSpec,
        regularizer: Regularizer,
        relevance: RelevanceMethod | None = None,
        lr: float = 5e-7,
        weight_decay: float = 1e-4,
        betas: tuple[float, float] = (0.9, 0.999),
        lr_step_size: int = 2,
        lr_gamma: float = 0.85,
        track_reference: bool = True,
        reference_train_metrics: bool = False,
        frozen: list[str] | None = None,
    ) -> None:
        """
        Args:
            backbone: the timm model and its starting weights.
            regularizer: the training objective (`CFT`, `ObjectMaskGuidance`, `PlainFineTuning`, ...).
            relevance: the relevance method the objective guides (`AttnLRP`, `GradientRollout`); unused by
                objectives without a relevance term.
            lr: AdamW learning rate (paper Table 8: ViT-B 5e-7, DeiT-III 8e-7, DINOv2 6e-7, ConvNeXt-V2 3e-6).
            weight_decay: AdamW weight decay (1e-4 in the CFT and RobustViT code).
            betas: AdamW betas.
            lr_step_size: epochs between learning-rate decays (the release: lr * 0.85 ** (epoch // 2)).
                0 keeps the learning rate constant.
            lr_gamma: decay factor of each step.
            track_reference: keep the frozen reference (its accuracy is logged beside the model's, and
                `consistency_target: reference` needs it). False saves its memory and forward passes.
            reference_train_metrics: also log the reference's accuracy on the training batches
                (`train/ref_acc1`, ...). Off by default: it costs one inference-mode forward per training step
                (a third of a plain step) for a number validation and test already give; the forward runs
                anyway when the objective's consistency target is the reference.
            frozen: backbone parameters kept fixed, by name prefix (e.g. `[patch_embed, pos_embed, cls_token,
                blocks.0]`: the input end); a prefix that names no parameter is an error.
        """
        super().__init__()
        # Checkpoints saved outside the CLI store the plugins as plain data (see below): accept that form too.
        backbone = BackboneSpec(**backbone) if isinstance(backbone, dict) else backbone
        regularizer, relevance = _from_config(regularizer), _from_config(relevance)
        if lr <= 0:
            raise ValueError(f"model.lr must be positive, got {lr}")
        if lr_step_size < 0 or not 0 < lr_gamma <= 1:
            raise ValueError(f"model.lr_step_size must be >= 0 and lr_gamma in (0, 1]; got {lr_step_size}, {lr_gamma}")
        if not isinstance(regularizer, Regularizer):
            raise ValueError(f"model.regularizer must be a cft_lightning.regularizers.Regularizer, got "
                             f"{type(regularizer).__name__}")
        needs = regularizer.requirements
        if needs.relevance and relevance is None:
            raise ValueError(f"model.regularizer {type(regularizer).__name__} needs model.relevance to be set")
        if needs.reference_logits and not track_reference:
            raise ValueError("model.regularizer consistency_target 'reference' needs model.track_reference: true")
        # Checkpoints keep the hyperparameters; loggers do not get them (logger=False): the run's full config
        # (config.yaml beside the logs, the W&B run config) is the one record, not a second partial copy.
        if _given_hyperparameters.get() is not None:
            self.save_hyperparameters(logger=False)  # under the CLI: the plain config dict (checkpoint-loadable)
        else:
            self.save_hyperparameters(ignore=["backbone", "regularizer", "relevance"], logger=False)
            self.hparams.update(backbone=asdict(backbone), regularizer=plugin_config(regularizer),
                                relevance=None if relevance is None else plugin_config(relevance))
        self.backbone_spec = backbone
        self.backbone = build_backbone(backbone)
        if relevance is not None:  # fail at start-up, not at the first step (training, test alignment, overlays)
            guided = needs.relevance
            _check_relevance(relevance, self.backbone, backbone.name, training=guided)
            if guided and relevance.differentiability == "none":
                rank_zero_warn(
                    f"model.relevance {type(relevance).__name__} is not differentiable: the relevance terms of "
                    f"{type(regularizer).__name__} are constants and only its other terms train the model"
                )
        self.regularizer = regularizer
        self.relevance = relevance
        self.lr, self.weight_decay, self.betas = lr, weight_decay, tuple(betas)
        self.lr_step_size, self.lr_gamma = lr_step_size, lr_gamma
        self.num_classes = int(self.backbone.num_classes)
        if self.num_classes < 2:
            raise ValueError(
                f"the backbone head has {self.num_classes} output(s); a classifier needs at least 2: "
                "set model.backbone.num_classes"
            )
        self.data_config = resolve_data_config(self.backbone)
        self.frozen = _freeze_by_prefix(self.backbone, list(frozen or []))
        # Not a submodule: excluded from state_dict, parameters(), DDP; moved along in `_apply`.
        self.reference_train_metrics = reference_train_metrics
        reference = freeze(copy.deepcopy(self.backbone)) if track_reference else None
        object.__setattr__(self, "_reference", reference)
        self.metrics = nn.ModuleDict(
            {f"{stage}_{who}": accuracy_metrics(self.num_classes) for stage in _STAGES for who in ("model", "ref")}
        )
        self._warned_inference = False
        self._warned_val_masks = False
        self._warned_input_size = False
        self.test_plan: TestPlan | None = None  # what the data module describes (`setup`: `plan_of`)
        self.evaluation: Evaluation | None = None  # the current `cft test` run (`on_test_start`)

    @property
    def requirements(self) -> Requirements:
        """What the regularizer needs from the run (its declaration; the data module reads it at setup)."""
        return self.regularizer.requirements

    # ------------------------------------------------------------------ reference model
    @property
    def reference(self) -> nn.Module | None:
        """The frozen starting model (None with `track_reference: false`)."""
        return self._reference

    def _apply(self, fn: Callable[[Tensor], Tensor], *args: Any, **kwargs: Any) -> GuidedFineTuner:
        super()._apply(fn, *args, **kwargs)
        if self._reference is not None:
            self._reference._apply(fn, *args, **kwargs)
        return self

    def train(self, mode: bool = True) -> GuidedFineTuner:
        super().train(mode)
        if self._reference is not None:
            self._reference.eval()
        return self

    def reference_logits(self, images: Tensor) -> Tensor | None:
        """Logits of the frozen reference, computed under inference mode (a plain tensor is returned)."""
        if self._reference is None:
            return None
        with torch.inference_mode():
            logits = self._reference(images)
        return logits.clone()  # a normal tensor, safe to use as a target in autograd-tracked code

    def forward(self, images: Tensor) -> Tensor:
        return self.backbone(images)

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Keep the run's data config in the checkpoint (`data.data_config`, else the model's timm config), so
        `cft explain --ckpt` sees images as the run did."""
        plan = self.test_plan
        config = plan.data_config if plan is not None and plan.data_config is not None else self.data_config
        checkpoint[DATA_CONFIG_KEY] = json.loads(json.dumps(dict(config)))  # plain data: loads weights-only

    # ------------------------------------------------------------------ setup checks
    def setup(self, stage: str) -> None:
        """Receive the data module's `TestPlan` (the one hand-off from data to model, `test_plan.plan_of`) and
        check the data against the model, and the run's precision against what the plugins declare."""
        check_run_precision(self.trainer.precision, stage, self.relevance, self.regularizer)
        datamodule = self.trainer.datamodule
        self.test_plan = plan_of(datamodule)
        if datamodule is None:
            return
        plan = self.test_plan
        n_data = len(plan.class_names) if plan is not None and plan.class_names is not None else None
        if n_data is not None and n_data > self.num_classes:
            raise ValueError(
                f"the data has {n_data} classes but the backbone head has {self.num_classes}: set "
                f"model.backbone.num_classes: {n_data} (or use an ImageNet-indexed class list with a 1000-class head)"
            )
        own_config = plan is None or plan.data_config in (None, self.data_config)
        if own_config and not self._warned_input_size:
            self._warned_input_size = True  # once per run: the data's size against the model's timm input size
            patch_model = getattr(getattr(self.backbone, "patch_embed", None), "img_size", None) is not None
            message = input_size_warning(native_image_size(datamodule, stage), self.data_config["input_size"],
                                         self.backbone_spec.name, patch_model)
            if message:
                rank_zero_warn(message)
        benchmarks = [s.name for s in plan.splits if s.imagenet_logits] if plan is not None else []
        if stage == "test" and benchmarks and self.num_classes != 1000:
            raise ValueError(
                f"benchmarks {benchmarks} score ImageNet-1k logits, but the model head has {self.num_classes} "
                "classes: test an ImageNet classifier (model.backbone.num_classes: null or 1000)"
            )
        if stage == "fit":
            available = set(getattr(datamodule, "mask_kinds", None) or [])
            missing = [k for k in self.requirements.masks if k not in available]
            if missing:
                raise ValueError(
                    f"model.regularizer {type(self.regularizer).__name__} needs mask kinds {missing}, but "
                    f"data.mask_kinds is {sorted(available)}: add them and set data.masks to a mask store"
                )

    # ------------------------------------------------------------------ steps
    def _log_terms(self, stage: str, out: RegularizerOutput, batch_size: int) -> None:
        on_step = stage == "train"
        self.log(f"{stage}/loss", out.total.detach(), on_step=on_step, on_epoch=True, prog_bar=True,
                 batch_size=batch_size, sync_dist=not on_step)
        for name, value in out.terms.items():
            self.log(f"{stage}/{name}", value.detach(), on_step=on_step, on_epoch=True,
                     batch_size=batch_size, sync_dist=not on_step)

    def _log_accuracy(self, stage: str, logits: Tensor | None, ref_logits: Tensor | None, labels: Tensor) -> None:
        for who, values in (("model", logits), ("ref", ref_logits)):
            if values is None:
                continue
            metrics = self.metrics[f"{stage}_{who}"]
            metrics.update(values.detach(), labels)
            prefix = f"{stage}/" if who == "model" else f"{stage}/ref_"
            self.log_dict({f"{prefix}{k}": m for k, m in metrics.items()}, on_step=False, on_epoch=True,
                          prog_bar=stage != "train" and who == "model", batch_size=labels.numel())

    def _check_finite(self, out: RegularizerOutput, batch: dict[str, Any], batch_idx: int) -> None:
        bad = [n for n, v in {"total": out.total, **out.terms}.items() if not torch.isfinite(v).all()]
        finite = not bad
        if self._trainer is not None:  # under DDP every rank must stop together, not hang in the all-reduce
            finite = self._trainer.strategy.reduce_boolean_decision(finite, all=True)
        if not finite:
            paths = list(batch.get("path") or [])
            where = f"loss term(s) {bad}" if bad else "a loss on another DDP rank"
            raise NonFiniteLossError(
                f"non-finite {where} at epoch {self.current_epoch}, batch {batch_idx} "
                f"(images: {paths}); stopped before the optimizer step, the last checkpoint is untouched"
            )

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> Tensor:
        labels = batch["label"]
        needed = self.reference_train_metrics or self.requirements.reference_logits
        ref_logits = self.reference_logits(batch["image"]) if needed else None
        self.regularizer.step_begin(self.global_step, self.current_epoch)
        out = self.regularizer(batch, self.backbone, self.relevance, ref_logits)
        self._check_finite(out, batch, batch_idx)
        self._log_terms("train", out, labels.numel())
        self._log_accuracy("train", out.logits, ref_logits, labels)
        return out.total

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        # one fused norm over all gradients and one host sync (a loop over the parameters syncs once per tensor,
        # 152 times per ViT-B step, and cost 5x more on CPU); only when it is not finite are they searched
        grads = [p.grad for p in self.backbone.parameters() if p.grad is not None]
        if not grads:
            return
        norm_of = getattr(torch.nn.utils, "get_total_norm", None)  # torch >= 2.6
        total = norm_of(grads) if norm_of else torch.stack([torch.linalg.vector_norm(g) for g in grads]).norm()
        if torch.isfinite(total):
            return
        plugin = self.trainer.precision_plugin
        scale = plugin.scaler.get_scale() if isinstance(plugin, MixedPrecision) and plugin.scaler else None
        if scale is not None and scale >= 1.0:
            return  # 16-mixed: the GradScaler skips this step and halves the loss scale (dynamic loss scaling)
        hint = f" (float16 overflows even at loss scale {scale:g}: use trainer.precision bf16-mixed)" if scale else ""
        for name, param in self.backbone.named_parameters():  # a finite norm can overflow: name the culprit
            if param.grad is not None and not torch.isfinite(param.grad).all():
                raise NonFiniteLossError(
                    f"non-finite gradient in backbone.{name} at epoch {self.current_epoch}, step {self.global_step}"
                    f"{hint}; stopped before the optimizer step, the last checkpoint is untouched"
                )

    def _guided_eval_possible(self, batch: dict[str, Any]) -> bool:
        reg = self.regularizer
        if not (reg.requirements.relevance or reg.requirements.autograd):
            return True
        if torch.is_inference_mode_enabled():
            if not self._warned_inference:
                rank_zero_warn(
                    "validation runs under inference mode, so the guided loss cannot be computed; only "
                    "accuracy is logged. Set trainer.inference_mode: false to log val/loss."
                )
                self._warned_inference = True
            return False
        masks = batch.get("masks") or {}
        missing = [k for k in self.requirements.masks if k not in masks]
        if missing and not self._warned_val_masks:
            rank_zero_warn(f"validation batches carry no {missing} masks, so the guided loss (val/loss) is not "
                           "logged, only accuracy; a checkpoint callback should monitor val/acc1")
            self._warned_val_masks = True
        return not missing

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        labels = batch["label"]
        ref_logits = self.reference_logits(batch["image"])
        if self._guided_eval_possible(batch):
            with torch.enable_grad():
                out = self.regularizer(batch, self.backbone, self.relevance, ref_logits)
            out = RegularizerOutput(
                total=out.total.detach(), terms={k: v.detach() for k, v in out.terms.items()},
                logits=None if out.logits is None else out.logits.detach(),
            )
            self._log_terms("val", out, labels.numel())
            logits = out.logits
        else:
            logits = self.backbone(batch["image"])
        self._log_accuracy("val", logits, ref_logits, labels)

    def predict_step(self, batch: dict[str, Any], batch_idx: int) -> dict[str, Any]:
        logits = self.backbone(batch["image"])
        out: dict[str, Any] = {"path": batch.get("path"), "logits": logits, "pred": logits.argmax(dim=1)}
        ref_logits = self.reference_logits(batch["image"])
        if ref_logits is not None:
            ref_prob, out["ref_pred"] = ref_logits.float().softmax(dim=1).max(dim=1)
            out["ref_prob"] = ref_prob
        return out

    # ------------------------------------------------------------------ test: an `Evaluation` of the plan
    def on_test_start(self) -> None:
        loaders = self.trainer.test_dataloaders
        count = len(loaders) if isinstance(loaders, (list, tuple)) else 1
        plan = (self.test_plan or TestPlan.default(count)).for_loaders(count)
        self.evaluation = Evaluation(plan, self.backbone, self._reference, self.relevance, self.num_classes,
                                     self.device, self.data_config)

    def test_step(self, batch: dict[str, Any], batch_idx: int, dataloader_idx: int = 0) -> None:
        self.evaluation.step(batch, batch_idx, dataloader_idx)

    def on_test_epoch_end(self) -> None:
        relevance = None if self.relevance is None else \
            f"{type(self.relevance).__module__}.{type(self.relevance).__qualname__}"
        run = {"backbone": self.backbone_spec.name,
               "regularizer": f"{type(self.regularizer).__module__}.{type(self.regularizer).__qualname__}",
               "relevance": relevance}
        self.test_results, paths = self.evaluation.finish(self.trainer, self.log, run)
        if paths is not None:
            self.results_paths = paths

    # ------------------------------------------------------------------ optimisation
    def configure_optimizers(self) -> dict[str, Any]:
        params = [p for p in self.backbone.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(params, lr=self.lr, weight_decay=self.weight_decay, betas=self.betas)
        if self.lr_step_size == 0 or math.isclose(self.lr_gamma, 1.0):
            return {"optimizer": optimizer}
        scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=self.lr_step_size, gamma=self.lr_gamma)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "epoch"}}
