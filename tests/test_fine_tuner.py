"""`GuidedFineTuner`: the frozen reference model, one forward pass per step, logging, errors, optimiser, hparams.

Everything runs on a 2-block ViT at 32 px with 3 classes (random weights, no download) and on the generated
smoke data set (3 classes, 2 images per class and split).
"""

from __future__ import annotations

import csv
import importlib
import math
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict
from pathlib import Path
from typing import Any

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger
from torch import Tensor, nn

from cft_lightning.data.datamodule import GuidanceDataModule
from cft_lightning.models import BackboneSpec, GuidedFineTuner, NonFiniteLossError
from cft_lightning.regularizers import (
    CFT,
    RRDA,
    RRR,
    GradMask,
    LVLMCritic,
    ObjectMaskGuidance,
    PlainFineTuning,
    Regularizer,
    RegularizerOutput,
    RobustViT,
)
from cft_lightning.relevance import AttnLRP, GradientRollout, UnsupportedModelError
from cft_lightning.smoke_data import generate

NUM_CLASSES = 3
TINY = {"img_size": 32, "patch_size": 8, "depth": 2}


# --------------------------------------------------------------------------------------------------
# helpers


def spec(num_classes: int = NUM_CLASSES, **model_kwargs: Any) -> BackboneSpec:
    return BackboneSpec(
        name="vit_tiny_patch16_224", pretrained=False, num_classes=num_classes, model_kwargs={**TINY, **model_kwargs}
    )


def cft_model(seed: int = 0, **kwargs: Any) -> GuidedFineTuner:
    torch.manual_seed(seed)
    return GuidedFineTuner(spec(), CFT(), AttnLRP(), **{"lr": 1e-3, **kwargs})


def plain_model(seed: int = 0, num_classes: int = NUM_CLASSES, **kwargs: Any) -> GuidedFineTuner:
    torch.manual_seed(seed)
    return GuidedFineTuner(spec(num_classes), PlainFineTuning(), **{"lr": 1e-3, **kwargs})


def synthetic_batch(seed: int = 0, n: int = 2, dtype: torch.dtype = torch.float32) -> dict[str, Any]:
    """A batch in the data module's format: images, labels, 'concept' and 'object' masks, paths."""
    gen = torch.Generator().manual_seed(seed)
    concept = torch.zeros(n, 32, 32)
    concept[:, 8:16, 8:24] = 1.0
    obj = torch.zeros(n, 32, 32)
    obj[:, 4:28, 4:28] = 1.0
    return {
        "image": torch.randn(n, 3, 32, 32, generator=gen, dtype=dtype),
        "label": torch.arange(n) % NUM_CLASSES,
        "masks": {"concept": concept, "object": obj},
        "path": [f"cls/img_{seed}_{i}.png" for i in range(n)],
    }


@contextmanager
def no_trainer_log_warning() -> Iterator[None]:
    """`training_step` outside a Trainer: `self.log` only warns (Lightning supports this for testing steps)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="You are trying to `self.log\\(\\)`")
        yield


def snapshot(module: nn.Module) -> dict[str, Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def same_weights(a: dict[str, Tensor], b: dict[str, Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.fixture(scope="module")
def smoke_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return generate(tmp_path_factory.mktemp("smoke") / "data", classes=NUM_CLASSES, per_class=2, size=32, seed=0)


def datamodule(data: Path, **overrides: Any) -> GuidanceDataModule:
    """All 6 training images (2 batches of 3), the val and test splits (6 images each), both mask kinds."""
    kwargs: dict[str, Any] = dict(
        root=str(data / "images" / "train"),
        masks=str(data / "masks"),
        mask_kinds=["concept", "object"],
        val_root=str(data / "images" / "val"),
        test_root=str(data / "images" / "test"),
        images_per_class=2,
        class_fraction=1.0,
        batch_size=3,
    )
    kwargs.update(overrides)
    return GuidanceDataModule(**kwargs)


def trainer(tmp_path: Path, **overrides: Any) -> L.Trainer:
    kwargs: dict[str, Any] = dict(
        accelerator="cpu",
        devices=1,
        default_root_dir=tmp_path,  # nothing may land in the working directory (e.g. with logger=False)
        max_epochs=1,
        inference_mode=False,
        logger=CSVLogger(tmp_path),
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        log_every_n_steps=1,
    )
    kwargs.update(overrides)
    return L.Trainer(**kwargs)


def csv_rows(trainer_: L.Trainer) -> list[dict[str, str]]:
    with open(Path(trainer_.logger.log_dir) / "metrics.csv") as fh:
        return list(csv.DictReader(fh))


def accuracy(module: nn.Module, loader: Any) -> float:
    """Top-1 accuracy of `module` over a loader, computed by hand."""
    correct = total = 0
    with torch.no_grad():
        for batch in loader:
            correct += int((module(batch["image"]).argmax(1) == batch["label"]).sum())
            total += batch["label"].numel()
    return correct / total


def constant_head(vit: nn.Module, cls: int) -> None:
    """Make a ViT predict class `cls` for every image."""
    with torch.no_grad():
        vit.head.weight.zero_()
        vit.head.bias.zero_()
        vit.head.bias[cls] = 10.0


def constant_accuracy(loader: Any, cls: int, n: int = 3) -> float:
    """Accuracy of the constant prediction `cls` on the first `n` images of `loader` (labels [0, 0, 1])."""
    labels = torch.cat([batch["label"] for batch in loader])[:n]
    assert labels.tolist() == [0, 0, 1]
    return float((labels == cls).float().mean())


def is_plain(value: Any) -> bool:
    if value is None or isinstance(value, (bool, int, float, str)):
        return True
    if isinstance(value, (list, tuple)):
        return all(is_plain(v) for v in value)
    if isinstance(value, dict):
        return all(isinstance(k, str) and is_plain(v) for k, v in value.items())
    return False


def instantiate(config: dict[str, Any]) -> Any:
    module, _, name = config["class_path"].rpartition(".")
    return getattr(importlib.import_module(module), name)(**config["init_args"])


# --------------------------------------------------------------------------------------------------
# 1. the reference model


def test_reference_is_not_a_submodule_parameter_or_state_dict_entry():
    model = cft_model()
    ref = model.reference
    assert isinstance(ref, nn.Module) and ref is not model.backbone
    assert set(model.state_dict()) == {f"backbone.{k}" for k in model.backbone.state_dict()}
    params = {id(p) for p in model.parameters()}
    assert params == {id(p) for p in model.backbone.parameters()}
    assert params.isdisjoint(id(p) for p in ref.parameters())
    assert params.isdisjoint(id(b) for b in ref.buffers())
    assert all(m is not ref for m in model.modules())
    # distinct storage: training the backbone cannot write into the reference
    assert {p.data_ptr() for p in model.backbone.parameters()}.isdisjoint(p.data_ptr() for p in ref.parameters())


def test_reference_is_frozen_and_always_in_eval_mode():
    model = cft_model()
    ref = model.reference
    assert all(not p.requires_grad for p in ref.parameters())
    assert all(p.requires_grad for p in model.backbone.parameters())
    for mode in (True, False, True):
        assert model.train(mode) is model
        assert model.training is mode and model.backbone.training is mode
        assert all(not m.training for m in ref.modules())
    ref.train()  # someone flips the reference: the module's next train/eval call puts it back
    model.train()
    assert model.backbone.training and all(not m.training for m in ref.modules())


def test_reference_starts_as_the_backbone_and_stays_fixed_while_the_backbone_trains():
    model = cft_model()
    ref = model.reference
    backbone0, ref0 = snapshot(model.backbone), snapshot(ref)
    assert same_weights(backbone0, ref0)
    probe = synthetic_batch(seed=99)["image"]
    model.eval()
    with torch.no_grad():
        logits0 = model(probe)
    assert torch.allclose(model.reference_logits(probe), logits0, atol=1e-6)

    model.train()
    optimizer = model.configure_optimizers()["optimizer"]
    for step in range(3):
        optimizer.zero_grad()
        with no_trainer_log_warning():
            loss = model.training_step(synthetic_batch(seed=step), step)
        loss.backward()
        optimizer.step()

    changed = [k for k in backbone0 if not torch.equal(backbone0[k], model.backbone.state_dict()[k])]
    assert len(changed) > len(backbone0) // 2, "the backbone did not train"
    assert same_weights(snapshot(ref), ref0)
    assert all(p.grad is None for p in ref.parameters())
    model.eval()
    with torch.no_grad():
        assert not torch.allclose(model(probe), logits0, atol=1e-4)
    torch.testing.assert_close(model.reference_logits(probe), logits0, atol=1e-6, rtol=0)


@pytest.mark.parametrize("convert", [lambda m: m.double(), lambda m: m.to(torch.float64)], ids=["double", "to"])
def test_dtype_conversion_moves_the_reference(convert: Callable[[nn.Module], Any]):
    model = plain_model()
    out = convert(model)
    assert out is model
    ref = model.reference
    tensors = [*ref.parameters(), *ref.buffers()]
    assert tensors and all(t.dtype == torch.float64 for t in tensors)
    assert all(p.dtype == torch.float64 for p in model.backbone.parameters())
    assert all(not p.requires_grad for p in ref.parameters()) and not ref.training
    x = synthetic_batch(dtype=torch.float64)["image"]
    assert model.reference_logits(x).dtype == torch.float64
    model.float()
    assert all(p.dtype == torch.float32 for p in ref.parameters())
    assert model.reference_logits(x.float()).dtype == torch.float32


def test_reference_logits_are_a_normal_tensor_usable_as_autograd_target():
    model = plain_model()
    x = synthetic_batch()["image"]
    ref_logits = model.reference_logits(x)
    assert not torch.is_inference(ref_logits)
    assert not ref_logits.requires_grad
    with torch.no_grad():
        torch.testing.assert_close(ref_logits, model.reference(x))
    # usable in autograd code as a soft and as a hard target, and modifiable in place (inference tensors are not)
    logits = model(x)
    loss = F.cross_entropy(logits, ref_logits.softmax(dim=1)) + F.cross_entropy(logits, ref_logits.argmax(dim=1))
    loss.backward()
    grad = model.backbone.head.weight.grad
    assert grad is not None and torch.isfinite(grad).all() and grad.abs().sum() > 0
    ref_logits.mul_(2.0)
    assert all(p.grad is None for p in model.reference.parameters())


def test_track_reference_false_has_no_reference():
    model = cft_model(track_reference=False)
    assert model.reference is None
    assert model.reference_logits(synthetic_batch()["image"]) is None
    assert model.hparams["track_reference"] is False
    assert set(model.state_dict()) == {f"backbone.{k}" for k in model.backbone.state_dict()}
    model.double()  # nothing to move along
    assert model.reference is None


# --------------------------------------------------------------------------------------------------
# 2. one forward pass of the backbone per training step


class ForwardCounter:
    """Counts forward passes of a timm ViT by its entry (patch_embed) and exit (head) modules.

    AttnLRP runs the backbone's layers explicitly (`trace_vit`) and never calls `backbone(...)` itself, so a
    hook on the backbone module would see no call; every forward pass goes through patch_embed and head.
    """

    def __init__(self, vit: nn.Module) -> None:
        self.entries = self.exits = 0
        vit.patch_embed.register_forward_pre_hook(lambda *_: self._add("entries"))
        vit.head.register_forward_hook(lambda *_: self._add("exits"))

    def _add(self, name: str) -> None:
        setattr(self, name, getattr(self, name) + 1)

    def counts(self) -> tuple[int, int]:
        return self.entries, self.exits


@pytest.mark.parametrize("track_reference", [True, False], ids=["ref", "noref"])
@pytest.mark.parametrize(
    "make",
    [lambda: (CFT(), AttnLRP()), lambda: (CFT(), GradientRollout()), lambda: (PlainFineTuning(), None)],
    ids=["cft-attnlrp", "cft-rollout", "plain"],
)
def test_one_backbone_forward_per_training_step(make: Callable[[], tuple], track_reference: bool):
    regularizer, relevance = make()
    torch.manual_seed(0)
    model = GuidedFineTuner(spec(), regularizer, relevance, track_reference=track_reference)
    model.train()
    backbone = ForwardCounter(model.backbone)
    reference = ForwardCounter(model.reference) if track_reference else None
    for step in range(2):
        with no_trainer_log_warning():
            loss = model.training_step(synthetic_batch(seed=step), step)
        loss.backward()
        assert backbone.counts() == (step + 1, step + 1)
        if reference is not None:  # not run at all: no consistency target on it, no reference_train_metrics
            assert reference.counts() == (0, 0)
    if isinstance(regularizer, PlainFineTuning):
        calls = []
        model.backbone.register_forward_hook(lambda *_: calls.append(1))
        with no_trainer_log_warning():
            model.training_step(synthetic_batch(), 0)
        assert len(calls) == 1


# --------------------------------------------------------------------------------------------------
# 3. a Lightning fit logs every loss term and both models' accuracies

TRAIN_TERMS = ("loss", "concept", "non_concept", "align", "cls")


def test_fit_logs_all_terms_and_accuracies(smoke_data: Path, tmp_path: Path):
    model = cft_model(lr=1e-4, reference_train_metrics=True)  # the reference's training accuracy is opt-in
    dm = datamodule(smoke_data)
    tr = trainer(tmp_path)
    tr.fit(model, datamodule=dm)

    metrics = tr.callback_metrics
    expected = [f"train/{t}" for t in TRAIN_TERMS] + [
        "train/acc1", "train/acc5", "train/ref_acc1", "train/ref_acc5",
        "val/loss", "val/concept", "val/non_concept", "val/align", "val/cls",
        "val/acc1", "val/acc5", "val/ref_acc1", "val/ref_acc5",
    ]  # fmt: skip
    for key in expected:
        assert key in metrics, key
        assert math.isfinite(float(metrics[key])), key
    assert float(metrics["train/loss"]) > 0 and float(metrics["val/loss"]) > 0

    # the CSV log: one row per step (log_every_n_steps=1), epoch means weighted by batch size
    rows = csv_rows(tr)
    columns = set().union(*(r.keys() for r in rows))
    for key in [f"train/{t}_step" for t in TRAIN_TERMS] + [f"train/{t}_epoch" for t in TRAIN_TERMS] + expected[5:]:
        assert key in columns, key
        values = [float(r[key]) for r in rows if r.get(key)]
        assert values and all(math.isfinite(v) for v in values), key
    step_losses = [float(r["train/loss_step"]) for r in rows if r.get("train/loss_step")]
    assert len(step_losses) == 2  # 6 images, batch size 3
    (epoch_loss,) = [float(r["train/loss_epoch"]) for r in rows if r.get("train/loss_epoch")]
    assert epoch_loss == pytest.approx(sum(step_losses) / 2, rel=1e-5)
    # total = align_weight * align + cls_weight * cls (CFT defaults 0.8, 0.2)
    for r in rows:
        if r.get("train/loss_step"):
            want = 0.8 * float(r["train/align_step"]) + 0.2 * float(r["train/cls_step"])
            assert float(r["train/loss_step"]) == pytest.approx(want, rel=1e-5)

    # validation ran after the epoch's training steps: its accuracies are those of the trained model and of the
    # reference over exactly the 6 validation images (the sanity check must not leak into them)
    model.eval()
    val_loader = dm.val_dataloader()
    assert float(metrics["val/acc1"]) == pytest.approx(accuracy(model.backbone, val_loader))
    assert float(metrics["val/ref_acc1"]) == pytest.approx(accuracy(model.reference, val_loader))
    assert float(metrics["val/acc5"]) == 1.0 and float(metrics["train/acc5"]) == 1.0


def test_the_reference_runs_in_training_only_when_needed():
    """By default a training step does not run the frozen reference (one forward saved); it does for the
    consistency target `reference` and for `reference_train_metrics`."""
    batch = synthetic_batch()
    for kwargs, regularizer, runs in (({}, CFT(), False), ({"reference_train_metrics": True}, CFT(), True),
                                      ({}, CFT(consistency_target="reference"), True)):
        torch.manual_seed(0)
        model = GuidedFineTuner(spec(), regularizer, AttnLRP(), lr=1e-3, **kwargs)
        calls = []
        model.reference.register_forward_hook(lambda *a, calls=calls: calls.append(1))
        with no_trainer_log_warning():
            model.training_step(batch, 0)
        assert bool(calls) == runs, kwargs


def test_validation_under_inference_mode_logs_accuracy_and_warns_once(smoke_data: Path, tmp_path: Path):
    model = cft_model()
    dm = datamodule(smoke_data, eval_batch_size=1)
    tr = trainer(tmp_path, inference_mode=True, limit_train_batches=1, limit_val_batches=3)
    # Lightning runs the validation inside `fit` under no_grad whatever `inference_mode` says, so the guided
    # validation loss is computed there; only `trainer.validate/test/predict` use torch.inference_mode.
    with warnings.catch_warnings(record=True) as fit_record:
        warnings.simplefilter("always")
        tr.fit(model, datamodule=dm)
    assert not [w for w in fit_record if "inference mode" in str(w.message)]
    assert "val/loss" in tr.callback_metrics and "val/acc1" in tr.callback_metrics

    # tell the two models apart: the backbone always predicts class 0, the reference class 2
    constant_head(model.backbone, 0)
    constant_head(model.reference, 2)
    want, want_ref = constant_accuracy(dm.val_dataloader(), 0), constant_accuracy(dm.val_dataloader(), 2)
    assert want != want_ref
    with pytest.warns(UserWarning, match="inference mode") as record:
        (result,) = tr.validate(model, datamodule=dm, verbose=False)
    assert sum("guided loss cannot be computed" in str(w.message) for w in record) == 1  # once, not per batch
    for key in ("val/acc1", "val/acc5", "val/ref_acc1", "val/ref_acc5"):
        assert key in result and math.isfinite(result[key]), key
    assert not [k for k in result if k.split("/")[-1] in TRAIN_TERMS]
    assert result["val/acc1"] == pytest.approx(want) and result["val/ref_acc1"] == pytest.approx(want_ref)
    assert result["val/acc5"] == 1.0 and result["val/ref_acc5"] == 1.0

    # with autograd available, `validate` computes the guided loss and takes the accuracy from that same pass
    (guided,) = trainer(tmp_path, limit_val_batches=3).validate(model, datamodule=dm, verbose=False)
    for term in TRAIN_TERMS:
        assert math.isfinite(guided[f"val/{term}"]), term
    assert guided["val/acc1"] == pytest.approx(want) and guided["val/ref_acc1"] == pytest.approx(want_ref)


def test_fit_without_reference_logs_no_reference_metrics(smoke_data: Path, tmp_path: Path):
    model = plain_model(track_reference=False)
    dm = datamodule(smoke_data, masks=None, mask_kinds=[])
    tr = trainer(tmp_path)
    tr.fit(model, datamodule=dm)
    tr.test(model, datamodule=dm, verbose=False)
    keys = set(tr.callback_metrics) | set().union(*(r.keys() for r in csv_rows(tr)))
    for key in ("train/acc1", "train/cls", "val/acc1", "val/loss", "test/acc1"):
        assert any(k.startswith(key) for k in keys), key
    assert not [k for k in keys if "ref_" in k]


# --------------------------------------------------------------------------------------------------
# 4. the test step and the top-5 clamp


def test_test_step_logs_model_and_reference_accuracy(smoke_data: Path, tmp_path: Path):
    model = cft_model()
    dm = datamodule(smoke_data)
    (result,) = trainer(tmp_path, inference_mode=True).test(model, datamodule=dm, verbose=False)
    assert set(result) == {"test/acc1", "test/acc5", "test/ref_acc1", "test/ref_acc5"}
    # an untrained model is its reference
    assert result["test/acc1"] == pytest.approx(result["test/ref_acc1"])
    model.eval()
    assert result["test/acc1"] == pytest.approx(accuracy(model.backbone, dm.test_dataloader()))
    # top-5 over 3 classes is top-3, which is always right
    assert result["test/acc5"] == 1.0 and result["test/ref_acc5"] == 1.0

    # the model's and the reference's accuracies are logged under their own names (on one batch of [0, 0, 1])
    constant_head(model.backbone, 0)
    constant_head(model.reference, 2)
    want, want_ref = constant_accuracy(dm.test_dataloader(), 0), constant_accuracy(dm.test_dataloader(), 2)
    assert want != want_ref
    tr = trainer(tmp_path, inference_mode=True, limit_test_batches=1)
    (result,) = tr.test(model, datamodule=dm, verbose=False)
    assert result["test/acc1"] == pytest.approx(want) and result["test/ref_acc1"] == pytest.approx(want_ref)
    assert result["test/acc5"] == 1.0 and result["test/ref_acc5"] == 1.0


@pytest.mark.parametrize(("num_classes", "top_k"), [(2, 2), (3, 3), (5, 5), (7, 5)])
def test_top5_is_clamped_to_the_number_of_classes(num_classes: int, top_k: int):
    model = plain_model(num_classes=num_classes)
    for stage in ("train", "val"):
        for who in ("model", "ref"):
            metrics = model.metrics[f"{stage}_{who}"]
            assert metrics["acc1"].top_k == 1
            assert metrics["acc5"].top_k == top_k
    acc5 = model.metrics["val_model"]["acc5"]
    acc5.update(torch.randn(8, num_classes), torch.randint(0, num_classes, (8,)))
    assert (float(acc5.compute()) == 1.0) is (top_k == num_classes)


# --------------------------------------------------------------------------------------------------
# 5. errors


@pytest.mark.parametrize("regularizer", [CFT(), ObjectMaskGuidance()], ids=["cft", "object"])
def test_guided_regularizer_without_relevance_is_rejected(regularizer: Regularizer):
    with pytest.raises(ValueError, match="needs model.relevance"):
        GuidedFineTuner(spec(), regularizer)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"lr": 0.0}, "model.lr must be positive"),
        ({"lr": -1e-4}, "model.lr must be positive"),
        ({"lr_step_size": -1}, "lr_step_size"),
        ({"lr_gamma": 0.0}, "lr_gamma"),
        ({"lr_gamma": 1.5}, "lr_gamma"),
    ],
)
def test_invalid_optimiser_settings_are_rejected(kwargs: dict[str, Any], match: str):
    with pytest.raises(ValueError, match=match):
        GuidedFineTuner(spec(), PlainFineTuning(), **kwargs)


def test_relevance_checks_the_backbone_at_construction():
    with pytest.raises(UnsupportedModelError, match="drop"):
        GuidedFineTuner(spec(drop_path_rate=0.1), CFT(), AttnLRP())
    GuidedFineTuner(spec(drop_path_rate=0.1), PlainFineTuning(), AttnLRP())  # test-only relevance: eval mode


@pytest.mark.parametrize("stage", ["fit", "test"])
def test_data_with_more_classes_than_the_head_fails_at_setup(smoke_data: Path, tmp_path: Path, stage: str):
    model = plain_model(num_classes=2)
    before = snapshot(model.backbone)
    tr = trainer(tmp_path, inference_mode=True)
    run = tr.fit if stage == "fit" else tr.test
    with pytest.raises(ValueError, match=r"model\.backbone\.num_classes: 3") as info:
        run(model, datamodule=datamodule(smoke_data, masks=None, mask_kinds=[]))
    assert "3 classes" in str(info.value) and "head has 2" in str(info.value)
    assert tr.global_step == 0 and same_weights(snapshot(model.backbone), before)


@pytest.mark.parametrize(
    ("regularizer", "kinds", "missing"),
    [(CFT(), ["object"], "concept"), (CFT(), [], "concept"), (ObjectMaskGuidance(), ["concept"], "object")],
    ids=["cft-object-only", "cft-no-masks", "object-concept-only"],
)
def test_missing_mask_kind_fails_at_setup(
    smoke_data: Path, tmp_path: Path, regularizer: Regularizer, kinds: list[str], missing: str
):
    model = GuidedFineTuner(spec(), regularizer, AttnLRP())
    dm = datamodule(smoke_data, mask_kinds=kinds, masks=str(smoke_data / "masks") if kinds else None)
    tr = trainer(tmp_path)
    with pytest.raises(ValueError, match=r"data\.mask_kinds") as info:
        tr.fit(model, datamodule=dm)
    assert f"['{missing}']" in str(info.value)
    assert tr.global_step == 0


class _PoisonBatch(Callback):
    """Fills the images of one training batch with NaN; records the weights and paths at that moment."""

    def __init__(self, batch_idx: int) -> None:
        self.batch_idx = batch_idx
        self.weights: dict[str, Tensor] | None = None
        self.paths: list[str] = []

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int):
        if batch_idx == self.batch_idx:
            batch["image"].fill_(float("nan"))
            self.weights = snapshot(pl_module.backbone)
            self.paths = list(batch["path"])


def test_non_finite_loss_names_the_batch_and_leaves_the_weights_untouched(smoke_data: Path, tmp_path: Path):
    model = cft_model()
    initial = snapshot(model.backbone)
    poison = _PoisonBatch(batch_idx=1)
    tr = trainer(tmp_path, callbacks=[poison], num_sanity_val_steps=0)
    with pytest.raises(NonFiniteLossError) as info:
        tr.fit(model, datamodule=datamodule(smoke_data))
    message = str(info.value)
    assert "batch 1" in message and "epoch 0" in message
    assert len(poison.paths) == 3 and all(repr(p) in message for p in poison.paths)
    assert poison.weights is not None and not same_weights(poison.weights, initial), "batch 0 should have trained"
    assert same_weights(snapshot(model.backbone), poison.weights), "the failed step changed the weights"


class _NaNGradient(Regularizer):
    """A finite loss (0) whose gradient is NaN: d sqrt(u)/du = inf at 0, times du/dlogits = 0."""

    def __call__(self, batch, model, relevance, reference_logits) -> RegularizerOutput:
        logits = model(batch["image"])
        total = (logits * 0.0).sum().sqrt()
        return RegularizerOutput(total=total, terms={"cls": total}, logits=logits)


def test_non_finite_gradient_stops_before_the_optimizer_step(smoke_data: Path, tmp_path: Path):
    torch.manual_seed(0)
    model = GuidedFineTuner(spec(), _NaNGradient(), lr=1e-3)
    initial = snapshot(model.backbone)
    tr = trainer(tmp_path, num_sanity_val_steps=0)
    with pytest.raises(NonFiniteLossError, match=r"non-finite gradient in backbone\..* step 0"):
        tr.fit(model, datamodule=datamodule(smoke_data, masks=None, mask_kinds=[]))
    assert same_weights(snapshot(model.backbone), initial)


# --------------------------------------------------------------------------------------------------
# 6. optimiser and learning-rate schedule


def _lrs_per_epoch(conf: dict[str, Any], epochs: int) -> list[float]:
    """The learning rate at the start of each epoch, stepping the scheduler as Lightning does (interval=epoch)."""
    optimizer, scheduler = conf["optimizer"], conf["lr_scheduler"]["scheduler"]
    lrs = []
    for _ in range(epochs):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()  # no gradients: a no-op, keeps the scheduler's call-order check quiet
        scheduler.step()
    return lrs


def test_configure_optimizers_adamw_with_step_decay():
    model = GuidedFineTuner(spec(), PlainFineTuning(), lr=1e-3, weight_decay=0.05, betas=(0.8, 0.99))
    conf = model.configure_optimizers()
    optimizer = conf["optimizer"]
    assert type(optimizer) is torch.optim.AdamW
    (group,) = optimizer.param_groups
    assert group["lr"] == 1e-3 and group["weight_decay"] == 0.05 and tuple(group["betas"]) == (0.8, 0.99)
    assert {id(p) for p in group["params"]} == {id(p) for p in model.backbone.parameters()}
    assert {id(p) for p in group["params"]}.isdisjoint(id(p) for p in model.reference.parameters())
    sched = conf["lr_scheduler"]
    assert sched["interval"] == "epoch"
    scheduler = sched["scheduler"]
    assert type(scheduler) is torch.optim.lr_scheduler.StepLR
    assert scheduler.step_size == 2 and scheduler.gamma == 0.85
    lrs = _lrs_per_epoch(conf, 6)
    assert lrs == pytest.approx([1e-3 * 0.85 ** (e // 2) for e in range(6)])
    assert lrs[:4] == pytest.approx([1e-3, 1e-3, 0.85e-3, 0.85e-3])


def test_configure_optimizers_custom_schedule():
    model = GuidedFineTuner(spec(), PlainFineTuning(), lr=2e-3, lr_step_size=1, lr_gamma=0.5)
    assert _lrs_per_epoch(model.configure_optimizers(), 3) == pytest.approx([2e-3, 1e-3, 0.5e-3])


@pytest.mark.parametrize("kwargs", [{"lr_step_size": 0}, {"lr_gamma": 1.0}])
def test_constant_learning_rate_has_no_scheduler(kwargs: dict[str, Any]):
    conf = GuidedFineTuner(spec(), PlainFineTuning(), lr=1e-3, **kwargs).configure_optimizers()
    assert set(conf) == {"optimizer"}
    assert conf["optimizer"].param_groups[0]["lr"] == 1e-3


class _LrPerEpoch(Callback):
    def __init__(self) -> None:
        self.lrs: list[float] = []

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.lrs.append(trainer.optimizers[0].param_groups[0]["lr"])


def test_trainer_applies_the_step_schedule_per_epoch(smoke_data: Path, tmp_path: Path):
    record = _LrPerEpoch()
    tr = trainer(tmp_path, max_epochs=4, limit_train_batches=1, limit_val_batches=0, logger=False, callbacks=[record])
    tr.fit(plain_model(lr=1e-3), datamodule=datamodule(smoke_data, masks=None, mask_kinds=[]))
    assert record.lrs == pytest.approx([1e-3, 1e-3, 0.85e-3, 0.85e-3])


# --------------------------------------------------------------------------------------------------
# 7. hyperparameters outside the CLI


@pytest.mark.parametrize(
    "make",
    [
        lambda: (CFT(concept_weight=0.3, loss_form="release", mask_kind="object"), AttnLRP(attention_rule="cp")),
        lambda: (ObjectMaskGuidance(temperature=0.5), GradientRollout(normalize="positive_max")),
        lambda: (PlainFineTuning(consistency_target="self"), None),
        lambda: (RRR(grad_weight=1.0, reduction="mean"), None),
        lambda: (GradMask(form="authors", penalty_growth=0.1), None),
        lambda: (RRDA(probability=0.3, context_fill="keep"), None),
        lambda: (RobustViT(temperature=0.65), GradientRollout()),
        lambda: (LVLMCritic(grad_weight=10.0, alignment_ratio=0.25), None),
    ],
    ids=["cft", "object", "plain", "rrr", "gradmask", "rrda", "robust_vit", "lvlm_critic"],
)
def test_hparams_are_plain_data_that_rebuild_the_plugins(make: Callable[[], tuple]):
    regularizer, relevance = make()
    backbone = spec()
    model = GuidedFineTuner(backbone, regularizer, relevance, lr=3e-4, track_reference=False)
    hp = dict(model.hparams)
    assert is_plain(hp), hp
    assert hp["backbone"] == asdict(backbone)
    assert hp["lr"] == 3e-4 and hp["track_reference"] is False
    reg_conf = hp["regularizer"]
    assert set(reg_conf) == {"class_path", "init_args"}
    assert reg_conf["class_path"] == f"{type(regularizer).__module__}.{type(regularizer).__qualname__}"
    assert "required_masks" not in reg_conf["init_args"]
    rebuilt = instantiate(reg_conf)
    assert type(rebuilt) is type(regularizer) and vars(rebuilt) == vars(regularizer)
    if relevance is None:
        assert hp["relevance"] is None
    else:
        rebuilt_rel = instantiate(hp["relevance"])
        assert type(rebuilt_rel) is type(relevance) and vars(rebuilt_rel) == vars(relevance)
    assert BackboneSpec(**hp["backbone"]) == backbone


def test_trainer_checkpoint_loads_with_weights_only(smoke_data: Path, tmp_path: Path):
    model = cft_model()
    ckpt_dir = tmp_path / "ckpt"
    tr = trainer(
        tmp_path,
        enable_checkpointing=True,
        callbacks=[ModelCheckpoint(dirpath=ckpt_dir, save_last=True)],
        limit_train_batches=1,
        limit_val_batches=1,
        num_sanity_val_steps=0,
    )
    tr.fit(model, datamodule=datamodule(smoke_data))
    path = ckpt_dir / "last.ckpt"
    assert path.is_file()
    ckpt = torch.load(path, weights_only=True, map_location="cpu")
    assert ckpt["hyper_parameters"] == dict(model.hparams)
    assert is_plain(ckpt["hyper_parameters"])
    state = ckpt["state_dict"]
    assert set(state) == set(model.state_dict())
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())
    assert ckpt["lr_schedulers"] and ckpt["optimizer_states"]

    # the hparams rebuild the module; the checkpoint restores the trained backbone (the reference stays at init)
    hp = ckpt["hyper_parameters"]
    torch.manual_seed(0)
    restored = GuidedFineTuner(
        BackboneSpec(**hp["backbone"]),
        instantiate(hp["regularizer"]),
        instantiate(hp["relevance"]),
        **{k: v for k, v in hp.items() if k not in ("backbone", "regularizer", "relevance")},
    )
    restored.load_state_dict(state)
    restored.eval()
    model.eval()
    x = synthetic_batch()["image"]
    with torch.no_grad():
        torch.testing.assert_close(restored(x), model(x))
    torch.testing.assert_close(restored.reference_logits(x), model.reference_logits(x))

    # ... and so does Lightning's own loader, from the plain-data hparams alone
    torch.manual_seed(0)
    loaded = GuidedFineTuner.load_from_checkpoint(path, map_location="cpu", weights_only=True)
    assert isinstance(loaded.regularizer, CFT) and isinstance(loaded.relevance, AttnLRP)
    loaded.eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), model(x))


def test_reference_consistency_without_reference_is_rejected():
    with pytest.raises(ValueError, match="track_reference"):
        GuidedFineTuner(spec(), CFT(consistency_target="reference"), AttnLRP(), track_reference=False)
    with pytest.raises(ValueError, match="track_reference"):
        GuidedFineTuner(spec(), PlainFineTuning(consistency_target="reference"), track_reference=False)


def test_single_output_head_is_rejected_with_the_config_key():
    with pytest.raises(ValueError, match="model.backbone.num_classes"):
        plain_model(num_classes=1)


class _PoisonEpochBatch(_PoisonBatch):
    """`_PoisonBatch` in a given epoch only (inf instead of NaN)."""

    def __init__(self, epoch: int, batch_idx: int) -> None:
        super().__init__(batch_idx)
        self.epoch = epoch

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int):
        if trainer.current_epoch == self.epoch and batch_idx == self.batch_idx:
            batch["image"].fill_(float("inf"))
            self.paths = list(batch["path"])


def test_a_non_finite_loss_never_reaches_a_checkpoint(smoke_data: Path, tmp_path: Path):
    """inf in epoch 1: the run stops naming the batch; the only checkpoints are epoch 0's, finite and untouched."""
    from lightning.pytorch.callbacks import ModelCheckpoint

    model = cft_model()
    checkpoints = tmp_path / "ckpt"
    saver = ModelCheckpoint(dirpath=checkpoints, filename="last", enable_version_counter=False,
                            save_on_train_epoch_end=True)
    tr = trainer(tmp_path, callbacks=[_PoisonEpochBatch(1, 1), saver], num_sanity_val_steps=0, max_epochs=3,
                 enable_checkpointing=True)
    with pytest.raises(NonFiniteLossError, match="epoch 1, batch 1"):
        tr.fit(model, datamodule=datamodule(smoke_data))
    files = sorted(checkpoints.iterdir())
    assert [f.name for f in files] == ["last.ckpt"]
    state = torch.load(files[0], map_location="cpu", weights_only=True)
    assert state["epoch"] == 0 and all(torch.isfinite(v).all() for v in state["state_dict"].values())


def test_frozen_prefixes_keep_the_input_end_fixed_while_the_rest_trains() -> None:
    """`frozen: [patch_embed, pos_embed, cls_token, blocks.0]`: one CFT step moves the later blocks and the head
    only; the frozen parameters are out of the optimizer and unchanged; an unknown prefix is an error."""
    model = cft_model(frozen=["patch_embed", "pos_embed", "cls_token", "blocks.0"])
    assert "patch_embed.proj.weight" in model.frozen and "blocks.0.attn.qkv.weight" in model.frozen
    assert not any(n.startswith("blocks.1") for n in model.frozen)
    optimizer = model.configure_optimizers()["optimizer"]
    trainable = {id(p) for group in optimizer.param_groups for p in group["params"]}
    before = snapshot(model.backbone)
    with no_trainer_log_warning():
        loss = model.training_step(synthetic_batch(), 0)
    loss.backward()
    optimizer.step()
    after = snapshot(model.backbone)
    for name, param in model.backbone.named_parameters():
        frozen = name in model.frozen
        assert (id(param) in trainable) is not frozen, name
        if frozen:
            assert torch.equal(before[name], after[name]), name
    assert not torch.equal(before["blocks.1.attn.qkv.weight"], after["blocks.1.attn.qkv.weight"])
    with pytest.raises(ValueError, match="name no parameter"):
        cft_model(frozen=["patch_embedding"])


class _Renamed(PlainFineTuning):
    """A user's regularizer that keeps an argument under another attribute name (and a private one)."""

    def __init__(self, strength: float = 1.0, consistency_target: str = "label") -> None:
        super().__init__(consistency_target=consistency_target)
        self._strength = strength
        self.scale = 2 * strength


def test_plugins_round_trip_through_a_checkpoint_whatever_their_attribute_names(tmp_path: Path):
    """The arguments a plugin was built with are recorded at construction (`RecordsInitArgs`), so the hparams
    rebuild it exactly, even when it stores them under other names; the old attribute scan would lose
    `strength` and rebuild the default."""
    model = GuidedFineTuner(spec(), _Renamed(strength=0.25, consistency_target="self"), None, lr=3e-4,
                            track_reference=False)
    hp = dict(model.hparams)
    assert hp["regularizer"]["init_args"] == {"strength": 0.25, "consistency_target": "self"}
    path = tmp_path / "plugin.ckpt"
    torch.save({"state_dict": model.state_dict(), "hyper_parameters": hp,
                "pytorch-lightning_version": "2.6.0"}, path)
    loaded = GuidedFineTuner.load_from_checkpoint(path, map_location="cpu", weights_only=False)
    assert isinstance(loaded.regularizer, _Renamed)
    assert loaded.regularizer.scale == 0.5 and loaded.regularizer.consistency_target == "self"


def test_requirements_are_the_one_declaration_the_fine_tuner_reads():
    from cft_lightning._plugins import Requirements

    assert CFT(mask_kind="object").requirements == Requirements(masks=("object",), relevance=True)
    assert PlainFineTuning(consistency_target="reference").requirements.reference_logits
    assert GradMask().requirements == Requirements(masks=("object",), autograd=True)
    assert LVLMCritic(alignment_ratio=0.25).requirements.alignment == ("critic", 0.25)
    with pytest.raises(ValueError, match="needs model.relevance"):
        GuidedFineTuner(spec(), CFT(), None, track_reference=False)
    with pytest.raises(ValueError, match="must be a cft_lightning.regularizers.Regularizer"):
        GuidedFineTuner(spec(), object(), None, track_reference=False)
