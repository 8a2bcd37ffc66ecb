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

WORDS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", ".", "round", "eye", "striped", "fin", "alpha"]


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from transformers import (
        BertTokenizer,
        GroundingDinoConfig,
        GroundingDinoForObjectDetection,
        GroundingDinoProcessor,
        SamConfig,
        SamModel,
        SamProcessor,
        SwinConfig,
    )
    from transformers.models.grounding_dino.image_processing_pil_grounding_dino import (
        GroundingDinoImageProcessorPil,
    )
    from transformers.models.sam.image_processing_pil_sam import SamImageProcessorPil

    d = tmp_path_factory.mktemp("models")
    torch.manual_seed(0)
    tok = BertTokenizer(vocab={w: i for i, w in enumerate(WORDS)})
    cfg = GroundingDinoConfig(
        backbone_config=SwinConfig(window_size=7, embed_dim=8, depths=[1, 1, 1, 1], num_heads=[1, 1, 1, 1],
                                   image_size=64, out_indices=[2, 3, 4]),
        text_config=dict(model_type="bert", vocab_size=len(WORDS), hidden_size=8, num_hidden_layers=1,
                         num_attention_heads=2, intermediate_size=8, max_position_embeddings=32),
        d_model=32, encoder_layers=1, decoder_layers=2, encoder_attention_heads=4, decoder_attention_heads=4,
        encoder_ffn_dim=16, decoder_ffn_dim=16, num_queries=10, max_text_len=32, encoder_n_points=2,
        decoder_n_points=2)
    GroundingDinoForObjectDetection(cfg).save_pretrained(d / "gd")
    GroundingDinoProcessor(image_processor=GroundingDinoImageProcessorPil(
        size={"shortest_edge": 64, "longest_edge": 96}), tokenizer=tok).save_pretrained(d / "gd")
    scfg = SamConfig(
        vision_config=dict(hidden_size=16, output_channels=16, num_hidden_layers=2, num_attention_heads=2,
                           image_size=64, patch_size=8, window_size=4, global_attn_indexes=[1], num_pos_feats=8,
                           mlp_dim=32),
        prompt_encoder_config=dict(hidden_size=16, image_size=64, patch_size=8, mask_input_channels=4),
        mask_decoder_config=dict(hidden_size=16, mlp_dim=32, num_hidden_layers=2, num_attention_heads=2,
                                 iou_head_hidden_dim=16))
    SamModel(scfg).save_pretrained(d / "sam")
    SamProcessor(image_processor=SamImageProcessorPil(
        size={"longest_edge": 64}, pad_size={"height": 64, "width": 64}, mask_size={"longest_edge": 16},
        mask_pad_size={"height": 16, "width": 16})).save_pretrained(d / "sam")
    root = d / "images"
    rng = np.random.default_rng(0)
    for i in range(2):
        (root / "alpha").mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (50, 70, 3), dtype=np.uint8)).save(root / "alpha" / f"{i}.png")
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
        inputs = g.sam_processor(images=image, input_boxes=[[box.tolist()]], return_tensors="pt")
        with torch.inference_mode():
            pred = g.sam(**inputs, multimask_output=False).pred_masks
        want |= g.sam_processor.image_processor.post_process_masks(
            pred, inputs["original_sizes"], inputs["reshaped_input_sizes"])[0].reshape(50, 70).numpy()
    masks = g("alpha/0.png", "alpha", ["round eye", "alpha"])
    assert set(masks) == {"round eye", "alpha"} and masks["round eye"].shape == (50, 70)
    assert np.array_equal(masks["round eye"], want)
    batched = g.detect(image, ["round eye", "alpha", "striped fin"])  # padded batch == one prompt at a time
    for prompt, got in zip(["round eye", "alpha", "striped fin"], batched):
        assert torch.allclose(got, g.boxes(image, prompt), atol=1e-4)
    assert g.prompt_text("Round Eye") == "round eye." and g.prompt_text("fin.") == "fin."


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
