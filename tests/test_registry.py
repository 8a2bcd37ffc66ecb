"""One registry per plugin kind (issue 18, item 2): names and class paths resolve in one place, user plugins
register by being imported (CFT_PLUGINS, entry points), and every command that names a method reads it."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from cft_lightning import _registry
from cft_lightning._registry import SHIPPED_REGULARIZERS, SHIPPED_RELEVANCE, Registry
from cft_lightning.errors import CFTUserError, PluginError, UnknownPluginError
from cft_lightning.regularizers import CFT, Regularizer, create_regularizer, list_regularizers, regularizer_class
from cft_lightning.relevance import (
    AttnLRP,
    GradCAM,
    InputGradient,
    LayerGradXActivation,
    RelevanceMethod,
    ZennitLRP,
    create_relevance,
    list_relevance,
    relevance_class,
)

PLUGIN = '''
import torch
from cft_lightning.relevance import InputXGradient, register_relevance


@register_relevance("{name}")
class Doubled(InputXGradient):
    """Input x gradient, doubled (registered by importing this module)."""
'''


@pytest.fixture()
def plugin_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A folder on sys.path for plugin modules; the plugin state of the registries is restored afterwards."""
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr(_registry, "_plugins_imported", set())
    for registry in (_registry.RELEVANCE, _registry.REGULARIZERS):
        monkeypatch.setattr(registry, "_entries", dict(registry.entries()))
    return tmp_path


def _shipped(names: list[str], registry: Registry) -> set[str]:
    return {n for n in names if registry.class_of(n).__module__.startswith("cft_lightning.")}


def test_the_shipped_names_listed_for_help_are_the_registered_ones():
    assert _shipped(list_relevance(), _registry.RELEVANCE) == set(SHIPPED_RELEVANCE)
    assert _shipped(list_regularizers(), _registry.REGULARIZERS) == set(SHIPPED_REGULARIZERS)


def test_names_presets_and_class_flags():
    cp = create_relevance("cp_lrp")
    assert type(cp) is AttnLRP and cp.attention_rule == "cp" and create_relevance("attnlrp").attention_rule == "attnlrp"
    assert type(create_relevance("lrp")) is ZennitLRP and create_relevance("lrp").composite == "epsilon_plus_flat"
    assert create_relevance("cp_lrp", normalize="positive_max").normalize == "positive_max"  # kwargs on the preset
    assert relevance_class("iia")().steps == 10  # what `cft explain --method iia` used
    layered = {n for n in list_relevance() if relevance_class(n).explains_layer}
    assert {"gradcam", "grad_x_act"} <= layered and not layered & {"attnlrp", "ixg", "rollout", "lrp"}
    assert relevance_class("gradcam") is GradCAM and relevance_class("grad_x_act") is LayerGradXActivation
    assert regularizer_class("cft") is CFT and isinstance(create_regularizer("rrr"), Regularizer)
    assert {type(create_regularizer(n)).__name__ for n in SHIPPED_REGULARIZERS} == {
        "PlainFineTuning", "ObjectMaskGuidance", "CFT", "RRR", "GradMask", "RRDA", "RobustViT", "LVLMCritic"}


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("atnlrp", r"unknown relevance method 'atnlrp' \(did you mean 'attnlrp'.*registered: attnlrp, cp_lrp"),
        ("no_such_pkg.mod.Class", r"'no_such_pkg.mod.Class': no module of it imports .*No module named "
                                  r"'no_such_pkg'.*PYTHONPATH"),
        ("cft_lightning.relevance.NoSuch", r"cft_lightning.relevance has no NoSuch"),
        ("cft_lightning.regularizers.CFT", r"'cft_lightning.regularizers.CFT' is not a subclass of "
                                           r"cft_lightning.relevance.base.RelevanceMethod"),
        ("cft_lightning.relevance.base.RelevanceMethod", r"is abstract: it does not implement explain"),
        ("cft_lightning..GradCAM", r"not a registered name nor a class path"),
    ],
)
def test_a_spec_that_resolves_to_nothing_is_one_line_naming_kind_spec_and_choices(spec: str, message: str):
    with pytest.raises(UnknownPluginError, match=message) as info:
        create_relevance(spec)
    assert isinstance(info.value, CFTUserError) and isinstance(info.value, ValueError)
    assert "\n" not in str(info.value)


def test_a_class_path_builds_the_class_and_wrong_arguments_are_named():
    method = create_relevance("cft_lightning.relevance.input_gradient.InputGradient", channels="sum")
    assert type(method) is InputGradient and method.channels == "sum"
    with pytest.raises(PluginError, match=r"relevance method 'attnlrp' \(.*AttnLRP\) cannot be built with \['layer'\]"):
        create_relevance("attnlrp", layer="blocks.0")


def test_register_as_decorator_and_preset_and_its_errors():
    registry = Registry("relevance method", RelevanceMethod)

    @registry.register("saliency")
    class Saliency(InputGradient):
        pass

    registry.register("saliency_sum", Saliency, channels="sum")
    assert registry.names() == ["saliency", "saliency_sum"] and registry.create("saliency_sum").channels == "sum"
    assert registry.resolve("saliency_sum").preset == {"channels": "sum"}
    registry.register("saliency", Saliency)  # the same class again (a re-imported module): fine
    with pytest.raises(PluginError, match="'saliency' is taken by .*Saliency; register .*AttnLRP under another"):
        registry.register("saliency", AttnLRP)
    with pytest.raises(PluginError, match="no dots"):
        registry.register("my.name", Saliency)
    with pytest.raises(PluginError, match="does not take the preset"):
        registry.register("bad", Saliency, chanels="sum")
    with pytest.raises(PluginError, match="not a subclass of cft_lightning.relevance.base.RelevanceMethod"):
        registry.register("reg", CFT)


def test_cft_plugins_modules_register_at_the_first_lookup(plugin_dir: Path, monkeypatch: pytest.MonkeyPatch):
    (plugin_dir / "cft_test_plugin_env.py").write_text(PLUGIN.format(name="doubled_env"))
    assert "doubled_env" not in list_relevance()
    monkeypatch.setenv("CFT_PLUGINS", " cft_test_plugin_env , ")
    assert "doubled_env" in list_relevance()
    assert type(create_relevance("doubled_env")).__name__ == "Doubled"
    monkeypatch.setenv("CFT_PLUGINS", "cft_test_plugin_env,cft_test_plugin_missing")
    with pytest.raises(PluginError, match=r"CFT_PLUGINS: cannot import module 'cft_test_plugin_missing' "
                                          r"\(ModuleNotFoundError: .*\); is its folder on PYTHONPATH"):
        list_relevance()


def test_a_class_path_runs_the_registrations_of_its_module(plugin_dir: Path):
    (plugin_dir / "cft_test_plugin_path.py").write_text(PLUGIN.format(name="doubled_path"))
    assert "doubled_path" not in list_relevance()
    assert relevance_class("cft_test_plugin_path.Doubled").__name__ == "Doubled"
    assert "doubled_path" in list_relevance()


def test_entry_points_register_once(plugin_dir: Path, monkeypatch: pytest.MonkeyPatch):
    """A distribution that declares `[cft_lightning.plugins]` entry points gets its module imported."""
    (plugin_dir / "cft_test_plugin_ep.py").write_text(PLUGIN.format(name="doubled_ep"))
    info = plugin_dir / "cft_test_plugin_ep-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: cft-test-plugin-ep\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text("[cft_lightning.plugins]\ndoubled = cft_test_plugin_ep\n")
    monkeypatch.setattr(_registry, "_entry_points_loaded", False)
    assert "doubled_ep" in list_relevance()
    (info / "entry_points.txt").write_text("[cft_lightning.plugins]\nbroken = cft_test_plugin_nowhere\n")
    monkeypatch.setattr(_registry, "_entry_points_loaded", False)
    with pytest.raises(PluginError, match=r"entry point broken = cft_test_plugin_nowhere of cft-test-plugin-ep "
                                          r"\(group cft_lightning.plugins\): cannot import it"):
        list_relevance()


def test_the_registry_module_is_light():
    import subprocess

    code = ("import sys, cft_lightning._registry\n"
            "print(sorted(m for m in ('torch', 'lightning', 'timm', 'numpy') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True)
    assert out.stdout.strip() == "[]", out.stdout + out.stderr


# ------------------------------------------------------------------ the commands read the registry
def test_explain_layer_is_refused_for_a_method_that_explains_no_layer(tmp_path: Path,
                                                                      capsys: pytest.CaptureFixture):
    from cft_lightning.cli import main

    with pytest.raises(SystemExit) as info:
        main(["explain", "--model", "x", "--pretrained", "--images", str(tmp_path), "--method", "ixg",
              "--layer", "blocks.0"])
    err = capsys.readouterr().err
    assert info.value.code == 2
    assert "--layer applies to a --method that explains one layer (grad_x_act, gradcam), not 'ixg'" in err
    with pytest.raises(SystemExit) as info:
        main(["explain", "--model", "x", "--pretrained", "--images", str(tmp_path), "--method", "gradcamm"])
    assert info.value.code == 2 and "did you mean 'gradcam'" in capsys.readouterr().err


def test_critique_attribution_takes_any_relevance_method_and_refuses_unknown_ones_before_loading(
        tmp_path: Path, capsys: pytest.CaptureFixture):
    import timm
    import torch

    from cft_lightning.cli import main
    from cft_lightning.critique.attribution import build_attributor

    torch.manual_seed(0)
    model = timm.create_model("test_resnet", pretrained=False, num_classes=3).eval()
    images = torch.randn(2, 3, 32, 32)
    for name in ("input_grad", "cft_lightning.relevance.InputXGradient", "grad_x_act"):
        attribution = build_attributor(name, model)(model, images, torch.tensor([0, 1]))
        assert attribution.shape == (2, 32, 32) and torch.isfinite(attribution).all()
    signed = build_attributor("input_grad", model)
    assert signed.method.channels == "sum"  # the signed sum: PPEPS-WGM segments the positive part
    assert (signed(model, images, torch.tensor([0, 1])) < 0).any()
    (tmp_path / "data" / "a").mkdir(parents=True)
    with pytest.raises(SystemExit) as info:
        main(["critique", "--model", "no_such_model", "--pretrained", "--data", str(tmp_path / "data"),
              "--out", str(tmp_path / "o"), "--attribution", "ixgg"])
    err = capsys.readouterr().err
    assert info.value.code == 2 and "--attribution: unknown relevance method 'ixgg'" in err
    assert "did you mean 'ixg'" in err and "or auto, deeplift_shap" in err and "no_such_model" not in err

