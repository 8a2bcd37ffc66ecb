"""Decision-reliance diagnostics of `cft test`: the fill, concept removal and background swap
(`evaluation/interventions.py`), the Dataset's donors (`data/donors.py`), the Evaluator's metrics, two
hand-written classifiers whose reliance is known, and the end-to-end run with and without `data.interventions`.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from _data_helpers import DATA_CONFIG, make_folder, make_masks, write_image
from lightning.pytorch.overrides.distributed import UnrepeatedDistributedSampler
from torch import Tensor, nn
from torch.utils.data import DataLoader

from cft_lightning.cli import main
from cft_lightning.data import DataError, GuidanceDataModule, GuidanceDataset, MaskStore
from cft_lightning.data.donors import choose_donors
from cft_lightning.data.image_folder import build_samples, scan_image_folder
from cft_lightning.data.transforms import JointTransform
from cft_lightning.evaluation.evaluator import INTERVENTION_METRICS, MODELS, Evaluator
from cft_lightning.evaluation.interventions import (
    _gaussian_blur,
    fill_region,
    intervene,
    remove_concepts,
    swap_background,
)
from cft_lightning.models import BackboneSpec, GuidedFineTuner
from cft_lightning.regularizers import PlainFineTuning
from cft_lightning.smoke_data import generate

KEYS = tuple(INTERVENTION_METRICS.values())  # acc1_concepts_removed, acc1_background_swapped, bg_follow
EXACT = {**DATA_CONFIG, "crop_pct": 1.0}  # 32 px in, 32 px out: the geometry of the drawn images is kept


def square(n: int, size: int, lo: int, hi: int) -> Tensor:
    mask = torch.zeros(n, size, size, dtype=torch.bool)
    mask[:, lo:hi, lo:hi] = True
    return mask


# --------------------------------------------------------------------------------------------------
# 1. fill_region, remove_concepts, swap_background


def test_fill_keeps_every_pixel_outside_the_hole_exactly() -> None:
    torch.manual_seed(0)
    images, hole = torch.randn(3, 3, 16, 16), torch.rand(3, 16, 16) > 0.6
    out = fill_region(images, hole)
    keep = ~hole[:, None].expand_as(images)
    assert torch.equal(out[keep], images[keep])
    assert not torch.equal(out[~keep], images[~keep])


def test_fill_of_a_constant_known_region_is_that_constant() -> None:
    colour = torch.tensor([0.3, -1.2, 2.0])
    images = torch.randn(2, 3, 24, 24)
    images[:] = colour[None, :, None, None]
    hole = square(2, 24, 4, 20)
    images[hole[:, None].expand_as(images)] = 9.0  # the hole's own content must not leak into its fill
    for sigma in (None, 1.0):  # sigma 1: the hole's centre is > 3 sigma from any known pixel (mean fallback)
        out = fill_region(images, hole, sigma=sigma)
        assert torch.allclose(out, colour[None, :, None, None].expand_as(out), atol=1e-5)


def test_filled_values_lie_within_the_known_range_per_channel() -> None:
    torch.manual_seed(1)
    images = torch.rand(4, 3, 20, 20) * torch.tensor([1.0, 5.0, -2.0])[:, None, None]
    hole = torch.rand(4, 20, 20) > 0.5
    hole[0] = False
    hole[0, 2:18, 2:18] = True  # one large hole
    out = fill_region(images, hole, sigma=2.0)
    known = (~hole)[:, None].expand_as(images)
    for b in range(images.shape[0]):
        for c in range(images.shape[1]):
            values = images[b, c][known[b, c]]
            filled = out[b, c][~known[b, c]]
            assert filled.min() >= values.min() - 1e-5 and filled.max() <= values.max() + 1e-5


def test_fill_of_a_batch_equals_one_call_per_image() -> None:
    torch.manual_seed(2)
    images, hole, known = torch.randn(5, 3, 12, 16), torch.rand(5, 12, 16) > 0.5, torch.rand(5, 12, 16) > 0.3
    batch = fill_region(images, hole, known)
    single = torch.cat([fill_region(images[i : i + 1], hole[i : i + 1], known[i : i + 1]) for i in range(5)])
    assert torch.allclose(batch, single, atol=1e-6)


def test_fill_has_no_nan_with_an_empty_known_region_or_an_empty_hole() -> None:
    images = torch.randn(2, 3, 8, 8)
    everything = torch.ones(2, 8, 8, dtype=torch.bool)
    out = fill_region(images, everything)  # nothing known: the empty value (0: the data set's mean colour)
    assert torch.isfinite(out).all() and torch.equal(out, torch.zeros_like(out))
    assert torch.equal(fill_region(images, everything, empty_value=0.5), torch.full_like(out, 0.5))
    nothing = torch.zeros(2, 8, 8)
    assert torch.equal(fill_region(images, nothing), images)
    known_elsewhere = fill_region(images, square(2, 8, 0, 4), known=torch.zeros(2, 8, 8))
    assert torch.isfinite(known_elsewhere).all()


def test_blur_is_the_separable_gaussian_convolution_with_zero_padding() -> None:
    torch.manual_seed(3)
    x = torch.randn(2, 4, 13, 17)
    sigma, radius = 2.5, 8
    taps = torch.exp(-0.5 * (torch.arange(-radius, radius + 1.0) / sigma) ** 2)
    taps = taps / taps.sum()
    flat = x.reshape(-1, 1, 13, 17)
    ref = F.conv2d(F.conv2d(flat, taps.view(1, 1, -1, 1), padding=(radius, 0)), taps.view(1, 1, 1, -1),
                   padding=(0, radius)).reshape(x.shape)
    assert torch.allclose(_gaussian_blur(x, sigma), ref, atol=1e-6)


def test_fill_rejects_misshapen_masks() -> None:
    with pytest.raises(ValueError, match=r"hole must be \(B, H, W\)"):
        fill_region(torch.zeros(2, 3, 8, 8), torch.zeros(2, 8, 9))
    with pytest.raises(ValueError, match="donor images"):
        swap_background(torch.zeros(2, 3, 8, 8), torch.zeros(2, 8, 8), torch.zeros(1, 3, 8, 8), torch.zeros(1, 8, 8))


def test_concepts_are_filled_from_the_object_colour_not_the_background() -> None:
    grey, red, blue = (torch.tensor(c)[:, None, None] for c in ([0.0, 0.0, 0.0], [2.0, -1.0, -1.0], [-1.0, -1.0, 2]))
    images = blue.expand(3, 3, 32, 32).clone()
    obj, concept = square(3, 32, 8, 24), square(3, 32, 12, 20)
    images[obj[:, None].expand_as(images)] = grey.expand(3, 3, 32, 32)[obj[:, None].expand_as(images)]
    images[concept[:, None].expand_as(images)] = red.expand(3, 3, 32, 32)[concept[:, None].expand_as(images)]
    hole = concept[:, None].expand_as(images)
    out = remove_concepts(images, concept.float(), obj.float())
    assert torch.allclose(out[hole], torch.zeros_like(out[hole]), atol=1e-6)  # the grey body
    assert torch.equal(out[~hole], images[~hole])  # background and body untouched
    # no object mask, or an object that is all concept: from every non-concept pixel (here: blue and grey)
    for object_mask in (None, concept.float()):
        out = remove_concepts(images, concept, object_mask)
        assert out[0, 2, 16, 16] > 0.1  # blue leaks in from the background
    # one image with and one without object pixels: decided per image
    mixed = torch.stack([obj[0], concept[1], obj[2]])
    out = remove_concepts(images, concept, mixed)
    assert out[1, 2, 16, 16] > 0.1 and abs(float(out[0, 2, 16, 16])) < 1e-6


def test_swap_puts_the_foreground_on_the_donor_background_without_the_donor_object() -> None:
    size = 24
    images = torch.full((2, 3, size, size), 1.0)
    fg = square(2, size, 8, 16)
    donors = torch.full((2, 3, size, size), -1.0)
    donor_fg = square(2, size, 4, 20)
    donors[donor_fg[:, None].expand_as(donors)] = 5.0  # the donor's object: must not show
    out = swap_background(images, fg, donors, donor_fg)
    inside = fg[:, None].expand_as(out)
    assert torch.equal(out[inside], images[inside])
    assert torch.allclose(out[~inside], torch.full_like(out[~inside], -1.0), atol=1e-5)


def test_intervene_needs_donors_and_names_what_is_missing() -> None:
    images = torch.randn(2, 3, 8, 8)
    masks = {"concept": square(2, 8, 2, 5).float(), "object": square(2, 8, 1, 7).float()}
    assert intervene({"image": images, "masks": masks}) == {}  # no donors: no intervention
    batch = {"image": images, "masks": masks, "donor_image": images.flip(0), "donor_label": torch.tensor([1, 0])}
    with pytest.raises(ValueError, match="'donor_masks'"):
        intervene(batch)
    with pytest.raises(ValueError, match="foreground kind is 'object'"):
        intervene({**batch, "donor_masks": {"concept": masks["concept"]}})
    views = intervene({**batch, "donor_masks": {"object": masks["object"].flip(0)}})
    assert set(views) == {"concepts_removed", "background_swapped"}
    only_object = {**batch, "masks": {"object": masks["object"]}, "donor_masks": {"object": masks["object"]}}
    assert set(intervene(only_object)) == {"background_swapped"}


# --------------------------------------------------------------------------------------------------
# 2. donors


def test_donors_are_deterministic_of_another_label_and_uniform() -> None:
    labels = np.repeat([0, 1, 2, -1], [300, 200, 100, 50])
    donors = choose_donors(labels, seed=0)
    assert np.array_equal(donors, choose_donors(labels, seed=0))
    assert not np.array_equal(donors, choose_donors(labels, seed=1))
    assert (labels[donors] != labels).all()
    # uniform over the other-label images: class 0's donors come from 1, 2 and -1 in proportion 200:100:50
    shares = np.bincount(labels[donors[labels == 0]] + 1, minlength=4)[[2, 3, 0]] / 300
    assert np.allclose(shares, [200 / 350, 100 / 350, 50 / 350], atol=0.08)
    single = choose_donors([4] * 5)  # one label: any other image, never itself
    assert (single != np.arange(5)).all() and single.min() >= 0 and single.max() < 5
    assert choose_donors([7]).tolist() == [0] and choose_donors([]).tolist() == []


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    root = tmp_path_factory.mktemp("donors")
    rels = make_folder(root / "images", {"a": 4, "b": 3, "c": 2})
    store = make_masks(root / "masks", rels, kinds=("concept", "object"))
    samples = build_samples(scan_image_folder(root / "images"), ["a", "b", "c"])
    return {"root": root / "images", "samples": samples, "store": store}


def donor_dataset(folder: dict[str, Any], kinds: tuple[str, ...] = ("concept", "object"), **kw: Any) -> GuidanceDataset:
    return GuidanceDataset(folder["root"], folder["samples"], JointTransform(DATA_CONFIG, train=False),
                           folder["store"], kinds, **kw)


def per_index(loader: Any) -> dict[int, dict[str, Any]]:
    out = {}
    for batch in loader:
        for j, i in enumerate(batch["index"].tolist()):
            out[i] = {"donor_index": int(batch["donor_index"][j]), "donor_label": int(batch["donor_label"][j]),
                      "donor_image": batch["donor_image"][j], "donor_mask": batch["donor_masks"]["object"][j]}
    return out


def test_dataset_donors_do_not_depend_on_batching_or_ranks(folder: dict[str, Any]) -> None:
    dataset = donor_dataset(folder, donors=True)
    assert dataset.donor_kind == "object"
    a = per_index(DataLoader(dataset, batch_size=2))
    b = per_index(DataLoader(dataset, batch_size=5, shuffle=True, generator=torch.Generator().manual_seed(0)))
    ranks = [per_index(DataLoader(dataset, batch_size=3, sampler=UnrepeatedDistributedSampler(
        dataset, num_replicas=2, rank=r, shuffle=False))) for r in (0, 1)]
    assert set(a) == set(b) == set(range(len(dataset))) == set(ranks[0]) | set(ranks[1])
    for i in a:
        other = b[i]
        shard = ranks[0].get(i) or ranks[1][i]
        for key in ("donor_index", "donor_label"):
            assert a[i][key] == other[key] == shard[key]
        assert torch.equal(a[i]["donor_image"], other["donor_image"])
        assert torch.equal(a[i]["donor_mask"], shard["donor_mask"])
        donor = a[i]["donor_index"]
        assert a[i]["donor_label"] == dataset.samples[donor].label != dataset.samples[i].label
        assert torch.equal(a[i]["donor_image"], dataset[donor]["image"])  # the same eval transform


def test_donors_are_off_by_default_and_need_a_foreground_kind(folder: dict[str, Any]) -> None:
    item = donor_dataset(folder)[0]
    assert not {k for k in item if k.startswith("donor")}
    assert set(donor_dataset(folder, ("concept",), donors=True)[0]["donor_masks"]) == {"concept"}
    with pytest.raises(DataError, match="need an 'object' or 'concept' mask kind"):
        donor_dataset(folder, (), donors=True)


def test_datamodule_interventions_need_masks(folder: dict[str, Any], tmp_path: Path) -> None:
    root = str(folder["root"])
    with pytest.raises(DataError, match="data.interventions needs masks"):
        GuidanceDataModule(root, mask_kinds=[], interventions=True)
    with pytest.raises(DataError, match="data.interventions needs masks"):
        GuidanceDataModule(root, masks=str(folder["store"].root), mask_kinds=["critic"], interventions=True)
    bare = tmp_path / "bare"  # a test split whose images have no masks in the store: warned and skipped
    write_image(bare / "a" / "unmasked.png", np.zeros((32, 32, 3), np.uint8))
    dm = GuidanceDataModule(root, masks=str(folder["store"].root), mask_kinds=["concept", "object"],
                            test_root={"masked": root, "bare": str(bare)}, data_config=DATA_CONFIG,
                            interventions=True)
    with pytest.warns(UserWarning, match="bare.*metrics are skipped"):
        dm.setup("test")
    masked, unmasked = dm.test_dataset
    assert masked.donor_indices is not None and unmasked.donor_indices is None


# --------------------------------------------------------------------------------------------------
# 3. classifiers whose reliance is known: one reads the background, one reads the concept

SIZE = 32
GREY = (128, 128, 128)  # every object's body
BACKGROUNDS = ((210, 200, 40), (40, 200, 210), (200, 40, 210))  # one per class
CONCEPTS = ((230, 30, 30), (30, 220, 40), (40, 50, 230))  # one per class, the centre 8x8 of the body


def normalised(colours: tuple[tuple[int, int, int], ...]) -> Tensor:
    mean, std = torch.tensor(EXACT["mean"]), torch.tensor(EXACT["std"])
    return (torch.tensor(colours, dtype=torch.float32) / 255 - mean) / std


class NearestColour(nn.Module):
    """Logits = -squared distance of the mean colour of `region` (a (H, W) bool mask) to each class colour."""

    def __init__(self, region: Tensor, colours: Tensor) -> None:
        super().__init__()
        self.register_buffer("region", region.float())
        self.register_buffer("colours", colours)

    def forward(self, images: Tensor) -> Tensor:
        mean = (images * self.region).sum(dim=(2, 3)) / self.region.sum()
        return -((mean[:, None, :] - self.colours[None]) ** 2).sum(dim=-1)


@pytest.fixture(scope="module")
def drawn(tmp_path_factory: pytest.TempPathFactory) -> GuidanceDataset:
    """4 images per class: a noisy class-coloured background, a grey body (16x16) with a class-coloured concept
    (8x8) in the middle; object and concept masks."""
    root = tmp_path_factory.mktemp("drawn")
    store = MaskStore(root / "masks")
    obj, concept = np.zeros((SIZE, SIZE), bool), np.zeros((SIZE, SIZE), bool)
    obj[8:24, 8:24], concept[12:20, 12:20] = True, True
    rng = np.random.default_rng(0)
    for label, name in enumerate(("a", "b", "c")):
        for i in range(4):
            pixels = np.array(BACKGROUNDS[label], float) + rng.uniform(-12, 12, (SIZE, SIZE, 3))
            pixels[obj], pixels[concept] = GREY, CONCEPTS[label]
            rel = f"{name}/{i}.png"
            write_image(root / "images" / rel, pixels.round().astype(np.uint8))
            store.write(rel, "object", obj)
            store.write(rel, "concept", concept)
    samples = build_samples(scan_image_folder(root / "images"), ["a", "b", "c"])
    return GuidanceDataset(root / "images", samples, JointTransform(EXACT, train=False), store, ["concept", "object"],
                           donors=True)


def reliance(model: nn.Module, dataset: GuidanceDataset) -> dict[str, float]:
    evaluator = Evaluator(["s"], 3)
    for batch in DataLoader(dataset, batch_size=5):  # batches mix classes and split them unevenly
        views = intervene(batch)
        with torch.no_grad():
            evaluator.update(0, "fine_tuned", model(batch["image"]), batch, None)
            evaluator.update_interventions(0, "fine_tuned", batch, {k: model(v) for k, v in views.items()})
    return {k: v["fine_tuned"] for k, v in evaluator.results()["s"]["metrics"].items()}


def test_background_reader_follows_the_swapped_background_and_ignores_concept_removal(
        drawn: GuidanceDataset) -> None:
    border = torch.ones(SIZE, SIZE, dtype=torch.bool)
    border[3:-3, 3:-3] = False
    res = reliance(NearestColour(border, normalised(BACKGROUNDS)), drawn)
    assert res["acc1"] == 1.0 and res["acc1_concepts_removed"] == 1.0
    assert res["acc1_background_swapped"] == 0.0 and res["bg_follow"] == 1.0


def test_concept_reader_ignores_the_swap_and_fails_without_its_concepts(drawn: GuidanceDataset) -> None:
    centre = torch.zeros(SIZE, SIZE, dtype=torch.bool)
    centre[14:18, 14:18] = True
    res = reliance(NearestColour(centre, normalised(CONCEPTS)), drawn)
    assert res["acc1"] == 1.0 and res["acc1_background_swapped"] == 1.0 and res["bg_follow"] == 0.0
    # the concept becomes the grey body: one prediction for all 12 images, right for one class of 3 only
    assert res["acc1_concepts_removed"] == pytest.approx(1 / 3)


# --------------------------------------------------------------------------------------------------
# 4. the Evaluator's metrics


def test_bg_follow_counts_only_donors_of_another_label_and_keys_are_absent_otherwise() -> None:
    ev = Evaluator(["s", "plain"], 3)
    logits = 5.0 * F.one_hot(torch.tensor([1, 1, 2, 0]), 3).float()
    batch = {"label": torch.tensor([0, 1, 2, -1]), "donor_label": torch.tensor([1, 1, 0, 2])}
    for who in MODELS:
        ev.update(0, who, logits, batch, None)
        ev.update_interventions(0, who, batch, {"background_swapped": logits})
        ev.update(1, who, logits, batch, None)
    res = ev.results()
    m = res["s"]["metrics"]
    assert m["acc1_background_swapped"]["fine_tuned"] == pytest.approx(2 / 3)  # the labelled images 0, 1, 2
    assert m["bg_follow"]["fine_tuned"] == pytest.approx(1 / 2)  # images 0 (follows) and 2 (does not)
    assert m["bg_follow"]["delta"] == 0.0 and "acc1_concepts_removed" not in m
    assert not set(KEYS) & set(res["plain"]["metrics"])
    with pytest.raises(KeyError, match="unknown intervention"):
        ev.update_interventions(0, "original", batch, {"bg_follow": logits})


# --------------------------------------------------------------------------------------------------
# 5. end to end: `cft test` and Trainer.test of GuidedFineTuner


@pytest.fixture(scope="module")
def smoke(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return generate(tmp_path_factory.mktemp("smoke") / "data", classes=3, per_class=3, size=32, seed=1)


def test_cft_test_writes_the_reliance_metrics_only_with_the_flag(smoke: Path, tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sys, "argv", ["cft"])
    repo = Path(__file__).resolve().parents[1]
    for flag in ("true", "false"):
        runs = tmp_path / flag
        main(["test", "--config", str(repo / "configs" / "smoke.yaml"), "--data.root", str(smoke / "images/train"),
              "--data.masks", str(smoke / "masks"), "--data.test_root", str(smoke / "images/test"),
              "--data.val_root", str(smoke / "images/val"), "--data.interventions", flag,
              "--model.backbone.num_classes", "3",
              "--model.backbone.model_kwargs", '{"img_size": 32, "patch_size": 8, "depth": 1}',
              "--trainer.default_root_dir", str(runs), "--trainer.logger.init_args.save_dir", str(runs),
              "--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false"])
        (results,) = runs.rglob("results.json")
        metrics = json.loads(results.read_text(encoding="utf-8"))["splits"]["test"]["metrics"]
        if flag == "false":
            assert not set(KEYS) & set(metrics)
            continue
        for key in KEYS:
            assert set(metrics[key]) == {"original", "fine_tuned", "delta"}, key
            assert 0.0 <= metrics[key]["fine_tuned"] <= 1.0
            assert metrics[key]["original"] == metrics[key]["fine_tuned"]  # untrained: the reference is a copy
        assert "| test | top-1, background swapped |" in results.with_suffix(".md").read_text(encoding="utf-8")


def test_trainer_test_scores_each_model_on_the_intervened_images(smoke: Path, tmp_path: Path) -> None:
    """The numbers of results.json, recomputed by hand per model from the test split's dataset."""
    torch.manual_seed(0)
    spec = BackboneSpec("vit_tiny_patch16_224", pretrained=False, num_classes=3,
                        model_kwargs={"img_size": 32, "patch_size": 8, "depth": 1})
    module = GuidedFineTuner(spec, PlainFineTuning(), None)
    with torch.no_grad():  # the fine-tuned model differs from its reference
        module.backbone.head.bias.add_(torch.tensor([0.0, 0.3, -0.3]))
    dm = GuidanceDataModule(str(smoke / "images/train"), masks=str(smoke / "masks"), mask_kinds=["concept", "object"],
                            test_root=str(smoke / "images/test"), batch_size=4, interventions=True)
    trainer = L.Trainer(accelerator="cpu", devices=1, logger=False, default_root_dir=tmp_path, inference_mode=False,
                        enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False)
    trainer.test(module, dm, verbose=False)
    metrics = json.loads((tmp_path / "results.json").read_text(encoding="utf-8"))["splits"]["test"]["metrics"]
    batch = next(iter(DataLoader(dm.test_dataset, batch_size=len(dm.test_dataset))))
    views = intervene(batch)
    differs = batch["donor_label"] != batch["label"]
    assert differs.all()
    for who, net in (("fine_tuned", module.backbone), ("original", module.reference)):
        with torch.no_grad():
            removed, swapped = (net.eval()(views[k]).argmax(1) for k in ("concepts_removed", "background_swapped"))
        expected = {"acc1_concepts_removed": (removed == batch["label"]).float().mean(),
                    "acc1_background_swapped": (swapped == batch["label"]).float().mean(),
                    "bg_follow": (swapped == batch["donor_label"]).float().mean()}
        for key, value in expected.items():
            assert metrics[key][who] == pytest.approx(float(value)), (who, key)
    assert not all(math.isclose(metrics[k]["delta"], 0.0) for k in KEYS)  # the two models were told apart


@pytest.mark.slow
def test_cft_test_on_two_ddp_processes_equals_one(smoke: Path, tmp_path: Path) -> None:
    """Donors come from the Dataset and the metrics are sum-synced: 2 gloo processes give the 1-process numbers
    (9 test images: the ranks get 5 and 4)."""
    cft = Path(sys.executable).parent / "cft"
    repo = Path(__file__).resolve().parents[1]
    env = {**os.environ, "WANDB_MODE": "disabled", "PYTHONWARNINGS": "ignore"}
    found = {}
    for devices in ("1", "2"):
        runs = tmp_path / devices
        args = [str(cft), "test", "--config", str(repo / "configs" / "smoke.yaml"),
                "--data.root", str(smoke / "images/train"), "--data.masks", str(smoke / "masks"),
                "--data.test_root", str(smoke / "images/test"), "--data.val_root", str(smoke / "images/val"),
                "--data.interventions", "true", "--data.batch_size", "2", "--model.backbone.num_classes", "3",
                "--model.backbone.model_kwargs", '{"img_size": 32, "patch_size": 8, "depth": 1}',
                "--trainer.default_root_dir", str(runs), "--trainer.logger.init_args.save_dir", str(runs),
                "--trainer.enable_progress_bar", "false", "--trainer.devices", devices,
                *(["--trainer.strategy", "ddp"] if devices == "2" else [])]
        proc = subprocess.run(args, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stderr[-3000:]
        (results,) = runs.rglob("results.json")
        found[devices] = json.loads(results.read_text(encoding="utf-8"))["splits"]["test"]
    assert found["2"]["num_images"] == found["1"]["num_images"] == 9
    for key in (*KEYS, "acc1"):
        assert found["2"]["metrics"][key] == found["1"]["metrics"][key], key


def test_a_part_that_sticks_out_is_painted_over_by_the_background_and_the_margin_takes_the_rim() -> None:
    """A concept inside the object takes the object's colour, one outside it the background's (no outline of a
    horn is left); the hole grows by `margin` px, so an anti-aliased rim around the concept goes too, and
    nothing beyond the margin changes."""
    size = 32
    images = torch.full((1, 3, size, size), -1.0)  # background
    obj = square(1, size, 8, 24)
    images[:, :, 8:24, 8:24] = 0.0  # the body
    concept = torch.zeros(1, size, size, dtype=torch.bool)
    concept[:, 14:18, 14:18] = True  # an eye, inside the body
    concept[:, 2:8, 14:18] = True  # a horn, above the body (outside the object mask)
    obj = obj | concept
    images[:, :, 14:18, 14:18] = 3.0
    images[:, :, 2:8, 14:18] = 3.0
    images[:, :, 1, 14:18] = 1.5  # the horn's anti-aliased tip, just outside its mask
    out = remove_concepts(images, concept, obj, margin=1)
    assert torch.allclose(out[:, :, 14:18, 14:18], torch.zeros(1, 3, 4, 4), atol=1e-4)  # body colour
    # the horn away from the body: background colour (its base, next to the body, may take the body's)
    assert torch.allclose(out[:, :, 2:6, 14:18], torch.full((1, 3, 4, 4), -1.0), atol=1e-4)
    assert float(out[0, 0, 1, 15]) == pytest.approx(-1.0, abs=1e-4)  # the rim is gone
    changed = (out != images).any(dim=1)[0]
    grown = F.max_pool2d(concept[:, None].float(), 3, 1, 1)[0, 0] > 0
    assert not changed[~grown].any()  # nothing beyond the 1-px margin
    assert torch.equal(remove_concepts(images, concept, obj, margin=0)[:, :, 1], images[:, :, 1])
