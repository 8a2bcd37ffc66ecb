"""`cft demo` end to end on a tiny benchmark: files, tables, overlays, and the pretrained-model cache."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from PIL import Image

from cft_lightning.cli import main
from cft_lightning.demo.pipeline import DemoSettings
from cft_lightning.demo.report import DECISION_METRICS, EVIDENCE_METRICS
from cft_lightning.demo.start import build_start

TINY = ["--num_classes", "3", "--image_size", "32", "--train_per_class", "12", "--test_per_class", "6",
        "--pretrain_epochs", "1", "--shortcut_epochs", "1", "--finetune_epochs", "1", "--images_per_class", "2",
        "--no_progress"]


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("demo")
    main(["demo", "--out", str(root / "run"), "--data_dir", str(root / "data"), "--methods", "plain", "cft",
          "--overlays", "2", *TINY])
    return root


def test_demo_writes_summary_results_and_pictures(demo_run: Path, capsys: pytest.CaptureFixture) -> None:
    run = demo_run / "run"
    summary = json.loads((run / "summary.json").read_text())
    assert set(summary["results"]["0"]) == {"plain", "cft"}
    for method in ("plain", "cft"):
        results = json.loads((run / "seed_0" / method / "results.json").read_text())
        assert results["schema"] == "cft_lightning.results/1"
        assert set(results["splits"]) == {"test_id", "test_ood", "fewshot"}
        assert results["splits"]["fewshot"]["num_images"] == 6  # 2 fine-tuning images of each of 3 classes
        assert results["fine_tuning_classes"] == ["alpha", "beta", "gamma"]  # on disk: --report keeps the split
        assert {"acc1_background_swapped", "bg_follow", "concept_share"} <= set(results["splits"]["test_id"]["metrics"])
        ood = results["splits"]["test_ood"]["metrics"]
        assert {"acc1", "worst_group_acc", "map"} <= set(ood)
        assert results["splits"]["test_ood"]["num_images"] == 18
    text = (run / "summary.md").read_text()
    decisions, evidence = text.split("\n\n")[:2]
    # every decision metric but mu_align (decoy benchmarks only); every class fine-tuned (the default), so no
    # fine-tuned / held-out split of OOD top-1; then every evidence and reliance metric
    assert decisions.splitlines()[0].count("|") == len(DECISION_METRICS) - 1 + 2, decisions
    assert "held-out classes" not in decisions and "mu_align" not in decisions
    assert evidence.splitlines()[0].count("|") == len(EVIDENCE_METRICS) + 2, evidence
    rows = [line.split("|")[1].strip() for line in decisions.splitlines()[2:]]
    assert rows == ["original", "plain", "cft"]
    assert [line.split("|")[1].strip() for line in evidence.splitlines()[2:]] == rows
    assert "Paired differences to original" in text and "Paired differences to plain" in text
    with Image.open(run / "overlays.png") as im:
        assert im.height > im.width / 4  # two rows of image | mask | 3 overlays
    with Image.open(run / "metrics.png") as im:
        assert im.width > 100


def test_start_models_are_cached_per_recipe_and_never_reused_when_damaged(demo_run: Path) -> None:
    """Both stages of the pretrained start live in the cache keyed by their recipe; a truncated weights file or
    a changed recipe means training again, never a silent reuse."""
    from cft_lightning._io import file_sha256
    from cft_lightning.benchmarks import ShortcutPartsSpec

    spec = ShortcutPartsSpec(num_classes=3, image_size=32, train_per_class=12, test_per_class=6)
    settings = DemoSettings(out=str(demo_run / "run"), benchmark=spec, pretrain_epochs=1, shortcut_epochs=1,
                            progress=False)
    first = json.loads((demo_run / "run" / "seed_0" / "start.json").read_text())
    assert [s["recipe"]["stage"] for s in first["stages"]] == ["parts", "shortcut"]
    again = build_start(settings, demo_run / "data", 0, demo_run / "again")
    assert [s["cached"] for s in again["stages"]] == [True, True]
    assert again.weights == Path(first["weights"])

    weights = again.weights
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])  # a truncated cache file
    rebuilt = build_start(settings, demo_run / "data", 0, demo_run / "rebuilt")
    assert [s["cached"] for s in rebuilt["stages"]] == [True, False]
    assert rebuilt.weights == weights and file_sha256(weights) == rebuilt["stages"][1]["sha256"]

    other = build_start(DemoSettings(out=settings.out, benchmark=spec, pretrain_epochs=1, shortcut_epochs=1,
                                     shortcut_lr=5e-4, progress=False), demo_run / "data", 0, demo_run / "other")
    assert [s["cached"] for s in other["stages"]] == [True, False], "another stage-2 recipe is another model"
    assert other.weights != weights


def test_scratch_start_trains_on_the_biased_split_only(demo_run: Path) -> None:
    from cft_lightning.benchmarks import ShortcutPartsSpec

    spec = ShortcutPartsSpec(num_classes=3, image_size=32, train_per_class=12, test_per_class=6)
    start = build_start(DemoSettings(benchmark=spec, start="scratch", scratch_epochs=1, progress=False),
                        demo_run / "data", 0, demo_run / "scratch")
    assert [s["recipe"]["stage"] for s in start["stages"]] == ["scratch"]
    assert start["stages"][0]["recipe"]["data"]["spurious_rate"] == spec.spurious_rate
    assert {"test_id_acc1", "test_ood_acc1", "bg_follow", "probe_ood_acc1"} <= set(start["stages"][0]["profile"])


def test_unknown_method_is_a_clear_error(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit) as info:
        main(["demo", "--out", str(tmp_path), "--methods", "nope", *TINY])
    assert info.value.code == 2
    assert "nope" in capsys.readouterr().err


def test_every_demo_method_builds_a_regularizer_and_relevance_method() -> None:
    from cft_lightning.demo.pipeline import RECIPES, build_method
    from cft_lightning.regularizers import Regularizer
    from cft_lightning.relevance import RelevanceMethod

    for name in RECIPES:
        regularizer, relevance = build_method(name)
        assert isinstance(regularizer, Regularizer), name
        if regularizer.requirements.relevance:
            assert isinstance(relevance, RelevanceMethod), name
        else:
            assert relevance is None, name


def test_demo_recipes_build_the_objects_the_documented_numbers_were_measured_with() -> None:
    """The recipes go through the registries and build the same objects, with the same arguments, as the
    hand-written factories did before (docs/demo.md's numbers); `rrr_decoy_gt` reads its decoy masks."""
    from cft_lightning._plugins import plugin_config
    from cft_lightning.demo.pipeline import build_method
    from cft_lightning.regularizers import CFT, RRDA, RRR, LVLMCritic, ObjectMaskGuidance, PlainFineTuning, RobustViT
    from cft_lightning.relevance import IIA, AttnLRP, GradCAM, GradientRollout, InputXGradient

    before = {
        "plain": (PlainFineTuning(consistency_target="label"), None),
        "object": (ObjectMaskGuidance(), AttnLRP()),
        "cft_cp": (CFT(), AttnLRP(attention_rule="cp")),
        "cft_gt": (CFT(consistency_target="label"), AttnLRP()),
        "cft_posmax": (CFT(), AttnLRP(normalize="positive_max")),
        "cft_release": (CFT(loss_form="release"), AttnLRP()),
        "cft_self": (CFT(relevance_target="self"), AttnLRP()),
        "cft_gradcam": (CFT(), GradCAM()),
        "cft_iia": (CFT(), IIA(steps=10)),
        "cft_ixg": (CFT(), InputXGradient()),
        "rrda_full": (RRDA(), None),
        "robust_vit": (RobustViT(), GradientRollout()),
        "lvlm_va_1e5": (LVLMCritic(grad_weight=1e5, alignment_ratio=0.5, reduction="batch_sum"), None),
        "rrr_decoy_gt": (RRR(grad_weight=1.0, cls_weight=1.0, mask_kind="decoy", mask_role="irrelevant",
                             reduction="batch_sum"), None),
    }
    for name, objects in before.items():
        built = build_method(name)
        for old, new in zip(objects, built):
            assert (old is None) == (new is None), name
            if old is not None:
                assert type(new) is type(old) and plugin_config(new) == plugin_config(old), name
    assert build_method("rrr_decoy_gt")[0].requirements.masks == ("decoy",)


def test_methods_take_a_regularizer_and_relevance_method_by_name_or_class_path(
        tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    from cft_lightning._plugins import plugin_config
    from cft_lightning.demo.pipeline import build_method
    from cft_lightning.errors import PluginError, UnknownPluginError

    def configs(spec: str) -> list:
        return [None if o is None else plugin_config(o) for o in build_method(spec)]

    assert configs("cft+ixg") == configs("cft_ixg")  # a registered regularizer + relevance method
    assert configs("cft") == configs("cft+attnlrp")  # a recipe named like a regularizer: the same objects
    assert configs("cft_lightning.regularizers.cft.CFT+cft_lightning.relevance.GradCAM") == configs("cft_gradcam")
    assert configs("gradmask") == configs("cft_lightning.regularizers.GradMask")
    assert configs("object+rollout")[1]["class_path"].endswith(".GradientRollout")
    reg, rel = build_method("robust_vit+cp_lrp")
    assert type(rel).__name__ == "AttnLRP" and rel.attention_rule == "cp"
    with pytest.raises(UnknownPluginError, match=r"'cft\+ixgg'.*did you mean 'ixg'"):
        build_method("cft+ixgg")
    with pytest.raises(UnknownPluginError, match="'nope' is no recipe or group and unknown regularizer 'nope'"):
        build_method("nope")
    with pytest.raises(PluginError, match="RRR uses no relevance method; drop \\+ixg"):
        build_method("rrr+ixg")
    for bad in ("cft+", "+ixg", "cft+ixg+rollout", "../cft"):
        with pytest.raises(PluginError, match="REGULARIZER"):
            build_method(bad)
    with pytest.raises(SystemExit) as info:  # on the command line: one line, before anything is built
        main(["demo", "--out", str(tmp_path), "--methods", "cft+ixgg", *TINY])
    err = capsys.readouterr().err
    assert info.value.code == 2 and err.count("\n") == 1 and "did you mean 'ixg'" in err
    assert not (tmp_path / "seed_0").exists()


def test_demo_all_methods_from_the_same_pretrained_model(demo_run: Path) -> None:
    """`--methods all` fine-tunes every baseline from the cached pretrained model and tables them; LVLM-VA gets
    oracle critic masks for the low-entropy half of its few-shot images."""
    from cft_lightning.data.mask_store import MaskStore
    from cft_lightning.demo.pipeline import ALL_METHODS

    out = demo_run / "all"
    main(["demo", "--out", str(out), "--data_dir", str(demo_run / "data"), "--methods", "all", "--overlays", "0",
          *TINY])
    start = json.loads((out / "seed_0" / "start.json").read_text())
    assert all(stage["cached"] for stage in start["stages"]), "the starting model was reused"
    table = (out / "summary.md").read_text().split("\n\n")[0]  # the decisions table
    rows = [line.split("|")[1].strip() for line in table.splitlines()[2:]]
    assert rows == ["original", *ALL_METHODS]
    for method in ALL_METHODS:
        results = json.loads((out / "seed_0" / method / "results.json").read_text())
        assert results["splits"]["test_ood"]["num_images"] == 18
    store = MaskStore(out / "seed_0" / "lvlm_va_masks")
    selection = json.loads((out / "seed_0" / "lvlm_va" / "fine_tuning_classes.json").read_text())["train_images"]
    critic = [rel for rel in selection if store.has(rel, "critic")]
    assert len(critic) == len(selection) // 2
    for rel in critic:  # the corrective mask is the background: the complement of the object mask
        assert (store.read(rel, "critic") == ~store.read(rel, "object")).all()


def test_counterfactual_pool_links_only_off_background_training_images(tmp_path: Path) -> None:
    import csv

    from cft_lightning.benchmarks import ShortcutPartsSpec, build_shortcut_parts
    from cft_lightning.demo.pipeline import fewshot_root

    spec = ShortcutPartsSpec(num_classes=3, image_size=32, train_per_class=12, val_per_class=1, test_per_class=3,
                             spurious_rate=0.5)
    data = build_shortcut_parts(tmp_path / "data", spec, progress=False)
    pool = fewshot_root(DemoSettings(benchmark=spec, fewshot_pool="counterfactual"), data, tmp_path / "run")
    linked = sorted(p.relative_to(pool).as_posix() for p in pool.rglob("*.png"))
    with open(data / "metadata.csv") as fh:
        rows = {r["image"]: r for r in csv.DictReader(fh) if r["split"] == "train"}
    off = sorted(k for k, r in rows.items() if r["background"] != {"alpha": "grass", "beta": "water",
                                                                     "gamma": "sand"}[r["label"]])
    assert 0 < len(off) < len(rows)
    assert linked == off
    assert fewshot_root(DemoSettings(benchmark=spec), data, tmp_path / "x").name == "train"
    with pytest.raises(ValueError, match="fewshot_pool"):
        fewshot_root(DemoSettings(benchmark=spec, fewshot_pool="nope"), data, tmp_path / "y")


def test_mask_stage_pipeline_reproduces_the_benchmark_masks_run(demo_run: Path) -> None:
    """`--mask_source pipeline`: the concept bank validated and grounded by the mask stage (oracle grounder).
    The oracle returns the ground truth, so CFT's results equal those of the run on the benchmark's masks."""
    out = demo_run / "pipeline"
    main(["demo", "--out", str(out), "--data_dir", str(demo_run / "data"), "--methods", "cft", "--overlays", "0",
          "--mask_source", "pipeline", *TINY])
    validated = json.loads((out / "mask_stage" / "validated_concepts.json").read_text())
    bank = json.loads((demo_run / "data" / "concepts.json").read_text())
    assert validated["concepts"] == bank  # every true part passes occurrence and coverage
    ours = json.loads((out / "seed_0" / "cft" / "results.json").read_text())["splits"]
    theirs = json.loads((demo_run / "run" / "seed_0" / "cft" / "results.json").read_text())["splits"]
    assert ours == theirs


def test_decoy_demo_runs_the_critique_stage_and_reports_mu_align(tmp_path: Path,
                                                                 capsys: pytest.CaptureFixture) -> None:
    """`--decoy_only --critic pipeline`: LVLM-VA's masks come from the critique stage (sampling, attribution,
    PPEPS-WGM, oracle critic on the decoy masks), and every row gets the OOD mean group accuracy and mu_align;
    `rrr_decoy_gt` trains on the decoy masks its regularizer declares."""
    from cft_lightning.data.mask_store import MaskStore

    out = tmp_path / "run"
    main(["demo", "--out", str(out), "--data_dir", str(tmp_path / "data"), "--methods", "plain", "lvlm_va",
          "rrr_decoy_gt", "--decoy_only", "--critic", "pipeline", "--overlays", "0", *TINY])
    critique = json.loads((out / "seed_0" / "lvlm_va_critique" / "critique" / "summary.json").read_text())
    selection = json.loads((out / "seed_0" / "lvlm_va" / "fine_tuning_classes.json").read_text())["train_images"]
    assert critique["critic"] == "oracle" and critique["alignment_set"] == len(selection) // 2
    store = MaskStore(out / "seed_0" / "lvlm_va_critique")
    assert sum(store.has(rel, "critic") for rel in selection) == critique["masks_written"] == len(selection) // 2
    for method in ("plain", "lvlm_va", "rrr_decoy_gt"):
        metrics = json.loads((out / "seed_0" / method / "results.json").read_text())["splits"]["test_ood"]["metrics"]
        assert 0.0 <= metrics["mu_align"]["original"] <= 1.0 and 0.0 <= metrics["mu_align"]["fine_tuned"] <= 1.0
        assert "worst_group_acc" in metrics and "mean_group_acc" in metrics
    header = (out / "summary.md").read_text().splitlines()[0]
    assert "OOD mu_align" in header and "OOD mean group acc" in header
    err = capsys.readouterr().err  # stderr is not a terminal here: one line per stage instead of bars
    for line in ("cft demo: seed 0: training the parts model", "cft demo: seed 0: training the shortcut model",
                 "cft demo: seed 0: fine-tuning lvlm_va (6 images, 1 epochs)", "cft demo: seed 0: testing plain"):
        assert line in err, err[-2000:]


def test_critique_pipeline_needs_a_decoy_benchmark(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit):
        main(["demo", "--out", str(tmp_path / "run"), "--data_dir", str(tmp_path / "data"), "--methods", "lvlm_va",
              "--critic", "pipeline", "--overlays", "0", *TINY])
    assert "needs a decoy benchmark" in capsys.readouterr().err


def test_report_rewrites_the_summary_from_results_on_disk(demo_run: Path, capsys: pytest.CaptureFixture) -> None:
    """`--report` trains nothing and gives the same tables; a method never run is a one-line error naming
    its missing results file."""
    run = demo_run / "run"
    before = (run / "summary.md").read_text()
    (run / "summary.md").unlink()
    capsys.readouterr()
    main(["demo", "--out", str(run), "--data_dir", str(demo_run / "data"), "--methods", "plain", "cft", "--report",
          "--overlays", "0", *TINY])
    assert (run / "summary.md").read_text() == before
    files = [line for line in capsys.readouterr().out.splitlines() if line.startswith("files:")]
    assert files and "summary.md" in files[0] and "metrics.png" in files[0]
    assert "overlays.png" not in files[0]  # --overlays 0 draws none, so the line does not name one
    with pytest.raises(SystemExit) as info:
        main(["demo", "--out", str(run), "--methods", "plain", "rrr", "--report", *TINY])
    assert info.value.code != 0
    assert "seed_0/rrr/results.json does not exist" in capsys.readouterr().err


def test_the_demo_trains_on_one_thread_and_another_count_is_another_cached_model(demo_run: Path) -> None:
    """Thread count changes the float sums and so the trained model: the demo trains on 1 thread (the documented
    models come out again), restores the caller's count, and caches another count's models under another recipe."""
    import torch

    from cft_lightning.benchmarks import ShortcutPartsSpec
    from cft_lightning.demo.start import torch_threads

    before = torch.get_num_threads()
    with torch_threads(1):
        assert torch.get_num_threads() == 1
    assert torch.get_num_threads() == before
    with pytest.raises(ValueError, match="--threads"):
        with torch_threads(0):
            pass
    first = json.loads((demo_run / "run" / "seed_0" / "start.json").read_text())
    assert all("threads" not in s["recipe"] for s in first["stages"])  # 1 thread: the recipes of docs/demo.md
    spec = ShortcutPartsSpec(num_classes=3, image_size=32, train_per_class=12, test_per_class=6)
    two = build_start(DemoSettings(benchmark=spec, pretrain_epochs=1, shortcut_epochs=1, threads=2, progress=False),
                      demo_run / "data", 0, demo_run / "two")
    assert [s["cached"] for s in two["stages"]] == [False, False]
    assert all(s["recipe"]["threads"] == 2 for s in two["stages"]) and two.weights != Path(first["weights"])
