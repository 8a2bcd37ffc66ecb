"""Agreement of every objective and relevance method under mixed precision with its float32 result.

    python perf/precision_agreement.py                              # tiny randomised ViT, bf16 and fp16
    python perf/precision_agreement.py --model vit_base_patch16_224 --size 224 --batch_size 2 --init timm

One float32 model and one batch; each case runs the objective once in float32 and once inside
`torch.autocast("cpu", dtype)` (what Lightning's `bf16-mixed` / `16-mixed` do around a training step; the
backward runs outside autocast, as there; float16 scales the loss as 16-mixed's GradScaler does, from 2^16,
halved while the gradient overflows), on the same weights and batch. Printed per case: the Pearson
correlation of the maps (the lowest over the images; the input gradient for the input-gradient penalties),
`raw err`, the relative error of the raw (unnormalised) maps ||raw - raw_32|| / ||raw_32||, the loss's relative
difference, and the cosine of the two parameter gradients. `--init random` re-draws the weights far from timm's
near-uniform-attention init (weights ~ N(0, 1/fan_in)), as the tests' tiny models do.
`kink`: `flip` when a map's largest or smallest cell differs between the two runs (the min-max normalisation's
kinks), `near` when a CFT map has an unclamped cell within 0.02 of Phi = 0 inside its mask or of Phi = 1 outside
(where d log Phi / dPhi is large): there the objective is not smooth at bfloat16's rounding, and the gradient
can turn whatever runs in float32. `--without REGION ...` runs the low-precision side with those float32 regions
switched off (what each buys).
"""

from __future__ import annotations

import argparse
import importlib
import math
from collections.abc import Callable
from contextlib import nullcontext

import timm
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from cft_lightning import regularizers as R
from cft_lightning import relevance as M
from cft_lightning.regularizers.base import masks_to_grid
from cft_lightning.relevance.input_gradient import input_gradient

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
# region -> the module whose float32 regions (`upcast` + `float32_region`) `--without` switches off
REGIONS = {
    "vit_trace": "cft_lightning.relevance._vit",  # LayerNorm statistics and softmax of AttnLRP's recorded forward
    "rules": "cft_lightning.relevance.rules",  # the LayerNorm rule, the softmax VJP, the generic identity rule
    "relevance_sum": "cft_lightning.relevance.attn_lrp",  # AttnLRP's sum of patch tokens x gradient
    "normalize": "cft_lightning.relevance.base",  # normalize_maps
    "rollout": "cft_lightning.relevance.gradient_rollout",
    "log_terms": "cft_lightning.regularizers.cft",  # CFT's log(Phi), log(1 - Phi)
    "cross_entropy": "cft_lightning.regularizers.base",
}


def switch_off(regions: list[str]) -> None:
    """Replace `upcast` by the identity and `float32_region` by a no-op in the named regions' modules."""
    for region in regions:
        module = importlib.import_module(REGIONS[region])
        module.upcast = lambda t: t
        module.float32_region = lambda like: nullcontext()


def randomize_(model: nn.Module, seed: int) -> nn.Module:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.split(".")[-1] in ("pos_embed", "cls_token", "reg_token"):
                new = 0.5 * torch.randn(p.shape, generator=gen)
            elif name.endswith("gamma"):
                new = 0.5 + torch.rand(p.shape, generator=gen)
            elif p.ndim >= 2:
                new = torch.randn(p.shape, generator=gen) / math.sqrt(p[0].numel())
            elif name.endswith("weight"):
                new = 1.0 + 0.2 * torch.randn(p.shape, generator=gen)
            else:
                new = 0.2 * torch.randn(p.shape, generator=gen)
            p.copy_(new)
    return model


def build(args: argparse.Namespace) -> tuple[nn.Module, dict]:
    torch.manual_seed(args.seed)
    kwargs = dict(pretrained=False, num_classes=args.classes, img_size=args.size)
    if args.model == "tiny":
        model = timm.create_model("vit_tiny_patch16_224", patch_size=8, depth=4, embed_dim=96, num_heads=3, **kwargs)
    else:
        model = timm.create_model(args.model, **kwargs)
    if args.init == "random":
        randomize_(model, args.seed)
    gen = torch.Generator().manual_seed(args.seed + 1)
    B, S = args.batch_size, args.size
    concept, obj = torch.zeros(B, S, S), torch.zeros(B, S, S)
    concept[:, S // 8: S // 2, S // 4: 3 * S // 4] = 1
    obj[:, S // 8: 7 * S // 8, S // 8: 7 * S // 8] = 1
    critic = 1 - obj
    batch = {"image": torch.randn(B, 3, S, S, generator=gen), "label": torch.arange(B) % args.classes,
             "masks": {"concept": concept, "object": obj, "critic": critic}, "path": [str(i) for i in range(B)]}
    return model.eval(), batch


def _penalty_map(score: Callable[[Tensor, Tensor], Tensor]):
    def run(model: nn.Module, batch: dict) -> Tensor:  # the input gradient the penalty squares, channels summed
        labels = batch["label"]
        return input_gradient(model, batch["image"], lambda z: score(z, labels), create_graph=False)[1].sum(1)
    return run


_LOG_PROBS = _penalty_map(lambda z, y: F.log_softmax(z.float(), dim=1).sum())
_LOGIT = _penalty_map(lambda z, y: z.gather(1, y[:, None]).sum())

# name -> (regularizer, relevance, map of an input-gradient penalty or None: the relevance maps)
CASES = {
    "cft_attnlrp": (lambda: R.CFT(), lambda: M.AttnLRP(), None),
    "cft_cp_lrp": (lambda: R.CFT(), lambda: M.AttnLRP(attention_rule="cp"), None),
    "cft_rollout": (lambda: R.CFT(), lambda: M.GradientRollout(), None),
    "cft_gradcam": (lambda: R.CFT(), lambda: M.GradCAM(), None),
    "cft_input_grad": (lambda: R.CFT(), lambda: M.InputGradient(), None),
    "cft_ixg": (lambda: R.CFT(), lambda: M.InputXGradient(), None),
    "cft_grad_x_act": (lambda: R.CFT(), lambda: M.LayerGradXActivation(), None),
    "cft_iia": (lambda: R.CFT(), lambda: M.IIA(steps=2), None),
    "object_attnlrp": (lambda: R.ObjectMaskGuidance(), lambda: M.AttnLRP(), None),
    "robust_vit": (lambda: R.RobustViT(), lambda: M.GradientRollout(), None),
    "robust_vit_attnlrp": (lambda: R.RobustViT(), lambda: M.AttnLRP(), None),
    "rrr": (lambda: R.RRR(), lambda: None, _LOG_PROBS),
    "gradmask": (lambda: R.GradMask(), lambda: None, _LOGIT),
    "lvlm_va": (lambda: R.LVLMCritic(), lambda: None, _LOG_PROBS),
    "rrda": (lambda: R.RRDA(), lambda: None, None),
    "plain": (lambda: R.PlainFineTuning(), lambda: None, None),
}


def _pearson(a: Tensor, b: Tensor) -> float:
    a, b = a.flatten(1).double(), b.flatten(1).double()
    a, b = a - a.mean(1, keepdim=True), b - b.mean(1, keepdim=True)
    return float(((a * b).sum(1) / (a.norm(dim=1) * b.norm(dim=1)).clamp_min(1e-30)).min())


def kink(name: str, batch: dict, maps32: Tensor | None, raw32: Tensor | None, raw: Tensor | None) -> str:
    if raw is None or raw32 is None or CASES[name][2] is not None:  # the penalties on input gradients are smooth
        return "-"
    a, b = raw32.flatten(1), raw.flatten(1)
    if not (torch.equal(a.argmax(1), b.argmax(1)) and torch.equal(a.argmin(1), b.argmin(1))):
        return "flip"
    kind = {"cft": "concept", "object": "object"}.get(name.split("_")[0])
    if kind is None or maps32 is None:
        return "-"
    grid = masks_to_grid(batch["masks"][kind], tuple(maps32.shape[-2:])).flatten(1)
    phi = maps32.flatten(1)
    free = (phi > 1e-6) & (phi < 1 - 1e-6)
    near = ((grid > 0) & free & (phi < 0.02)) | ((grid < 1) & free & (phi > 0.98))
    return "near" if near.any() else "-"


def run_case(name: str, model: nn.Module, batch: dict,
             dtype: torch.dtype | None) -> tuple[float, Tensor, Tensor | None, Tensor | None]:
    """(loss, flat parameter gradient, map, raw map) of one case, in float32 (dtype None) or under CPU autocast."""
    make_reg, make_rel, penalty_map = CASES[name]
    scale = 2.0**16 if dtype == torch.float16 else 1.0  # 16-mixed's GradScaler starts at 2^16
    while True:
        reg, rel = make_reg(), make_rel()
        model.zero_grad(set_to_none=True)
        torch.manual_seed(0)  # RRDA draws its composites
        with torch.autocast("cpu", dtype=dtype or torch.bfloat16, enabled=dtype is not None):
            out = reg(batch, model, rel, None)
            maps = out.relevance.maps.detach() if out.relevance is not None else None
            raw = out.relevance.raw.detach().float() if out.relevance is not None else None
            if penalty_map is not None:
                maps = raw = penalty_map(model, batch).detach()
        (out.total * scale).backward()  # outside autocast, as Lightning does
        flat = torch.cat([p.grad.flatten() if p.grad is not None else torch.zeros(p.numel())
                          for p in model.parameters()]) / scale
        if torch.isfinite(flat).all() or scale <= 1.0:  # else halve the scale and retry, as the GradScaler does
            return float(out.total.detach()), flat, maps, raw
        scale /= 2.0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="tiny", help="`tiny` (4 blocks, width 96, patch 8) or a timm ViT name")
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--batch_size", type=int, default=4)
    parser.add_argument("--classes", type=int, default=10)
    parser.add_argument("--init", choices=("random", "timm"), default="random")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--dtypes", nargs="+", choices=list(DTYPES), default=list(DTYPES))
    parser.add_argument("--cases", nargs="+", choices=list(CASES), default=list(CASES))
    parser.add_argument("--without", nargs="+", choices=list(REGIONS), default=[])
    args = parser.parse_args()
    model, batch = build(args)
    print(f"{args.model} ({args.init} init) @ {args.size}px, batch {args.batch_size}, {args.classes} classes, "
          f"torch {torch.__version__}, CPU autocast against float32"
          + (f", float32 regions off: {' '.join(args.without)}" if args.without else ""))
    print(f"{'case':20s} {'dtype':5s} {'map r':>8s} {'raw err':>9s} {'loss rel':>9s} {'grad cos':>9s}  finite  kink")
    results = {name: run_case(name, model, batch, None) for name in args.cases}  # float32, before any switch-off
    switch_off(args.without)
    for name in args.cases:
        loss32, grad32, map32, raw32 = results[name]
        for key in args.dtypes:
            try:
                loss, grad, maps, raw = run_case(name, model, batch, DTYPES[key])
            except Exception as exc:  # report it and go on: a failing case is a measurement too
                print(f"{name:20s} {key:5s} error: {type(exc).__name__}: {str(exc).splitlines()[0][:90]}")
                continue
            r = _pearson(maps, map32) if maps is not None else float("nan")
            err = float((raw - raw32).norm() / raw32.norm()) if raw is not None else float("nan")
            rel = abs(loss - loss32) / max(abs(loss32), 1e-30)
            cos = float(F.cosine_similarity(grad.double(), grad32.double(), dim=0))
            finite = math.isfinite(loss) and bool(torch.isfinite(grad).all())
            where = kink(name, batch, map32, raw32, raw)
            print(f"{name:20s} {key:5s} {r:8.5f} {err:9.2e} {rel:9.2e} {cos:9.5f}  {finite!s:6s}  {where}", flush=True)


if __name__ == "__main__":
    main()
