"""Tiny random-weight Grounded-SAM models for the tests (no download): GroundingDINO and SAM in transformers, SAM
in Meta's `segment-anything` (built with the package's own constructors), and the conversion of the latter's
state dict into the transformers `SamModel` layout, so both SAM backends can run the same weights."""

from __future__ import annotations

import re
from functools import partial
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import nn

WORDS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", ".", "round", "eye", "striped", "fin", "alpha"]
PIXEL_MEAN, PIXEL_STD = [123.675, 116.28, 103.53], [58.395, 57.12, 57.375]  # segment_anything/build_sam.py


def save_tiny_detector(folder: Path, words: list[str] = WORDS) -> None:
    """A tiny GroundingDINO and its processor (PIL backend) with the vocabulary `words`, `save_pretrained` into
    `folder`."""
    from transformers import (
        BertTokenizer,
        GroundingDinoConfig,
        GroundingDinoForObjectDetection,
        GroundingDinoProcessor,
        SwinConfig,
    )
    from transformers.models.grounding_dino.image_processing_pil_grounding_dino import GroundingDinoImageProcessorPil

    torch.manual_seed(0)
    tok = BertTokenizer(vocab={w: i for i, w in enumerate(words)})
    cfg = GroundingDinoConfig(
        backbone_config=SwinConfig(window_size=7, embed_dim=8, depths=[1, 1, 1, 1], num_heads=[1, 1, 1, 1],
                                   image_size=64, out_indices=[2, 3, 4]),
        text_config=dict(model_type="bert", vocab_size=len(words), hidden_size=8, num_hidden_layers=1,
                         num_attention_heads=2, intermediate_size=8, max_position_embeddings=32),
        d_model=32, encoder_layers=1, decoder_layers=2, encoder_attention_heads=4, decoder_attention_heads=4,
        encoder_ffn_dim=16, decoder_ffn_dim=16, num_queries=10, max_text_len=32, encoder_n_points=2,
        decoder_n_points=2)
    GroundingDinoForObjectDetection(cfg).save_pretrained(folder)
    GroundingDinoProcessor(image_processor=GroundingDinoImageProcessorPil(
        size={"shortest_edge": 64, "longest_edge": 96}), tokenizer=tok).save_pretrained(folder)


def tiny_sam_config(decoder_eps: float = 1e-6):
    """A tiny transformers `SamConfig` (64 px input, 8 px patches, width 16). segment-anything's two-way
    transformer uses `nn.LayerNorm`'s default eps 1e-5 where transformers reads `layer_norm_eps` (1e-6): pass
    `decoder_eps=1e-5` for the layout that matches `tiny_segment_anything` exactly."""
    from transformers import SamConfig

    return SamConfig(
        vision_config=dict(hidden_size=16, output_channels=16, num_hidden_layers=2, num_attention_heads=2,
                           image_size=64, patch_size=8, window_size=4, global_attn_indexes=[1], num_pos_feats=8,
                           mlp_dim=32),
        prompt_encoder_config=dict(hidden_size=16, image_size=64, patch_size=8, mask_input_channels=4),
        mask_decoder_config=dict(hidden_size=16, mlp_dim=32, num_hidden_layers=2, num_attention_heads=2,
                                 iou_head_hidden_dim=16, layer_norm_eps=decoder_eps))


def tiny_sam_processor():
    """The transformers `SamProcessor` of `tiny_sam_config` (longest side 64, padded to 64x64; PIL backend)."""
    from transformers import SamProcessor
    from transformers.models.sam.image_processing_pil_sam import SamImageProcessorPil

    return SamProcessor(image_processor=SamImageProcessorPil(
        size={"longest_edge": 64}, pad_size={"height": 64, "width": 64}, mask_size={"longest_edge": 16},
        mask_pad_size={"height": 16, "width": 16}))


def save_tiny_transformers_sam(folder: Path, state: dict[str, torch.Tensor] | None = None,
                               decoder_eps: float = 1e-6) -> None:
    """A tiny `SamModel` (random weights, or `state` in its layout) and its processor, saved into `folder`."""
    from transformers import SamModel

    model = SamModel(tiny_sam_config(decoder_eps))
    if state is not None:
        model.load_state_dict(state, strict=True)
    model.save_pretrained(folder)
    tiny_sam_processor().save_pretrained(folder)


def tiny_segment_anything(seed: int = 0, noise: float = 0.3) -> nn.Module:
    """`segment_anything.modeling.Sam` of the same shape as `tiny_sam_config`, from the package's constructors;
    every parameter gets `noise` Gaussian noise on top of its init (the zero-initialised position embeddings
    and LayerNorm biases too), so no piece of the model is compared at a trivial value. With the defaults the
    masks of boxes on a 50x70 image cover 40-80 % of it (at noise 0.1 nearly all of it: a weak test)."""
    from segment_anything.modeling import ImageEncoderViT, MaskDecoder, PromptEncoder, Sam, TwoWayTransformer

    torch.manual_seed(seed)
    sam = Sam(
        image_encoder=ImageEncoderViT(img_size=64, patch_size=8, embed_dim=16, depth=2, num_heads=2, mlp_ratio=2,
                                      out_chans=16, qkv_bias=True, norm_layer=partial(nn.LayerNorm, eps=1e-6),
                                      use_rel_pos=True, window_size=4, global_attn_indexes=(1,)),
        prompt_encoder=PromptEncoder(embed_dim=16, image_embedding_size=(8, 8), input_image_size=(64, 64),
                                     mask_in_chans=4),
        mask_decoder=MaskDecoder(num_multimask_outputs=3, transformer_dim=16, iou_head_depth=3,
                                 iou_head_hidden_dim=16,
                                 transformer=TwoWayTransformer(depth=2, embedding_dim=16, mlp_dim=32, num_heads=2)),
        pixel_mean=PIXEL_MEAN, pixel_std=PIXEL_STD)
    with torch.no_grad():
        for p in sam.parameters():
            p.add_(noise * torch.randn_like(p))
    return sam.eval()


# segment-anything key -> transformers SamModel key (applied in order; MLP layers are renamed by _mlp below)
_RENAMES = [
    (r"^image_encoder\.", "vision_encoder."),
    (r"patch_embed\.proj\.", "patch_embed.projection."),
    (r"vision_encoder\.blocks\.(\d+)\.norm(\d)", r"vision_encoder.layers.\1.layer_norm\2"),
    (r"vision_encoder\.blocks\.", "vision_encoder.layers."),
    (r"neck\.0\.", "neck.conv1."), (r"neck\.1\.", "neck.layer_norm1."),
    (r"neck\.2\.", "neck.conv2."), (r"neck\.3\.", "neck.layer_norm2."),
    (r"prompt_encoder\.point_embeddings\.", "prompt_encoder.point_embed."),
    (r"mask_downscaling\.0\.", "mask_embed.conv1."), (r"mask_downscaling\.1\.", "mask_embed.layer_norm1."),
    (r"mask_downscaling\.3\.", "mask_embed.conv2."), (r"mask_downscaling\.4\.", "mask_embed.layer_norm2."),
    (r"mask_downscaling\.6\.", "mask_embed.conv3."),
    (r"transformer\.layers\.(\d+)\.norm(\d)", r"transformer.layers.\1.layer_norm\2"),
    (r"norm_final_attn", "layer_norm_final_attn"),
    (r"output_upscaling\.0\.", "upscale_conv1."), (r"output_upscaling\.1\.", "upscale_layer_norm."),
    (r"output_upscaling\.3\.", "upscale_conv2."),
]
_POSITIONAL = "prompt_encoder.pe_layer.positional_encoding_gaussian_matrix"


def _mlp(match: re.Match[str], depth: int = 3) -> str:
    i = int(match.group(2))
    name = "proj_in" if i == 0 else "proj_out" if i == depth - 1 else f"layers.{i - 1}"
    return f"{match.group(1)}.{name}"


def to_transformers(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A segment-anything SAM state dict in the transformers `SamModel` layout (every tensor renamed, none
    changed; the random Fourier matrix of the prompt encoder goes to both tied copies)."""
    out = {}
    for key, value in state.items():
        if key == _POSITIONAL:
            out["shared_image_embedding.positional_embedding"] = value
            out["prompt_encoder.shared_embedding.positional_embedding"] = value
            continue
        for pattern, repl in _RENAMES:
            key = re.sub(pattern, repl, key)
        out[re.sub(r"(output_hypernetworks_mlps\.\d+|iou_prediction_head)\.layers\.(\d+)", _mlp, key)] = value
    return out


def write_images(root: Path, count: int = 2, size: tuple[int, int] = (50, 70)) -> None:
    """`count` random RGB images of class `alpha` under `root`."""
    rng = np.random.default_rng(0)
    (root / "alpha").mkdir(parents=True, exist_ok=True)
    for i in range(count):
        Image.fromarray(rng.integers(0, 256, (*size, 3), dtype=np.uint8)).save(root / "alpha" / f"{i}.png")
