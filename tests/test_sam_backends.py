"""The segment-anything SAM backend (official `sam_vit_{b,l,h}_*.pth` files) beside the transformers one.

On a tiny random-weight SAM built with segment-anything's own constructors and the same weights renamed into the
transformers `SamModel` layout (`_sam_helpers.to_transformers`: every tensor maps one to one, none is changed),
both backends give the same masks; the image is encoded once and all boxes of all prompts are decoded in one
`predict_torch` call; the full-size registry variants are told apart by their weights, and a checkpoint of the
wrong variant, a truncated file or a missing one stops `cft masks generate` in one line naming the file before
any image is processed. Full-size files are written cheaply: each tensor is one stored number expanded to the
variant's shape (the same `torch.save` format, ~100 KB instead of 375 MB-2.5 GB)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

pytest.importorskip("transformers")
pytest.importorskip("segment_anything")

from _sam_helpers import (  # noqa: E402
    save_tiny_detector,
    save_tiny_transformers_sam,
    tiny_segment_anything,
    to_transformers,
    write_images,
)

from cft_lightning.errors import DataError  # noqa: E402
from cft_lightning.masks import sam_backends  # noqa: E402
from cft_lightning.masks.sam_backends import SegmentAnythingSAM, TransformersSAM  # noqa: E402

PROMPTS = ["round eye", "striped fin", "alpha"]


def full_size_file(path: Path, variant: str, value: float = 0.0) -> Path:
    """A state dict of `sam_model_registry[variant]`'s keys and shapes, each tensor one stored `value`."""
    from segment_anything import sam_model_registry

    with torch.device("meta"):
        shapes = {k: (v.shape, v.dtype) for k, v in sam_model_registry[variant]().state_dict().items()}
    torch.save({k: torch.full((), value, dtype=dtype).expand(shape) for k, (shape, dtype) in shapes.items()}, path)
    return path


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Tiny GroundingDINO, the tiny SAM's state dict (segment-anything layout, torch.save) and the same weights as
    a transformers folder, two images, a concept bank, and a full-size vit_b file."""
    d = tmp_path_factory.mktemp("sam_files")
    save_tiny_detector(d / "gd")
    state = tiny_segment_anything().state_dict()
    torch.save(state, d / "tiny_sam.pth")
    save_tiny_transformers_sam(d / "hf_sam", to_transformers(state))
    write_images(d / "images")
    (d / "bank.json").write_text(json.dumps({"alpha": PROMPTS[:2]}))
    full_size_file(d / "sam_vit_b_01ec64.pth", "vit_b", 0.01)
    return d


def grounder(files: Path, segmenter, box_threshold: float = 0.0):
    from cft_lightning.masks.grounded_sam import GroundedSAM

    return GroundedSAM(files / "images", str(files / "gd"), segmenter, box_threshold=box_threshold,
                       text_threshold=0.0)


def test_segmenter_spec_picks_the_backend():
    assert sam_backends.parse_segmenter("facebook/sam-vit-base") is None
    assert sam_backends.parse_segmenter("models/sam_folder") is None
    assert sam_backends.parse_segmenter("vit_h:/ckpt/sam_vit_h_4b8939.pth") == ("vit_h", "/ckpt/sam_vit_h_4b8939.pth")
    assert sam_backends.parse_segmenter("/ckpt/sam_vit_l_0b3195.pth") == (None, "/ckpt/sam_vit_l_0b3195.pth")
    with pytest.raises(DataError, match="unknown SAM variant 'vit_s'"):
        sam_backends.parse_segmenter("vit_s:/ckpt/x.pth")


@pytest.mark.parametrize("variant", ["vit_b", "vit_l", "vit_h"])
def test_full_size_variants_are_told_apart_by_their_weights(variant: str, tmp_path: Path):
    path = str(full_size_file(tmp_path / f"sam_{variant}.pth", variant))
    assert sam_backends.read_sam_checkpoint(path)[0] == variant
    assert sam_backends.read_sam_checkpoint(path, variant)[0] == variant
    other = "vit_h" if variant != "vit_h" else "vit_b"
    with pytest.raises(DataError, match=f"{path} holds {variant} weights .*, not {other}: give --segmenter "
                                        f"{variant}:{path}"):
        sam_backends.read_sam_checkpoint(path, other)


def test_full_size_checkpoint_loads_into_the_registry_model_on_the_cpu(files: Path):
    """`sam_model_registry['vit_b']` with the file's weights (loaded with map_location, strict); not run on an
    image here (24 s on one core: see the slow test)."""
    for variant in ("vit_b", None):
        sam = SegmentAnythingSAM.from_checkpoint(str(files / "sam_vit_b_01ec64.pth"), variant)
        encoder = sam.model.image_encoder
        assert len(encoder.blocks) == 12 and encoder.patch_embed.proj.weight.shape[0] == 768
        assert all(torch.all(p == 0.01) for p in sam.model.parameters())
        assert encoder.img_size == 1024 and sam.predictor.transform.target_length == 1024


@pytest.mark.parametrize("decoder_eps, atol", [(1e-6, 1e-4), (1e-5, 5e-6)])
def test_both_backends_give_the_same_masks_for_the_same_weights(decoder_eps: float, atol: float, tmp_path: Path):
    """Same pixels into the encoder (1e-6), same image embedding (1e-5), same mask logits at the image's size
    (`atol`) and the same boolean masks. With the transformers default config (decoder LayerNorm eps 1e-6; the
    segment-anything two-way transformer uses nn.LayerNorm's 1e-5) the logits differ by ~8e-6 (logits up to
    1.4); with the eps matched, by float rounding only (~2e-6). No part of the model needed more than renaming."""
    sa = SegmentAnythingSAM(tiny_segment_anything())
    save_tiny_transformers_sam(tmp_path / "hf", to_transformers(sa.model.state_dict()), decoder_eps)
    hf = TransformersSAM(str(tmp_path / "hf"))
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (50, 70, 3), dtype=np.uint8))
    e_sa, e_hf = sa.embed(image), hf.embed(image)
    pixels_sa = sa.model.preprocess(torch.as_tensor(sa.predictor.transform.apply_image(np.asarray(image)))
                                    .permute(2, 0, 1)[None].float())
    pixels_hf = hf.processor(images=image, return_tensors="pt")["pixel_values"]
    assert torch.allclose(pixels_sa, pixels_hf, atol=1e-6)
    assert torch.allclose(e_sa["features"], e_hf["image_embeddings"], atol=1e-5)
    boxes = torch.tensor([[5.0, 5.0, 40.0, 30.0], [0.0, 0.0, 69.0, 49.0], [30.0, 10.0, 60.0, 45.0], [3, 20, 15, 48]])
    p = sa.predictor
    logits_sa = p.predict_torch(None, None, boxes=p.transform.apply_boxes_torch(boxes, (50, 70)),
                                multimask_output=False, return_logits=True)[0][:, 0]
    (h, w), (rh, rw) = e_hf["original_sizes"][0].tolist(), e_hf["reshaped_input_sizes"][0].tolist()
    with torch.inference_mode():
        out = hf.model(image_embeddings=e_hf["image_embeddings"], multimask_output=False,
                       input_boxes=(boxes * torch.tensor([rw / w, rh / h, rw / w, rh / h]))[None])
    logits_hf = hf.processor.image_processor.post_process_masks(
        out.pred_masks, e_hf["original_sizes"], e_hf["reshaped_input_sizes"], binarize=False)[0][:, 0]
    assert torch.allclose(logits_sa, logits_hf, atol=atol)
    masks_sa, masks_hf = sa.segment_boxes(image, boxes, e_sa), hf.segment_boxes(image, boxes, e_hf)
    assert masks_sa.shape == masks_hf.shape == (4, 50, 70) and masks_sa.dtype == masks_hf.dtype == torch.bool
    assert torch.equal(masks_sa, logits_sa > 0)
    assert torch.equal(masks_sa, masks_hf)
    coverage = masks_sa.float().mean(dim=(1, 2))
    assert ((coverage > 0.2) & (coverage < 0.9)).all() and not torch.equal(masks_sa[0], masks_sa[2])


def test_the_grounder_writes_the_same_masks_with_either_backend(files: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    by_sa = grounder(files, SegmentAnythingSAM(tiny_segment_anything()))
    by_hf = grounder(files, str(files / "hf_sam"))
    assert isinstance(by_hf.segmenter, TransformersSAM)
    for rel in ("alpha/0.png", "alpha/1.png"):
        got_sa, got_hf = by_sa(rel, "alpha", PROMPTS), by_hf(rel, "alpha", PROMPTS)
        assert set(got_sa) == set(got_hf) == set(PROMPTS)
        for prompt in PROMPTS:
            assert got_sa[prompt].dtype == bool and got_sa[prompt].shape == (50, 70)
            assert np.array_equal(got_sa[prompt], got_hf[prompt]), (rel, prompt)
        assert any(0 < m.mean() < 1 for m in got_sa.values())


def test_one_encode_and_one_batched_decode_per_image(files: Path, monkeypatch: pytest.MonkeyPatch):
    """Per image: the encoder runs once and `predict_torch` once with the boxes of all prompts; the masks equal
    Grounded-SAM's recipe run box by box (`SamPredictor.predict`, the image set again for each box), united."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    sam = SegmentAnythingSAM(tiny_segment_anything())
    g = grounder(files, sam)
    encodes, decodes = [], []
    sam.model.image_encoder.register_forward_hook(lambda *_: encodes.append(1))
    real = sam.predictor.predict_torch

    def counted(*args, **kwargs):
        decodes.append(len(kwargs["boxes"]))
        return real(*args, **kwargs)

    monkeypatch.setattr(sam.predictor, "predict_torch", counted)
    image = Image.open(files / "images" / "alpha" / "0.png").convert("RGB")
    boxes = g.detect(image, PROMPTS)
    encodes.clear()
    masks = g("alpha/0.png", "alpha", PROMPTS)
    assert encodes == [1] and decodes == [sum(map(len, boxes))] and all(len(b) > 0 for b in boxes)
    reference = SegmentAnythingSAM(tiny_segment_anything()).predictor
    for prompt, found in zip(PROMPTS, boxes):
        want = np.zeros((50, 70), dtype=bool)
        for box in found.numpy():
            reference.set_image(np.asarray(image))
            want |= reference.predict(box=box, multimask_output=False)[0][0]
        assert np.array_equal(masks[prompt], want), prompt
    encodes.clear()
    decodes.clear()
    empty = grounder(files, sam, box_threshold=1.1)("alpha/1.png", "alpha", PROMPTS)
    assert not any(m.any() for m in empty.values()) and encodes == [] and decodes == []  # no box: no SAM call


def _generate(files: Path, out: Path, segmenter: str, images: Path | None = None, *extra: str) -> list[str]:
    from cft_lightning.cli import main

    main(["masks", "generate", "--images", str(images or files / "images"), "--concepts", str(files / "bank.json"),
          "--out", str(out), "--detector", str(files / "gd"), "--segmenter", segmenter, "--box_threshold", "0.0",
          "--text_threshold", "0.0", "--accelerator", "cpu", "--devices", "1", "--no_progress", *extra])
    return sorted(str(p.relative_to(out)) for p in out.rglob("*.png"))


def test_cft_masks_generate_in_bf16_mixed_precision(files: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """`--precision bf16-mixed` runs GroundingDINO and SAM under bfloat16 autocast (CPU autocast here): every
    mask is written, close to the float32 grounder's, and the manifest records the precision."""
    from cft_lightning.data.mask_store import MaskStore

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    written = _generate(files, tmp_path / "store", str(files / "hf_sam"), None, "--precision", "bf16-mixed")
    assert len(written) == 2 * 4
    store = MaskStore(tmp_path / "store")
    assert store.read_manifest()["models"]["precision"] == "bf16-mixed"
    direct = grounder(files, str(files / "hf_sam"))
    for rel in ("alpha/0.png", "alpha/1.png"):
        want = direct(rel, "alpha", PROMPTS)
        for got, ref in ((store.read(rel, "concept", concept="round eye"), want["round eye"]),
                         (store.read(rel, "object"), want["alpha"])):
            assert ref.sum() > 0
            assert (got & ref).sum() / (got | ref).sum() > 0.95  # bfloat16 moves a few boundary pixels


def test_cft_masks_generate_refuses_an_untested_precision(files: Path, tmp_path: Path,
                                                          capsys: pytest.CaptureFixture):
    with pytest.raises(SystemExit) as exc:
        _generate(files, tmp_path / "store", str(files / "hf_sam"), None, "--precision", "16-mixed")
    assert exc.value.code != 0
    err = capsys.readouterr().err
    assert "precision" in err and "bf16-mixed" in err
    assert not (tmp_path / "store").exists() or not list((tmp_path / "store").rglob("*.png"))


def test_cft_masks_generate_with_a_segment_anything_checkpoint(files: Path, tmp_path: Path,
                                                               monkeypatch: pytest.MonkeyPatch):
    """The command path end to end with `--segmenter VARIANT:FILE`, the tiny model registered as a variant (the
    registry's own ones need a 1024 px encoder: the slow test below); the store equals the grounder's masks."""
    import segment_anything

    from cft_lightning.data.mask_store import MaskStore

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setitem(sam_backends.VARIANTS, "vit_tiny", (16, 2))
    monkeypatch.setitem(segment_anything.sam_model_registry, "vit_tiny",
                        lambda checkpoint=None: tiny_segment_anything(seed=1))  # other weights: the file's count
    written = _generate(files, tmp_path / "store", f"vit_tiny:{files / 'tiny_sam.pth'}")
    assert len(written) == 2 * 4  # per image: 2 concepts, their union, the object
    direct = grounder(files, SegmentAnythingSAM(tiny_segment_anything()))
    store = MaskStore(tmp_path / "store")
    for rel in ("alpha/0.png", "alpha/1.png"):
        want = direct(rel, "alpha", PROMPTS)
        assert np.array_equal(store.read(rel, "concept", concept="round eye"), want["round eye"])
        assert np.array_equal(store.read(rel, "object"), want["alpha"])
        assert np.array_equal(store.read(rel, "concept"), want["round eye"] | want["striped fin"])


def _truncated(files: Path, tmp: Path) -> str:
    data = (files / "tiny_sam.pth").read_bytes()
    (tmp / "sam_vit_b_01ec64.pth").write_bytes(data[: len(data) // 2])
    return str(tmp / "sam_vit_b_01ec64.pth")


BAD = {  # case: (segmenter spec from (files, tmp), what the one line says)
    "wrong variant": (lambda f, t: f"vit_l:{f / 'sam_vit_b_01ec64.pth'}",
                      "holds vit_b weights (image encoder width 768, 12 blocks), not vit_l: give --segmenter vit_b:"),
    "truncated": (lambda f, t: f"vit_b:{_truncated(f, t)}", "cannot be read (truncated or not a PyTorch file?)"),
    "missing": (lambda f, t: f"vit_b:{t / 'sam_vit_b_01ec64.pth'}", "does not exist (the official files: "
                "sam_vit_b_01ec64.pth, sam_vit_l_0b3195.pth, sam_vit_h_4b8939.pth)"),
    "not an official variant": (lambda f, t: str(f / "tiny_sam.pth"), "image encoder width 16, 2 blocks: none of"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_checkpoints_stop_cft_masks_generate_in_one_line(case: str, files: Path, tmp_path: Path,
                                                             monkeypatch: pytest.MonkeyPatch,
                                                             capsys: pytest.CaptureFixture):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    spec = BAD[case][0](files, tmp_path)
    with pytest.raises(SystemExit) as exc:
        _generate(files, tmp_path / "store", spec)
    err = capsys.readouterr().err
    path = spec.partition(":")[2] if spec.startswith("vit_") else spec
    assert exc.value.code == 2 and err.count("\n") == 1 and "Traceback" not in err, err
    assert err.startswith(f"cft: error: SAM checkpoint {path} ") and BAD[case][1] in err, err
    assert not list((tmp_path / "store").rglob("*.png"))  # stopped before any image


def test_without_segment_anything_the_command_says_what_to_install(files: Path, tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch,
                                                                   capsys: pytest.CaptureFixture):
    import sys

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setitem(sys.modules, "segment_anything", None)  # import segment_anything -> ImportError
    with pytest.raises(SystemExit) as exc:
        _generate(files, tmp_path / "store", f"vit_b:{files / 'sam_vit_b_01ec64.pth'}")
    err = capsys.readouterr().err
    assert exc.value.code == 2 and err.count("\n") == 1 and "pip install segment-anything" in err, err


@pytest.mark.slow
def test_cft_masks_generate_with_a_full_size_vit_b_file(files: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """`--segmenter vit_b:sam_vit_b_01ec64.pth` through `sam_model_registry['vit_b']` and its 1024 px encoder
    (constant weights; about 25 s per image on one core)."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    (tmp_path / "one" / "alpha").mkdir(parents=True)
    (tmp_path / "one" / "alpha" / "0.png").write_bytes((files / "images" / "alpha" / "0.png").read_bytes())
    written = _generate(files, tmp_path / "store", f"vit_b:{files / 'sam_vit_b_01ec64.pth'}", tmp_path / "one")
    assert len(written) == 4 and Image.open(tmp_path / "store" / written[0]).size == (70, 50)
