"""GradCAM: equal to pytorch-grad-cam (the peer) on a ViT and a ConvNeXt-V2, exactly differentiable, batched."""

from __future__ import annotations

import numpy as np
import pytest
import timm
import torch
from _regularizer_helpers import check_gradient_matches_fd, tiny_batch, tiny_vit

from cft_lightning.regularizers import CFT
from cft_lightning.relevance import GradCAM, UnsupportedModelError

cv2 = pytest.importorskip("cv2")
pytorch_grad_cam = pytest.importorskip("pytorch_grad_cam")
from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget  # noqa: E402


def tiny_convnext() -> torch.nn.Module:
    torch.manual_seed(0)
    return timm.create_model("convnextv2_atto", pretrained=False, num_classes=5, depths=(1, 1, 1, 1),
                             dims=(8, 16, 24, 32)).eval()


def peer_cam(model, layer, images, targets, reshape=None) -> np.ndarray:
    with pytorch_grad_cam.GradCAM(model=model, target_layers=[layer], reshape_transform=reshape) as cam:
        return cam(input_tensor=images, targets=[ClassifierOutputTarget(int(t)) for t in targets])


def as_peer(raw: torch.Tensor, size: tuple[int, int]) -> np.ndarray:
    """pytorch-grad-cam's post-processing of a grid map: shift to 0, divide by (1e-7 + max), cv2 resize; then
    the same scaling once more after the resize (its layer aggregation)."""

    def scale(img: np.ndarray) -> np.ndarray:
        img = img - img.min()
        return img / (1e-7 + img.max())

    return np.stack([scale(cv2.resize(scale(img).astype(np.float32), size)) for img in raw.detach().numpy()])


def test_vit_grad_cam_equals_pytorch_grad_cam():
    model = tiny_vit().float()
    images = tiny_batch()["image"].float()
    targets = torch.tensor([1, 3])

    def reshape(t):  # patch tokens (B, N, D) -> (B, D, h, w), as pytorch-grad-cam's ViT tutorial
        return t[:, 1:].reshape(t.shape[0], 4, 4, t.shape[2]).permute(0, 3, 1, 2)

    want = peer_cam(model, model.blocks[-1].norm1, images, targets, reshape)
    rel = GradCAM()(model, images, targets, differentiable=False)
    assert rel.raw.shape == (2, 4, 4)
    np.testing.assert_allclose(as_peer(rel.raw, (32, 32)), want, rtol=1e-4, atol=1e-5)


def test_convnext_grad_cam_equals_pytorch_grad_cam():
    model = tiny_convnext()
    images = torch.randn(3, 3, 128, 128, generator=torch.Generator().manual_seed(0))
    targets = torch.tensor([0, 4, 2])
    want = peer_cam(model, model.stages[-1], images, targets)
    rel = GradCAM()(model, images, targets, differentiable=False)
    assert rel.raw.shape == (3, 4, 4)  # the last stage's grid: 128 / 32
    assert (rel.raw.flatten(1).amax(1) > rel.raw.flatten(1).amin(1)).all()  # not a constant map
    np.testing.assert_allclose(as_peer(rel.raw, (128, 128)), want, rtol=1e-4, atol=1e-5)


def test_grad_cam_in_cft_is_exactly_differentiable():
    check_gradient_matches_fd(CFT(consistency_target="label", cls_weight=0.0), GradCAM(), tiny_batch())


def test_grad_cam_layer_errors_are_clear():
    with pytest.raises(UnsupportedModelError, match="no module"):
        GradCAM(layer="blocks.9.norm1").check_model(tiny_vit())
    with pytest.raises(UnsupportedModelError, match="default Grad-CAM layer"):
        GradCAM().check_model(torch.nn.Linear(3, 3))
