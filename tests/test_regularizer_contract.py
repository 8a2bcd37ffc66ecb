"""The Regularizer contract, on every registered regularizer (`list_regularizers()`: the shipped ones and any a
plugin registers, e.g. with CFT_PLUGINS): it declares its requirements, its `plugin_config` rebuilds an equal
object, and one step on a tiny ViT with the masks it names gives a finite loss that moves the parameters and
depends on those masks."""

from __future__ import annotations

import importlib

import pytest
import torch
from _regularizer_helpers import grads_of, tiny_batch, tiny_vit

from cft_lightning._plugins import Requirements, plugin_config
from cft_lightning.demo.settings import DEFAULT_RELEVANCE
from cft_lightning.regularizers import create_regularizer, list_regularizers
from cft_lightning.relevance import create_relevance

NAMES = list_regularizers()


def _state(obj: object) -> dict:
    return {k: v for k, v in vars(obj).items() if not k.startswith("_")}


def _batch(kinds: tuple[str, ...], flip: bool = False) -> dict:
    """The helpers' batch (concept and object masks) plus any other kind named, each its complement if `flip`."""
    batch = tiny_batch()
    for kind in kinds:
        if kind not in batch["masks"]:
            mask = torch.zeros(2, 32, 32)
            mask[:, 2:14, 6:30] = 1  # another region than the object's
            batch["masks"][kind] = mask
    if flip:
        batch["masks"] = {k: 1 - m if k in kinds else m for k, m in batch["masks"].items()}
    return batch


def _step(reg, batch: dict, model: torch.nn.Module) -> torch.Tensor:
    needs = reg.requirements
    relevance = create_relevance(DEFAULT_RELEVANCE) if needs.relevance else None
    reference = model(batch["image"]).detach() if needs.reference_logits else None
    reg.step_begin(100, 1)
    torch.manual_seed(0)  # the same random draws (RRDA's composites) for every call
    return reg(batch, model, relevance, reference).total


def test_every_shipped_regularizer_is_registered():
    assert {"plain", "object", "cft", "rrr", "gradmask", "rrda", "robust_vit", "lvlm_va"} <= set(NAMES)


@pytest.mark.parametrize("name", NAMES)
def test_requirements_are_declared(name: str):
    needs = create_regularizer(name).requirements
    assert isinstance(needs, Requirements)
    assert all(isinstance(kind, str) and kind for kind in needs.masks)
    if needs.alignment is not None:
        kind, ratio = needs.alignment
        assert kind in needs.masks and 0 < ratio < 1


@pytest.mark.parametrize("name", NAMES)
def test_plugin_config_round_trip_rebuilds_an_equal_object(name: str):
    reg = create_regularizer(name)
    config = plugin_config(reg)
    module, _, cls = config["class_path"].rpartition(".")
    rebuilt = getattr(importlib.import_module(module), cls)(**config["init_args"])
    assert type(rebuilt) is type(reg) and _state(rebuilt) == _state(reg) and plugin_config(rebuilt) == config
    assert rebuilt.requirements == reg.requirements


@pytest.mark.parametrize("name", NAMES)
def test_one_step_is_finite_moves_the_parameters_and_reads_the_declared_masks(name: str):
    reg = create_regularizer(name)
    kinds = reg.requirements.masks
    model = tiny_vit().train()
    total = _step(reg, _batch(kinds), model)
    assert total.dim() == 0 and torch.isfinite(total)
    grads = grads_of(model, total)
    assert all(torch.isfinite(g).all() for g in grads.values())
    assert max(float(g.abs().max()) for g in grads.values()) > 0, "the loss does not move the parameters"
    if kinds:  # the objective depends on the masks it declares: their complement gives another loss
        flipped = _step(reg, _batch(kinds, flip=True), model)
        assert not torch.allclose(flipped, total, rtol=1e-9, atol=0), f"{name} ignores its masks {kinds}"
