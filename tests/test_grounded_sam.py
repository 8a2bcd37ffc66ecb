"""The Grounded-SAM grounder on tiny random-weight GroundingDINO and SAM models built here (no download):
boxes above the threshold, SAM masks united per prompt, empty when no box passes, and `generate_masks`
writing a store with it."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

transformers = pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from _sam_helpers import save_tiny_detector, save_tiny_transformers_sam, write_images

    d = tmp_path_factory.mktemp("models")
    save_tiny_detector(d / "gd")
    save_tiny_transformers_sam(d / "sam")
    write_images(d / "images")
    return d


def grounder(models: Path, box_threshold: float):
    from cft_lightning.masks.grounded_sam import GroundedSAM

    return GroundedSAM(models / "images", str(models / "gd"), str(models / "sam"), box_threshold=box_threshold,
                       text_threshold=0.0)


def test_masks_are_the_union_of_sam_masks_of_the_boxes(models: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    g = grounder(models, 0.0)
    image = Image.open(models / "images" / "alpha" / "0.png").convert("RGB")
    boxes = g.boxes(image, "round eye")
    assert len(boxes) > 0 and (boxes[:, 2] <= 70 + 1e-3).all() and (boxes[:, 3] <= 50 + 1e-3).all()
    want = np.zeros((50, 70), dtype=bool)
    for box in boxes:  # the transformers recipe, one full SAM call per box, independently
        inputs = g.segmenter.processor(images=image, input_boxes=[[box.tolist()]], return_tensors="pt")
        with torch.inference_mode():
            pred = g.sam(**inputs, multimask_output=False).pred_masks
        want |= g.segmenter.processor.image_processor.post_process_masks(
            pred, inputs["original_sizes"], inputs["reshaped_input_sizes"])[0].reshape(50, 70).numpy()
    masks = g("alpha/0.png", "alpha", ["round eye", "alpha"])
    assert set(masks) == {"round eye", "alpha"} and masks["round eye"].shape == (50, 70)
    assert np.array_equal(masks["round eye"], want)
    batched = g.detect(image, ["round eye", "alpha", "striped fin"])  # padded batch == one prompt at a time
    for prompt, got in zip(["round eye", "alpha", "striped fin"], batched):
        assert torch.allclose(got, g.boxes(image, prompt), atol=1e-4)
    assert g.prompt_text("Round Eye") == "round eye." and g.prompt_text("fin.") == "fin."


def test_the_detector_processes_the_image_once_for_all_prompts(models: Path, monkeypatch: pytest.MonkeyPatch):
    """One resize/normalise of the image per detector batch, whatever the number of prompts (it was one per
    prompt: host-side work that a GPU does not speed up), with the same boxes as one prompt at a time."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    g = grounder(models, 0.0)
    image = Image.open(models / "images" / "alpha" / "0.png").convert("RGB")
    seen: list[int] = []
    preprocess = g.det_processor.image_processor.preprocess

    def counting(*args, **kwargs):
        out = preprocess(*args, **kwargs)
        seen.append(len(out["pixel_values"]))
        return out

    monkeypatch.setattr(g.det_processor.image_processor, "preprocess", counting)
    prompts = ["round eye", "alpha", "striped fin"]
    batched = g.detect(image, prompts)
    assert seen == [1]
    for prompt, got in zip(prompts, batched):
        assert torch.allclose(got, g.boxes(image, prompt), atol=1e-4)


def test_no_box_above_the_threshold_gives_an_empty_mask(models: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    masks = grounder(models, 1.1)("alpha/1.png", "alpha", ["striped fin"])
    assert masks["striped fin"].shape == (50, 70) and not masks["striped fin"].any()


def test_generate_masks_with_grounded_sam(models: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    from cft_lightning.data.mask_store import MaskStore
    from cft_lightning.masks.generate import generate_masks

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    g = grounder(models, 0.0)
    images = {"alpha": ["alpha/0.png", "alpha/1.png"]}
    summary = generate_masks(images, {"alpha": ["round eye", "striped fin"]}, g, tmp_path / "store", progress=False)
    assert summary["written"] == 2
    store = MaskStore(tmp_path / "store")
    for rel in images["alpha"]:
        union = store.read(rel, "concept", concept="round eye") | store.read(rel, "concept", concept="striped fin")
        assert np.array_equal(store.read(rel, "concept"), union) and store.read(rel, "object").shape == (50, 70)
    assert generate_masks(images, {"alpha": ["round eye", "striped fin"]}, g, tmp_path / "store",
                          progress=False)["skipped"] == 2


def test_cft_concepts_validate_with_grounded_sam(models: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                 capsys: pytest.CaptureFixture):
    """The validation CLI grounds with GroundingDINO + SAM (local folders) and records them in the provenance."""
    import json

    from cft_lightning.cli import main

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    (tmp_path / "bank.json").write_text(json.dumps({"alpha": ["round eye", "striped fin"]}))
    main(["concepts", "validate", "--bank", str(tmp_path / "bank.json"), "--images", str(models / "images"),
          "--detector", str(models / "gd"), "--segmenter", str(models / "sam"), "--box_threshold", "0.0",
          "--text_threshold", "0.0", "--occurrence", "0.0", "--coverage", "0.0", "--per_class", "2",
          "--out", str(tmp_path / "v.json")])
    doc = json.loads((tmp_path / "v.json").read_text())
    assert doc["provenance"]["validation"]["grounder"] == "grounded_sam"
    assert doc["provenance"]["validation"]["detector"] == str(models / "gd")
    assert set(doc["concepts"]["alpha"]) <= {"round eye", "striped fin"}
    assert "kept" in capsys.readouterr().out
