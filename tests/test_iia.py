"""IIA: the batched implementation equals a one-image-at-a-time reference written against the attention
equations (the IIA repository's loop: an alpha pass, then beta passes with the last attention scaled)."""

from __future__ import annotations

import types

import pytest
import torch
from _regularizer_helpers import tiny_batch, tiny_vit
from torch import Tensor, nn

from cft_lightning.relevance import IIA
from cft_lightning.relevance.iia import normalized_rollout


def _attention_forward(store: list, scale_last: dict):
    def forward(self: nn.Module, x: Tensor, attn_mask: Tensor | None = None, **_: object) -> Tensor:
        B, N, C = x.shape
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, C // self.num_heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        q, k = self.q_norm(q), self.k_norm(k)
        attn = ((q * self.scale) @ k.transpose(-2, -1)).softmax(dim=-1)
        if self is scale_last["module"]:
            attn = attn * scale_last["beta"]
        attn.retain_grad()
        store.append(attn)
        out = (attn @ v).transpose(1, 2).reshape(B, N, C)
        return self.proj(self.norm(out))

    return forward


def reference_iia(model: nn.Module, image: Tensor, target: int, steps: int) -> Tensor:
    """One image: C_l = relu(grad * A~) averaged over the (alpha, beta) grid and heads, then rollout."""
    store: list[Tensor] = []
    control = {"module": model.blocks[-1].attn, "beta": 1.0}
    for blk in model.blocks:
        blk.attn.forward = types.MethodType(_attention_forward(store, control), blk.attn)
    acc = None
    grid = torch.linspace(0, 1, steps + 1).tolist()
    for alpha in grid:
        for beta in grid:
            store.clear()
            control["beta"] = beta
            model.zero_grad()
            model((alpha * image)[None])[0, target].backward()
            c = [(a.grad * a).clamp_min(0).mean(dim=1) for a in store]
            acc = c if acc is None else [x + y for x, y in zip(acc, c)]
    for blk in model.blocks:
        del blk.attn.forward
    joint = normalized_rollout([a / len(grid) ** 2 for a in acc])
    return joint[0, 0, 1:].reshape(4, 4).detach()


@pytest.mark.parametrize("steps", [1, 3])
def test_batched_iia_equals_the_per_image_reference(steps: int):
    model, images = tiny_vit(), tiny_batch()["image"]
    targets = torch.tensor([1, 3])
    rel = IIA(steps=steps)(model, images, targets, differentiable=True)
    assert rel.raw.shape == (2, 4, 4) and not rel.raw.requires_grad  # differentiability "none"
    for b in range(2):
        want = reference_iia(model, images[b], int(targets[b]), steps)
        torch.testing.assert_close(rel.raw[b], want, rtol=1e-9, atol=1e-12)


def test_iia_defaults_to_the_prediction_and_rejects_zero_steps():
    model, images = tiny_vit(), tiny_batch()["image"]
    rel = IIA(steps=1)(model, images, None, differentiable=False)
    assert torch.equal(rel.targets, model(images).argmax(1))
    torch.testing.assert_close(rel.logits, model(images), rtol=1e-12, atol=1e-12)
    with pytest.raises(ValueError, match="steps"):
        IIA(steps=0)


def test_normalized_rollout_rows_sum_to_one():
    attn = [torch.rand(2, 5, 5) for _ in range(3)]
    joint = normalized_rollout(attn)
    torch.testing.assert_close(joint.sum(-1), torch.ones(2, 5))


def test_training_with_a_non_differentiable_method_warns():
    from cft_lightning.models import BackboneSpec, GuidedFineTuner
    from cft_lightning.regularizers import CFT

    spec = BackboneSpec("vit_tiny_patch16_224", pretrained=False, num_classes=3,
                        model_kwargs={"img_size": 32, "patch_size": 8, "depth": 2})
    with pytest.warns(UserWarning, match="IIA is not differentiable"):
        GuidedFineTuner(spec, CFT(), IIA(steps=1))
