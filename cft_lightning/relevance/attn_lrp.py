"""AttnLRP (Achtibat et al., ICML 2024) for timm Vision Transformers, exactly twice differentiable.

Which rule goes where (the composite):
    LayerNorm  -> identity rule on 1/std               (rules.layer_norm_rule)
    GELU/act   -> identity rule                        (rules.identity_rule)
    attention  -> softmax with its true Jacobian, uniform rule on q k^T and A v (rules.attention_rule);
                  `attention_rule="cp"` gives CP-LRP (nothing through q and k)
    Linear     -> epsilon rule, i.e. the plain gradient (rules.linear_rule); biases absorb relevance
    residuals, LayerScale, pooling, position embeddings -> plain gradient
The relevance of a patch is the gradient x input of its pixels under these rules, summed over the
patch: (patch embedding - projection bias) . g, which equals LXT's pixel heatmap pooled per patch.

The rule backward is written as explicit tensor operations on the activations of the one real forward
pass (see `_vit.trace_vit`), so the map's parameter gradient is the true one.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from cft_lightning._precision import float32_region, upcast
from cft_lightning._registry import register_relevance
from cft_lightning.relevance._vit import BlockRecord, NormRecord, ViTTrace, check_vit, trace_vit
from cft_lightning.relevance.base import Normalization, RelevanceMethod, resolve_targets
from cft_lightning.relevance.rules import (
    AttentionRule,
    attention_rule,
    identity_rule,
    layer_norm_rule,
    linear_rule,
)


def _norm(g: Tensor, rec: NormRecord | None) -> Tensor:
    return g if rec is None else layer_norm_rule(g, rec.std, rec.weight)


def _scale(g: Tensor, layer_scale: nn.Module) -> Tensor:
    gamma = getattr(layer_scale, "gamma", None)
    return g if gamma is None else g * gamma


def _block_backward(blk: nn.Module, rec: BlockRecord, g: Tensor, rule: AttentionRule) -> Tensor:
    """Modified gradient at a pre-norm block's input from the one at its output."""
    mlp, attn = blk.mlp, blk.attn
    gm = linear_rule(_scale(g, blk.ls2), mlp.fc2.weight)
    gm = linear_rule(identity_rule(gm, mlp.act, rec.hidden), mlp.fc1.weight)
    g = g + _norm(gm, rec.norm2)

    B, N, _ = g.shape
    ga = _norm(linear_rule(_scale(g, blk.ls1), attn.proj.weight), rec.attn_norm)
    ga = ga.reshape(B, N, attn.num_heads, attn.head_dim).transpose(1, 2)
    g_q, g_k, g_v = attention_rule(ga, rec.q, rec.k, rec.v, rec.attn, attn.scale, rule)
    g_q, g_k = _norm(g_q, rec.q_norm), _norm(g_k, rec.k_norm)
    g_qkv = torch.stack((g_q, g_k, g_v)).permute(1, 3, 0, 2, 4).reshape(B, N, 3 * attn.attn_dim)
    return g + _norm(linear_rule(g_qkv, attn.qkv.weight), rec.norm1)


def rule_backward(model: nn.Module, trace: ViTTrace, targets: Tensor, rule: AttentionRule = "attnlrp") -> Tensor:
    """Modified gradient of the target logits at the patch embeddings, (B, N_patches, D)."""
    g = _norm(model.head.weight[targets], trace.fc_norm)
    B, D = g.shape
    N, prefix = trace.num_tokens, trace.num_prefix_tokens
    if model.global_pool == "avg":
        start = 0 if getattr(model, "pool_include_prefix", False) else prefix
        g_tokens = torch.cat([g.new_zeros(B, start, D), (g / (N - start)).unsqueeze(1).expand(B, N - start, D)], 1)
    else:
        g_tokens = torch.cat([g.unsqueeze(1), g.new_zeros(B, N - 1, D)], 1)
    g_tokens = _norm(g_tokens, trace.norm)
    for blk, rec in zip(reversed(model.blocks), reversed(trace.blocks)):
        g_tokens = _block_backward(blk, rec, g_tokens, rule)
    g_tokens = _norm(g_tokens, trace.norm_pre)
    return g_tokens[:, prefix:]


@register_relevance("attnlrp")
class AttnLRP(RelevanceMethod):
    """AttnLRP relevance of timm ViTs on the patch grid (ViT, DeiT-III, DINOv2 incl. registers)."""

    differentiability = "exact"
    architectures = ("timm VisionTransformer",)
    families = ("vit",)

    def __init__(
        self, attention_rule: AttentionRule = "attnlrp", normalize: Normalization = "minmax", eps: float = 1e-8
    ) -> None:
        """
        Args:
            attention_rule: `attnlrp` (uniform rule on q k^T and A v, relevance through softmax) or
                `cp` (CP-LRP: q and k get no relevance; LXT's recommendation for ViTs).
            normalize: `minmax` or `positive_max` (see `normalize_maps`).
            eps: normalisation stabiliser.
        """
        super().__init__(normalize=normalize, eps=eps)
        if attention_rule not in ("attnlrp", "cp"):
            raise ValueError(f"attention_rule must be 'attnlrp' or 'cp', got {attention_rule!r}")
        self.attention_rule = attention_rule

    def check_model(self, model: nn.Module) -> None:
        check_vit(model)

    def explain(
        self, model: nn.Module, images: Tensor, targets: Tensor | None, *, differentiable: bool
    ) -> tuple[Tensor, Tensor, Tensor]:
        trace = trace_vit(model, images)
        targets = resolve_targets(trace.logits, targets)
        with torch.set_grad_enabled(differentiable and torch.is_grad_enabled()):
            g = rule_backward(model, trace, targets, self.attention_rule)
            with float32_region(g):  # the relevance sum over D channels of both signs: cancels, so float32
                raw = (upcast(trace.patch_tokens) * upcast(g)).sum(dim=-1)
        return raw.view(raw.shape[0], *trace.grid), trace.logits, targets


# CP-LRP: q and k get no relevance (LXT's recommendation for ViTs)
register_relevance("cp_lrp", AttnLRP, attention_rule="cp")
