"""Every shipped plugin, built with a non-default value for every constructor argument, comes back from a
checkpoint exactly: the hparams record what it was built with (`RecordsInitArgs`), and
`GuidedFineTuner.load_from_checkpoint` rebuilds an object with the same arguments and the same state.

The table below names a non-default value for each argument of each shipped class; a test checks it covers
every argument of every shipped name, so a new argument (or a new shipped plugin) must be added here."""

from __future__ import annotations

import inspect
from pathlib import Path
from typing import Any

import pytest
import torch

from cft_lightning._plugins import plugin_config
from cft_lightning._registry import REGULARIZERS, RELEVANCE, SHIPPED_REGULARIZERS, SHIPPED_RELEVANCE
from cft_lightning.models import BackboneSpec, GuidedFineTuner
from cft_lightning.regularizers import create_regularizer
from cft_lightning.relevance import create_relevance

TINY = {"img_size": 32, "patch_size": 8, "depth": 2}

CFT_ARGS = {"concept_weight": 0.25, "non_concept_weight": 0.75, "align_weight": 0.5, "cls_weight": 0.3,
            "loss_form": "release", "consistency_target": "label", "relevance_target": "self",
            "temperature": 2.0, "mask_kind": "object", "eps": 1e-5}
REGULARIZER_ARGS: dict[str, dict[str, Any]] = {
    "plain": {"consistency_target": "self", "temperature": 2.0},
    "object": {"mask_kind": "concept"},  # the rest goes to CFT (*args, **kwargs): checked with cft's values
    "cft": CFT_ARGS,
    "rrr": {"grad_weight": 1e-3, "cls_weight": 0.5, "l2_weight": 1e-4, "reduction": "mean", "mask_kind": "decoy",
            "mask_role": "irrelevant", "consistency_target": "self", "temperature": 2.0},
    "gradmask": {"penalty_weight": 10.0, "cls_weight": 0.5, "form": "authors", "penalty_growth": 1.5,
                 "penalty_cap": 100.0, "mask_kind": "concept", "mask_role": "irrelevant", "temperature": 2.0},
    "rrda": {"probability": 0.25, "context_fill": "keep", "mask_kind": "concept", "temperature": 2.0},
    "robust_vit": {"background_weight": 1.0, "foreground_weight": 0.5, "seg_weight": 0.4, "cls_weight": 0.6,
                   "temperature": 2.0, "consistency_target": "label", "mask_kind": "concept"},
    "lvlm_va": {"grad_weight": 10.0, "cls_weight": 0.5, "l2_weight": 1e-4, "reduction": "batch_sum",
                "mask_kind": "decoy", "alignment_ratio": 0.25, "temperature": 2.0},
}
RELEVANCE_ARGS: dict[str, dict[str, Any]] = {
    "attnlrp": {"attention_rule": "cp", "normalize": "positive_max", "eps": 1e-6, "second_order": "autograd"},
    "cp_lrp": {"attention_rule": "attnlrp", "normalize": "positive_max", "eps": 1e-6,  # overrides the preset
               "second_order": "autograd"},
    "rollout": {"normalize": "positive_max", "eps": 1e-6},
    "gradcam": {"layer": "blocks.0", "normalize": "positive_max", "eps": 1e-6},
    "iia": {"steps": 3, "normalize": "positive_max", "eps": 1e-6},
    "input_grad": {"channels": "abs_max", "normalize": "positive_max", "eps": 1e-6},
    "ixg": {"normalize": "positive_max", "eps": 1e-6},
    "grad_x_act": {"layer": "blocks.1", "positive": False, "normalize": "positive_max", "eps": 1e-6},
    "lrp": {"composite": "epsilon_plus", "normalize": "positive_max", "eps": 1e-6},
}


def _arguments(cls: type) -> set[str]:
    params = inspect.signature(cls.__init__).parameters.values()
    return {p.name for p in params if p.name != "self" and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)}


def _state(obj: object) -> dict[str, Any]:
    return {k: v for k, v in vars(obj).items() if not k.startswith("_")}


def test_the_table_sets_every_argument_of_every_shipped_plugin_to_a_non_default_value():
    assert set(REGULARIZER_ARGS) == set(SHIPPED_REGULARIZERS) and set(RELEVANCE_ARGS) == set(SHIPPED_RELEVANCE)
    for registry, table in ((REGULARIZERS, REGULARIZER_ARGS), (RELEVANCE, RELEVANCE_ARGS)):
        for name, args in table.items():
            entry = registry.resolve(name)
            assert _arguments(entry.cls) <= set(args), f"{name}: no value for {_arguments(entry.cls) - set(args)}"
            defaults = {p.name: p.default for p in inspect.signature(entry.cls.__init__).parameters.values()}
            defaults.update(entry.preset)  # a preset's arguments are the name's defaults
            same = [k for k, v in args.items() if k in defaults and defaults[k] == v]
            assert not same, f"{name}: {same} at their default"


def _round_trip(tmp_path: Path, regularizer: Any, relevance: Any) -> GuidedFineTuner:
    torch.manual_seed(0)
    spec = BackboneSpec(name="vit_tiny_patch16_224", pretrained=False, num_classes=3, model_kwargs=TINY)
    model = GuidedFineTuner(spec, regularizer, relevance, lr=3e-4, track_reference=False)
    path = tmp_path / "plugins.ckpt"
    torch.save({"state_dict": model.state_dict(), "hyper_parameters": dict(model.hparams),
                "pytorch-lightning_version": "2.6.0"}, path)
    return GuidedFineTuner.load_from_checkpoint(path, map_location="cpu", weights_only=False)


@pytest.mark.parametrize("name", SHIPPED_REGULARIZERS)
def test_every_shipped_regularizer_round_trips_with_non_default_values(tmp_path: Path, name: str):
    args = {**(CFT_ARGS if name == "object" else {}), **REGULARIZER_ARGS[name]}
    reg = create_regularizer(name, **args)
    relevance = create_relevance("attnlrp") if reg.requirements.relevance else None
    loaded = _round_trip(tmp_path, reg, relevance).regularizer
    assert type(loaded) is type(reg) and plugin_config(loaded) == plugin_config(reg)
    assert plugin_config(reg)["init_args"] == args
    assert _state(loaded) == _state(reg) and loaded.requirements == reg.requirements


@pytest.mark.parametrize("name", SHIPPED_RELEVANCE)
def test_every_shipped_relevance_method_round_trips_with_non_default_values(tmp_path: Path, name: str):
    if name == "lrp":
        pytest.importorskip("zennit")
    method = create_relevance(name, **RELEVANCE_ARGS[name])
    loaded = _round_trip(tmp_path, create_regularizer("cft"), method).relevance
    assert type(loaded) is type(method) and plugin_config(loaded) == plugin_config(method)
    assert _state(loaded) == _state(method)
