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

from typing import Literal

import torch
from torch import Tensor, nn

from cft_lightning._precision import float32_region, upcast
from cft_lightning._registry import register_relevance
from cft_lightning.relevance._fused_rules import (
    attention_rule_fused,
    fused_activation,
    layer_norm_rule_fused,
    mlp_rule_fused,
)
from cft_lightning.relevance._vit import BlockRecord, NormRecord, ViTTrace, check_vit, trace_vit
from cft_lightning.relevance.base import Normalization, RelevanceMethod, resolve_targets
from cft_lightning.relevance.rules import (
    AttentionRule,
    attention_rule,
    identity_rule,
    layer_norm_rule,
    linear_rule,
)

SecondOrder = Literal["fused", "autograd"]


class _Rules:
    """The rule implementations of one explanation: the fused Functions (`_fused_rules.py`) or the plain
    expressions of `rules.py` (`fused=False`, the reference: autograd keeps every intermediate)."""

    def __init__(self, rule: AttentionRule, fused: bool) -> None:
        self.rule, self.fused = rule, fused

    def norm(self, g: Tensor, rec: NormRecord | None) -> Tensor:
        if rec is None:
            return g
        return (layer_norm_rule_fused if self.fused else layer_norm_rule)(g, rec.std, rec.weight)

    def mlp(self, mlp: nn.Module, hidden: Tensor, g: Tensor) -> Tensor:
        kind = fused_activation(mlp.act) if self.fused else None
        if kind is not None:
            return mlp_rule_fused(g, hidden, mlp.fc2.weight, mlp.fc1.weight, kind)
        gm = linear_rule(g, mlp.fc2.weight)
        return linear_rule(identity_rule(gm, mlp.act, hidden), mlp.fc1.weight)

    def attention(self, g: Tensor, rec: BlockRecord, scale: float) -> tuple[Tensor, Tensor, Tensor]:
        if self.fused and self.rule == "attnlrp":
            return attention_rule_fused(g, rec.q, rec.k, rec.v, rec.attn, scale)
        return attention_rule(g, rec.q, rec.k, rec.v, rec.attn, scale, self.rule)


def _scale(g: Tensor, layer_scale: nn.Module) -> Tensor:
    gamma = getattr(layer_scale, "gamma", None)
    return g if gamma is None else g * gamma


def _block_backward(blk: nn.Module, rec: BlockRecord, g: Tensor, rules: _Rules) -> Tensor:
    """Modified gradient at a pre-norm block's input from the one at its output."""
    attn = blk.attn
    g = g + rules.norm(rules.mlp(blk.mlp, rec.hidden, _scale(g, blk.ls2)), rec.norm2)

    B, N, _ = g.shape
    ga = rules.norm(linear_rule(_scale(g, blk.ls1), attn.proj.weight), rec.attn_norm)
    ga = ga.reshape(B, N, attn.num_heads, attn.head_dim).transpose(1, 2)
    g_q, g_k, g_v = rules.attention(ga, rec, attn.scale)
    g_q, g_k = rules.norm(g_q, rec.q_norm), rules.norm(g_k, rec.k_norm)
    # stacked straight into qkv's (B, N, 3, H, d) layout: one copy, and the reshape is a view
    g_qkv = torch.stack([t.transpose(1, 2) for t in (g_q, g_k, g_v)], dim=2).reshape(B, N, 3 * attn.attn_dim)
    return g + rules.norm(linear_rule(g_qkv, attn.qkv.weight), rec.norm1)


def rule_backward(
    model: nn.Module, trace: ViTTrace, targets: Tensor, rule: AttentionRule = "attnlrp",
    second_order: SecondOrder = "fused",
) -> Tensor:
    """Modified gradient of the target logits at the patch embeddings, (B, N_patches, D).

    `second_order` says what the backward through this function keeps (see `AttnLRP`); the values are the same.
    """
    rules = _Rules(rule, fused=second_order != "autograd")
    g = rules.norm(model.head.weight[targets], trace.fc_norm)
    B, D = g.shape
    N, prefix = trace.num_tokens, trace.num_prefix_tokens
    if model.global_pool == "avg":
        start = 0 if getattr(model, "pool_include_prefix", False) else prefix
        g_tokens = torch.cat([g.new_zeros(B, start, D), (g / (N - start)).unsqueeze(1).expand(B, N - start, D)], 1)
    else:
        g_tokens = torch.cat([g.unsqueeze(1), g.new_zeros(B, N - 1, D)], 1)
    g_tokens = rules.norm(g_tokens, trace.norm)
    for blk, rec in zip(reversed(model.blocks), reversed(trace.blocks)):
        g_tokens = _block_backward(blk, rec, g_tokens, rules)
    g_tokens = rules.norm(g_tokens, trace.norm_pre)
    return g_tokens[:, prefix:]


@register_relevance("attnlrp")
class AttnLRP(RelevanceMethod):
    """AttnLRP relevance of timm ViTs on the patch grid (ViT, DeiT-III, DINOv2 incl. registers)."""

    differentiability = "exact"
    architectures = ("timm VisionTransformer",)
    families = ("vit",)

    def __init__(
        self,
        attention_rule: AttentionRule = "attnlrp",
        normalize: Normalization = "minmax",
        eps: float = 1e-8,
        second_order: SecondOrder = "fused",
    ) -> None:
        """
        Args:
            attention_rule: `attnlrp` (uniform rule on q k^T and A v, relevance through softmax) or
                `cp` (CP-LRP: q and k get no relevance; LXT's recommendation for ViTs).
            normalize: `minmax` or `positive_max` (see `normalize_maps`).
            eps: normalisation stabiliser.
            second_order: how a guided step differentiates the map (the map and its gradient are the same
                either way; docs/performance.md has the time and memory of both). `fused`: the rules'
                hand-written derivatives (`_fused_rules.py`), which keep little beyond the forward's records
                and are faster. `autograd`: the plain rule expressions of `rules.py`, through which autograd
                keeps every intermediate (1.6x the memory); the reference `fused` is tested against.
        """
        super().__init__(normalize=normalize, eps=eps)
        if attention_rule not in ("attnlrp", "cp"):
            raise ValueError(f"attention_rule must be 'attnlrp' or 'cp', got {attention_rule!r}")
        if second_order not in ("fused", "autograd"):
            raise ValueError(f"second_order must be 'fused' or 'autograd', got {second_order!r}")
        self.attention_rule = attention_rule
        self.second_order = second_order

    def check_model(self, model: nn.Module) -> None:
        check_vit(model)

    def explain(
        self, model: nn.Module, images: Tensor, targets: Tensor | None, *, differentiable: bool
    ) -> tuple[Tensor, Tensor, Tensor]:
        trace = trace_vit(model, images)
        targets = resolve_targets(trace.logits, targets)
        with torch.set_grad_enabled(differentiable and torch.is_grad_enabled()):
            g = rule_backward(model, trace, targets, self.attention_rule, self.second_order)
            with float32_region(g):  # the relevance sum over D channels of both signs: cancels, so float32
                raw = (upcast(trace.patch_tokens) * upcast(g)).sum(dim=-1)
        return raw.view(raw.shape[0], *trace.grid), trace.logits, targets


# CP-LRP: q and k get no relevance (LXT's recommendation for ViTs)
register_relevance("cp_lrp", AttnLRP, attention_rule="cp")
