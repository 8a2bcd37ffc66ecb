"""Mixed precision: every guided objective under CPU autocast (bfloat16, what `trainer.precision: bf16-mixed` runs)
against float32 on the same weights and batch; the float32 regions that make it agree; 16-mixed's loss scaling;
and the start-up refusal of a precision a plugin does not declare.

The model is a 4-block, width-96 ViT on 64 px images (an 8 x 8 patch grid) with weights re-drawn far from timm's
near-uniform-attention init, so that attention, LayerNorm and the rules all matter (a 2-block 4 x 4 model gives
maps of 16 cells, where Pearson's r says little).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import lightning as L
import pytest
import timm
import torch
import torch.nn.functional as F
import yaml
from _lxt_oracle import randomize_
from lightning.pytorch.plugins.precision import MixedPrecision
from torch import Tensor, nn

from cft_lightning import regularizers as R
from cft_lightning import relevance as M
from cft_lightning._precision import ALL_PRECISIONS, check_precision, precision_kind
from cft_lightning._registry import REGULARIZERS, RELEVANCE
from cft_lightning.errors import CFTUserError, UnsupportedPrecisionError
from cft_lightning.models import BackboneSpec, GuidedFineTuner
from cft_lightning.regularizers.base import masks_to_grid
from cft_lightning.relevance.base import normalize_maps

SIZE, BATCH = 64, 4


def tiny_model(seed: int = 2) -> nn.Module:
    torch.manual_seed(seed)
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=SIZE, patch_size=8, depth=4,
                              embed_dim=96, num_heads=3, num_classes=10)
    return randomize_(model, seed).eval()


def tiny_batch(seed: int = 2) -> dict[str, Any]:
    gen = torch.Generator().manual_seed(seed)
    concept, obj = torch.zeros(BATCH, SIZE, SIZE), torch.zeros(BATCH, SIZE, SIZE)
    concept[:, 8:32, 16:48] = 1
    obj[:, 8:56, 8:56] = 1
    return {"image": torch.randn(BATCH, 3, SIZE, SIZE, generator=gen), "label": torch.tensor([1, 3, 5, 7]),
            "masks": {"concept": concept, "object": obj, "critic": 1 - obj}, "path": list("abcd")}


def run(reg: R.Regularizer, rel: M.RelevanceMethod | None, model: nn.Module, batch: dict,
        dtype: torch.dtype | None) -> tuple[Tensor, Tensor, Tensor | None, Tensor | None]:
    """(loss, flat parameter gradient, maps, raw maps) in float32 (dtype None) or under CPU autocast; the backward
    runs outside autocast, as Lightning runs it."""
    model.zero_grad(set_to_none=True)
    torch.manual_seed(0)  # RRDA draws its composites
    with torch.autocast("cpu", dtype=dtype or torch.bfloat16, enabled=dtype is not None):
        out = reg(batch, model, rel, None)
    out.total.backward()
    grad = torch.cat([p.grad.flatten() if p.grad is not None else torch.zeros(p.numel()) for p in model.parameters()])
    if out.relevance is None:
        return out.total.detach(), grad, None, None
    return out.total.detach(), grad, out.relevance.maps.detach(), out.relevance.raw.detach()


def pearson_min(a: Tensor, b: Tensor) -> float:
    """The lowest Pearson correlation over the images of two (B, ...) batches of maps."""
    a, b = a.flatten(1).double(), b.flatten(1).double()
    a, b = a - a.mean(1, keepdim=True), b - b.mean(1, keepdim=True)
    return float(((a * b).sum(1) / (a.norm(dim=1) * b.norm(dim=1))).min())


def assert_away_from_kinks(raw32: Tensor, raw16: Tensor, maps32: Tensor, masks: Tensor, log_terms: bool) -> None:
    """Guards the fixture, not the precision: the objectives are not smooth where a map's max or min cell changes
    (min-max normalisation) and, for CFT's logs, near Phi = 0 inside the mask and Phi = 1 outside it (d/dPhi
    -log(1 - Phi) is 1 / (1 - Phi); the cell at 1 is clamped and contributes nothing). A cell within bfloat16's
    rounding of such a kink flips the gradient whatever runs in float32 (measured: CFT + CP-LRP on another batch,
    a second-largest cell at 0.9994 outside the mask, gradient cosine -0.86)."""
    flat32, flat16 = raw32.flatten(1), raw16.flatten(1)
    assert torch.equal(flat32.argmax(1), flat16.argmax(1)) and torch.equal(flat32.argmin(1), flat16.argmin(1))
    if log_terms:
        grid = masks_to_grid(masks, tuple(maps32.shape[-2:])).flatten(1)
        phi = maps32.flatten(1)
        unclamped = (phi > 1e-6) & (phi < 1 - 1e-6)
        assert not ((grid > 0) & unclamped & (phi < 0.02)).any(), "a concept cell near Phi = 0"
        assert not ((grid < 1) & unclamped & (phi > 0.98)).any(), "a non-concept cell near Phi = 1"


# --------------------------------------------------------------------------------------------------
# 1. bfloat16 against float32: the three objectives (and the other AttnLRP rule)

AGREEMENT = {
    "cft_attnlrp": (lambda: R.CFT(), lambda: M.AttnLRP()),
    "cft_cp_lrp": (lambda: R.CFT(), lambda: M.AttnLRP(attention_rule="cp")),
    "robust_vit": (lambda: R.RobustViT(), lambda: M.GradientRollout()),
    "rrr": (lambda: R.RRR(), lambda: None),
}


@pytest.mark.parametrize("case", list(AGREEMENT))
def test_bf16_agrees_with_float32(case: str) -> None:
    make_reg, make_rel = AGREEMENT[case]
    model, batch = tiny_model(), tiny_batch()
    loss32, grad32, maps32, raw32 = run(make_reg(), make_rel(), model, batch, None)
    loss16, grad16, maps16, raw16 = run(make_reg(), make_rel(), model, batch, torch.bfloat16)
    if maps32 is None:  # RRR: the map it penalises is the input gradient of the summed log-probabilities
        def saliency(dtype: torch.dtype | None) -> Tensor:
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype is not None):
                return M.InputGradient(channels="sum")(model, batch["image"], batch["label"], differentiable=False).raw
        maps32, maps16 = saliency(None), saliency(torch.bfloat16)
    else:
        assert maps16.dtype == torch.float32  # maps are float32 whatever the autocast type
        assert_away_from_kinks(raw32, raw16, maps32, batch["masks"]["concept"], log_terms=case.startswith("cft"))
    r = pearson_min(maps16, maps32)
    loss_rel = float((loss16 - loss32).abs() / loss32.abs())
    cos = float(F.cosine_similarity(grad16.double(), grad32.double(), dim=0))
    assert r >= 0.99 and loss_rel <= 0.01 and cos >= 0.99, (r, loss_rel, cos)


# --------------------------------------------------------------------------------------------------
# 2. every other objective and method: runs and stays finite under bfloat16 and float16

FINITE = {
    "cft_rollout": (R.CFT, M.GradientRollout),
    "cft_gradcam": (R.CFT, M.GradCAM),
    "cft_input_grad": (R.CFT, M.InputGradient),
    "cft_ixg": (R.CFT, M.InputXGradient),
    "cft_grad_x_act": (R.CFT, M.LayerGradXActivation),
    "cft_iia": (R.CFT, lambda: M.IIA(steps=1)),
    "object_attnlrp": (R.ObjectMaskGuidance, M.AttnLRP),
    "plain": (R.PlainFineTuning, lambda: None),
    "gradmask": (R.GradMask, lambda: None),
    "gradmask_authors": (lambda: R.GradMask(form="authors"), lambda: None),
    "rrda": (R.RRDA, lambda: None),
    "lvlm_va": (R.LVLMCritic, lambda: None),
}


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("case", list(FINITE))
def test_every_objective_is_finite_under_autocast(case: str, dtype: torch.dtype) -> None:
    make_reg, make_rel = FINITE[case]
    loss, grad, maps, _ = run(make_reg(), make_rel(), tiny_model(), tiny_batch(), dtype)
    assert torch.isfinite(loss) and torch.isfinite(grad).all() and grad.abs().max() > 0
    if maps is not None:
        assert maps.dtype == torch.float32 and 0.0 <= float(maps.min()) and float(maps.max()) <= 1.0


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_cnn_relevance_trains_under_autocast(dtype: torch.dtype, monkeypatch: pytest.MonkeyPatch) -> None:
    """ConvNeXt-V2 (the paper's CNN, LayerNorm2d and GRN) with CFT on gradient x activation and Grad-CAM.

    float16 runs LayerNorm in float32, as CUDA autocast does (16-mixed exists on GPUs only: Lightning turns it
    into bf16-mixed on a CPU). CPU autocast runs layer_norm in float16, and its double backward returns NaN on
    this model (measured); CUDA's policy is what a 16-mixed run computes."""
    if dtype == torch.float16:
        layer_norm = F.layer_norm

        def cuda_policy(x: Tensor, shape: Any, weight: Tensor | None = None, bias: Tensor | None = None,
                        eps: float = 1e-5) -> Tensor:
            with torch.autocast("cpu", enabled=False):
                return layer_norm(x.float(), shape, weight, bias, eps)

        monkeypatch.setattr(F, "layer_norm", cuda_policy)
    torch.manual_seed(0)
    model = timm.create_model("convnextv2_atto", pretrained=False, num_classes=10).eval()
    for rel in (M.LayerGradXActivation(), M.GradCAM()):
        loss, grad, maps, _ = run(R.CFT(), rel, model, tiny_batch(), dtype)
        assert torch.isfinite(loss) and torch.isfinite(grad).all() and maps.dtype == torch.float32


def test_zennit_lrp_explains_under_autocast() -> None:
    model = timm.create_model("resnet18", pretrained=False, num_classes=4).eval()
    images = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    want = M.ZennitLRP()(model, images, torch.tensor([0, 1]), differentiable=False).maps
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = M.ZennitLRP()(model, images, torch.tensor([0, 1]), differentiable=False).maps
    assert got.dtype == torch.float32 and pearson_min(got, want) > 0.999  # its rules run in float32 on a copy


# --------------------------------------------------------------------------------------------------
# 3. the float32 regions, one by one


def test_maps_are_float32_and_cft_log_terms_finite_for_low_precision_relevance() -> None:
    # bfloat16 relevance whose largest cells differ by less than bfloat16 resolves near 1
    raw = torch.tensor([[[0.0, 1.0], [0.999, 0.5]]]).to(torch.bfloat16)
    maps = normalize_maps(raw)
    assert maps.dtype == torch.float32
    masks = torch.tensor([[[1.0, 0.0], [0.0, 1.0]]])
    concept, non_concept = R.alignment_terms(maps.to(torch.bfloat16), masks)  # a map handed over in bfloat16
    assert torch.isfinite(concept) and torch.isfinite(non_concept)
    # 0.999 and 1 - 1e-6 round to 1 in bfloat16: without float32 the clamp would leave Phi = 1 there and
    # log(1 - Phi) = -inf; in float32 both non-concept cells sit at the clamp, -log(1e-6) each
    assert float(non_concept) == pytest.approx(-math.log(1e-6), rel=1e-2)


def test_rollout_and_attnlrp_records_stay_float32_under_autocast() -> None:
    from cft_lightning.relevance._vit import trace_vit

    model, batch = tiny_model(), tiny_batch()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        trace = trace_vit(model, batch["image"])
        rel = M.GradientRollout()(model, batch["image"], batch["label"])
    blk = trace.blocks[0]
    assert blk.attn.dtype == torch.float32 and blk.norm1.std.dtype == torch.float32  # softmax and LN statistics
    assert blk.hidden.dtype == torch.bfloat16  # the matrix products do run in bfloat16
    assert rel.raw.dtype == torch.float32


# --------------------------------------------------------------------------------------------------
# 4. the run: start-up refusal, 16-mixed's loss scaling


def test_precision_kinds_and_the_one_line_refusal() -> None:
    assert [precision_kind(p) for p in ("bf16-mixed", "16-mixed", "32-true", "bf16-true", 32, "64-true")] == [
        "bf16", "16", "32", "bf16", "32", None]
    check_precision("16-mixed", {"model.relevance": (M.AttnLRP, ALL_PRECISIONS)})
    with pytest.raises(UnsupportedPrecisionError) as info:
        check_precision("16-mixed", {"model.relevance": (M.AttnLRP, ("32", "bf16"))})
    message = str(info.value)
    assert isinstance(info.value, CFTUserError) and "\n" not in message
    assert "model.relevance AttnLRP" in message and "16-mixed" in message and "`bf16-mixed`" in message


def test_every_plugin_declares_its_precisions() -> None:
    for registry in (RELEVANCE, REGULARIZERS):
        for name in registry.names():
            declared = registry.class_of(name).precisions
            assert declared and set(declared) <= set(ALL_PRECISIONS) and "32" in declared, name


class _Counting(R.PlainFineTuning):
    """Plain fine-tuning that counts its steps and, like a method unfit for float16, declares no "16"."""

    precisions = ("32", "bf16")
    calls = 0

    def __call__(self, *args: Any) -> R.RegularizerOutput:
        type(self).calls += 1
        return super().__call__(*args)


def _spec() -> BackboneSpec:
    return BackboneSpec(name="vit_tiny_patch16_224", pretrained=False, num_classes=3,
                        model_kwargs={"img_size": 32, "patch_size": 8, "depth": 2})


def _trainer(tmp_path: Path, precision_plugin: MixedPrecision, steps: int) -> L.Trainer:
    return L.Trainer(accelerator="cpu", devices=1, default_root_dir=tmp_path, max_steps=steps, logger=False,
                     enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                     inference_mode=False, plugins=[precision_plugin])


def _loader(n: int = 4) -> torch.utils.data.DataLoader:
    images = torch.randn(n, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    masks = torch.zeros(n, 32, 32)
    masks[:, 8:24, 8:24] = 1
    items = [{"image": images[i], "label": i % 3, "masks": {"concept": masks[i], "object": masks[i]},
              "path": str(i)} for i in range(n)]
    return torch.utils.data.DataLoader(items, batch_size=2)


def test_16_mixed_with_a_method_without_float16_stops_before_any_step(tmp_path: Path) -> None:
    _Counting.calls = 0
    model = GuidedFineTuner(_spec(), _Counting(), lr=1e-3)
    with pytest.raises(UnsupportedPrecisionError, match=r"model.regularizer _Counting .* 16-mixed.*`bf16-mixed`"):
        # 16-mixed on CPU through the plugin (the Trainer flag turns 16-mixed into bf16-mixed on CPU)
        _trainer(tmp_path, MixedPrecision("16-mixed", "cpu"), 2).fit(model, _loader())
    assert _Counting.calls == 0
    _trainer(tmp_path, MixedPrecision("bf16-mixed", "cpu"), 1).fit(model, _loader())  # bf16 is declared
    assert _Counting.calls == 1


def test_16_mixed_skips_overflowing_steps_instead_of_stopping(tmp_path: Path) -> None:
    """The GradScaler starts at a loss scale of 2^16: the first steps overflow float16 and are skipped while the
    scale halves. They are not a non-finite gradient to stop the run for."""
    torch.manual_seed(0)
    model = GuidedFineTuner(_spec(), R.CFT(mask_kind="concept"), M.AttnLRP(), lr=1e-3)
    plugin = MixedPrecision("16-mixed", "cpu")
    _trainer(tmp_path, plugin, 3).fit(model, _loader(6))
    assert plugin.scaler.get_scale() < 2.0**16  # some step did overflow and was skipped


def test_cft_fit_and_test_with_bf16_mixed_on_the_smoke_config(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import csv

    from cft_lightning.cli import main
    from cft_lightning.smoke_data import generate

    monkeypatch.setattr("sys.argv", ["cft"])
    data, runs = generate(tmp_path / "data", classes=3, per_class=2, size=32, seed=0), tmp_path / "runs"
    args = ["--config", str(Path(__file__).resolve().parents[1] / "configs" / "smoke.yaml"),
            "--data.root", str(data / "images" / "train"), "--data.masks", str(data / "masks"),
            "--data.val_root", str(data / "images" / "val"), "--data.test_root", str(data / "images" / "test"),
            "--model.backbone.num_classes", "3",
            "--model.backbone.model_kwargs", '{"img_size": 32, "patch_size": 8, "depth": 2}',
            "--trainer.default_root_dir", str(runs), "--trainer.logger.init_args.save_dir", str(runs),
            "--trainer.max_epochs", "2", "--trainer.enable_progress_bar", "false",
            "--trainer.enable_model_summary", "false", "--trainer.precision", "bf16-mixed"]
    main(["fit", *args])
    saved = yaml.safe_load((runs / "lightning_logs" / "version_0" / "config.yaml").read_text())
    assert saved["trainer"]["precision"] == "bf16-mixed"
    with open(runs / "lightning_logs" / "version_0" / "metrics.csv") as fh:
        rows = list(csv.DictReader(fh))
    losses = [float(r[k]) for r in rows for k in ("train/loss_step", "val/loss", "train/concept_step") if r.get(k)]
    assert len(losses) >= 6 and all(math.isfinite(v) for v in losses)
    main(["test", *args, "--ckpt_path", "last"])  # relevance metrics under autocast too
    with open(runs / "lightning_logs" / "version_1" / "metrics.csv") as fh:
        tested = {k: float(v) for row in csv.DictReader(fh) for k, v in row.items() if v}
    assert tested and all(math.isfinite(v) for v in tested.values())


def test_plugins_get_the_float32_region_from_the_public_seams():
    """docs/extending.md tells plugin authors to import `float32_region` and `upcast` from the seam they
    implement: both seams give the same helpers, and a product inside the region stays float32 under autocast."""
    from cft_lightning import regularizers, relevance

    assert relevance.float32_region is regularizers.float32_region
    assert relevance.upcast is regularizers.upcast
    x = torch.randn(4, 4)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert (x @ x).dtype == torch.bfloat16
        low = (x @ x).to(torch.bfloat16)
        with relevance.float32_region(low):
            assert (relevance.upcast(low) @ relevance.upcast(low)).dtype == torch.float32
