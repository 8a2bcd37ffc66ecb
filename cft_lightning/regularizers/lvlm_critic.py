"""LVLM-VA's alignment step (Koebler et al., CVPR 2026): RRR on the corrective masks of an LVLM critic.

The critique stage marks, for a small alignment set (the training images the model is most confident
on), the segments of the model's explanation that an LVLM critic and judge call spurious; their union is
the corrective mask A (mask kind `critic`, 1 = must not be used). Fine-tuning is RRR with A as the
penalised region:

    L = sum_n CE(f(x_n), y_n) + lambda * sum_{n,i} (A_ni * d/dx_ni sum_k log p_nk)^2 (+ gamma ||theta||^2)

and the alignment samples are mixed into every batch at a fixed ratio, oversampled when few. The mixing
is the data module's job: it reads this regularizer's declared alignment set (`requirements.alignment`:
`mask_kind` and `alignment_ratio`) at setup; images outside the
alignment set carry an all-zero critic mask and contribute cross-entropy only. lambda: 1 on the paper's
real data (ISIC, knee X-ray), 1e5 on DecoyMNIST. Both terms are summed over the batch there, so the default
`reduction: sum` (penalty per image, averaged like the cross-entropy) is that loss divided by the batch size:
the paper's lambda means the same here at any batch size.
"""

from __future__ import annotations

from cft_lightning._registry import register_regularizer
from cft_lightning.regularizers.rrr import RRR, Reduction

__all__ = ["LVLMCritic"]


@register_regularizer("lvlm_va")
class LVLMCritic(RRR):
    """RRR on critic masks (`mask_role: irrelevant`), expecting batches mixed with alignment samples."""

    required_masks = ("critic",)

    def __init__(
        self,
        grad_weight: float = 1.0,
        cls_weight: float = 1.0,
        l2_weight: float = 0.0,
        reduction: Reduction = "sum",
        mask_kind: str = "critic",
        alignment_ratio: float = 0.5,
        temperature: float = 1.0,
    ) -> None:
        """
        Args:
            grad_weight: lambda (1 on real data in LVLM-VA, 1e5 on DecoyMNIST).
            cls_weight: weight of the cross-entropy on the labels.
            l2_weight: gamma, optional weight decay term.
            reduction: `sum` (per image, averaged over the batch: the paper's formula over the batch size),
                `batch_sum` (penalty summed over the batch, cross-entropy averaged) or `mean` over the
                penalised pixels.
            mask_kind: the corrective masks (`critic`).
            alignment_ratio: share of every batch drawn from the alignment set (the images with a `mask_kind`
                mask); the data module builds its batches from it (the one place it is set).
            temperature: T in CE(logits / T, y).
        """
        if not 0.0 < alignment_ratio < 1.0:
            raise ValueError(f"alignment_ratio must lie in (0, 1), got {alignment_ratio}")
        super().__init__(grad_weight=grad_weight, cls_weight=cls_weight, l2_weight=l2_weight, reduction=reduction,
                         mask_kind=mask_kind, mask_role="irrelevant", consistency_target="label",
                         temperature=temperature)
        self.alignment_ratio = alignment_ratio
