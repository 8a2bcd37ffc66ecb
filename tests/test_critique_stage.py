"""The critique stage end to end on the decoy-only embedded benchmark: `cft critique` with the oracle critic
and with the LVLM stub, DeepLIFT-SHAP on a CNN, the inverse view geometry, resume, two processes, and
`cft fit`-style training with LVLMCritic on the masks it wrote."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from _vision_stub import SECRET

from cft_lightning.benchmarks import ShortcutPartsSpec, build_shortcut_parts
from cft_lightning.cli import main
from cft_lightning.critique.views import to_original
from cft_lightning.data.mask_store import MaskStore
from cft_lightning.data.transforms import JointTransform, parse_data_config

SPEC = ShortcutPartsSpec(num_classes=3, image_size=32, train_per_class=6, val_per_class=1, test_per_class=2,
                         decoy=True, background_shortcut=False)


@pytest.fixture(scope="module")
def decoy_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_shortcut_parts(tmp_path_factory.mktemp("decoy") / "sp", SPEC, progress=False)


@pytest.fixture(scope="module")
def cnn_weights(tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("w") / "cnn.pth"
    torch.save(timm.create_model("test_resnet", num_classes=3).state_dict(), path)
    return path


def critique_args(data: Path, weights: Path, out: Path, *extra: str) -> list[str]:
    return ["critique", "--model", "test_resnet", "--weights", str(weights), "--num_classes", "3",
            "--data", str(data / "images" / "train"), "--out", str(out), "--samples", "5", "--segments", "3",
            "--shap_baselines", "4", "--batch_size", "4", "--no_progress", *extra]


def test_decoy_variant_metadata(decoy_data: Path):
    import csv

    rows = list(csv.DictReader(open(decoy_data / "metadata.csv")))
    ood = [r for r in rows if r["split"] == "test_ood"]
    assert all("|decoy " in r["group"] for r in rows)
    # test_ood: each class with each decoy colour (balanced), background drawn at random
    assert sorted({int(r["group_id"]) for r in ood}) == [0, 1, 4, 5, 6, 8]  # decoy (i + label) % 3, i < 2
    train = [r for r in rows if r["split"] == "train"]
    assert len({r["background"] for r in train}) > 1
    assert MaskStore(decoy_data / "masks").has(train[0]["image"], "decoy")


def test_oracle_critique_writes_masks_reports_and_resumes(decoy_data: Path, cnn_weights: Path, tmp_path: Path,
                                                         capsys: pytest.CaptureFixture):
    out = tmp_path / "store"
    args = critique_args(decoy_data, cnn_weights, out, "--critic", "oracle", "--oracle_masks",
                         str(decoy_data / "masks"), "--oracle_kind", "decoy")
    main(args)
    assert "corrective masks" in capsys.readouterr().out
    summary = json.loads((out / "critique" / "summary.json").read_text())
    assert summary["alignment_set"] == 5 and summary["masks_written"] == 5 and summary["attribution"] == "deeplift_shap"
    entropy = [json.loads(line) for line in (out / "critique" / "entropy" / "rank_0.jsonl").read_text().splitlines()]
    assert len(entropy) == 18  # every training image scored once
    chosen = sorted(entropy, key=lambda r: (r["entropy"], r["image"]))[:5]
    records = [json.loads(line) for line in (out / "critique" / "records" / "rank_0.jsonl").read_text().splitlines()]
    assert sorted(r["image"] for r in records) == sorted(r["image"] for r in chosen)  # the 5 lowest entropies
    store = MaskStore(out)
    for r in records:
        mask = store.read(r["image"], "critic")
        assert mask.shape == (32, 32) and r["status"] == "ok" and len(r["spurious"]) == 3
        assert np.isclose(sum(r["shares"]), 1.0, atol=1e-3) and (out / "critique" / "views" / r["image"]).exists()
        assert mask.any() == any(r["spurious"])
    assert "critic" in store.kinds() and "## " in (out / "critique" / "report.md").read_text()
    # resume: a rerun scores nothing new and critiques nothing new
    main(args)
    assert len((out / "critique" / "records" / "rank_0.jsonl").read_text().splitlines()) == 5
    assert len((out / "critique" / "entropy" / "rank_0.jsonl").read_text().splitlines()) == 18


def test_lvlm_critique_through_the_stub_keeps_the_key_out(decoy_data: Path, cnn_weights: Path, tmp_path: Path,
                                                        monkeypatch: pytest.MonkeyPatch, vision_stub):
    stub, url = vision_stub
    monkeypatch.setenv("OPENAI_API_KEY", SECRET)
    (tmp_path / "d.yaml").write_text("'*': a creature's body with its two parts decides the class\n")
    out = tmp_path / "store"
    main(critique_args(decoy_data, cnn_weights, out, "--descriptions", str(tmp_path / "d.yaml"), "--llm",
                       "vision-model", "--base_url", url, "--price_in", "2.5", "--price_out", "10",
                       "--attribution", "ixg"))
    summary = json.loads((out / "critique" / "summary.json").read_text())
    assert summary["masks_written"] == 5 and summary["with_spurious_segment"] == 5  # the stub calls segment 3
    usage = summary["usage"]
    assert usage["critic"]["calls"] == 5  # one review per image; equal reviews share one cached verdict
    assert usage["judge"]["calls"] + usage["judge"]["cached"] == 5
    calls = usage["critic"]["calls"] + usage["judge"]["calls"]
    assert summary["cost_usd"] == pytest.approx((calls * 100 * 2.5 + calls * 20 * 10) / 1e6)
    assert "Segment 3: spurious" in (out / "critique" / "report.md").read_text()
    for path in out.rglob("*"):
        if path.is_file() and path.suffix in (".json", ".jsonl", ".md", ".yaml"):
            assert SECRET not in path.read_text()


def test_deeplift_shap_is_complete_on_a_cnn(cnn_weights: Path):
    from cft_lightning.critique.attribution import DeepLiftShapAttribution

    model = timm.create_model("test_resnet", num_classes=3)
    model.load_state_dict(torch.load(cnn_weights, weights_only=True))
    model.eval()
    # captum's MaxPool rule does not conserve the difference (measured: sum -0.040 vs gap -0.006 on this net);
    # without the max-pool, DeepLIFT's rescale rule is exact through ReLU, BN, avg-pool and the residual sums
    model.maxpool = torch.nn.Identity()
    torch.manual_seed(1)
    images, baselines = torch.randn(2, 3, 64, 64), torch.randn(4, 3, 64, 64)
    targets = torch.tensor([0, 2])
    attr = DeepLiftShapAttribution(baselines)(model, images, targets)
    with torch.no_grad():
        gap = model(images).gather(1, targets[:, None])[:, 0] - model(baselines)[:, targets].mean(0)
    assert attr.shape == (2, 64, 64)
    assert torch.allclose(attr.sum(dim=(1, 2)), gap, atol=1e-3 * gap.abs().max().item() + 1e-4)


def test_views_map_back_to_the_original_image():
    config = parse_data_config({"input_size": (3, 40, 40), "mean": (0.5,) * 3, "std": (0.5,) * 3, "crop_pct": 0.8})
    rng = np.random.default_rng(0)
    for height, width in ((60, 90), (90, 60), (40, 40)):
        view_map = rng.integers(0, 2, (40, 40))
        view_map = np.kron(view_map[::8, ::8], np.ones((8, 8), dtype=int))  # blocks: nearest is exact inside
        back = to_original(view_map, (height, width), config)
        assert back.shape == (height, width) and (back == -1).any()  # the crop cuts a border away
        again = JointTransform(config, train=False)(
            __import__("PIL.Image").Image.new("RGB", (width, height)), {"m": back == 1})[1]["m"].numpy()
        inner = np.add.outer(np.arange(40) % 8, np.zeros(40, dtype=int))
        inner = (inner >= 2) & (inner <= 5) & (inner.T >= 2) & (inner.T <= 5)  # >= 2 px from a block edge
        assert (again == view_map)[inner].all()  # the round trip (two nearest resamplings) moves edges only


def test_two_processes_critique_each_image_once(decoy_data: Path, cnn_weights: Path, tmp_path: Path):
    from cft_lightning.critique import CritiqueSettings, OracleCritic, run_critique
    from cft_lightning.critique.attribution import build_attributor
    from cft_lightning.critique.cli import _items
    from cft_lightning.critique.stage import read_jsonl

    model = timm.create_model("test_resnet", num_classes=3)
    model.load_state_dict(torch.load(cnn_weights, weights_only=True))
    classes = ["alpha", "beta", "gamma"]
    root = decoy_data / "images" / "train"
    out = tmp_path / "store"
    config = timm.data.resolve_data_config({}, model=model)
    settings = CritiqueSettings(samples=6, segments=2, batch_size=2, progress=False,
                                trainer=dict(devices=2, strategy="ddp_spawn"))
    run_critique(model, config, root, _items(root, classes), classes, build_attributor("ixg", model),
                 OracleCritic(), out, {"*": "x"}, settings, truth=(str(decoy_data / "masks"), "decoy"))
    entropy = read_jsonl(out / "critique" / "entropy")
    records = read_jsonl(out / "critique" / "records")
    assert sorted(r["image"] for r in entropy) == sorted(rel for rel, _ in _items(root, classes))
    assert len(records) == 6 and len({r["image"] for r in records}) == 6 and {r["rank"] for r in records} == {0, 1}
    assert json.loads((out / "critique" / "summary.json").read_text())["masks_written"] == 6



def test_corrective_mask_is_the_union_of_the_spurious_segments(decoy_data: Path, tmp_path: Path):
    """Two blobs of positive effect become two of three segments; the critic calls the one holding the second
    blob spurious: the written mask is exactly that segment, drawn back onto the image."""
    from cft_lightning.critique.critic import Verdicts
    from cft_lightning.critique.ppeps import ppeps_segments
    from cft_lightning.critique.stage import CritiqueGeneration, ImageItems

    config = parse_data_config({"input_size": (3, 32, 32), "mean": (0.5,) * 3, "std": (0.5,) * 3, "crop_pct": 1.0})
    attribution = -torch.ones(32, 32)
    attribution[2:10, 2:10], attribution[20:30, 18:30], attribution[14:18, 0:4] = 3.0, 1.0, 0.5

    def attributor(model, images, targets):
        return attribution.expand(len(images), 32, 32)

    class SecondBlob:
        name = "fake"

        def __call__(self, sample):
            flags = [bool(j == sample.segments[25, 25]) for j in range(len(sample.shares))]
            return Verdicts(flags, "blob 2 is spurious", "{}")

    rels = ["alpha/train_0000.png", "beta/train_0001.png"]
    dataset = ImageItems(decoy_data / "images" / "train", [(rels[0], 0), (rels[1], 1)], JointTransform(config, False))
    batch = torch.utils.data.default_collate([dataset[0], dataset[1]])
    stage = CritiqueGeneration(torch.nn.Sequential(torch.nn.Flatten(), torch.nn.LazyLinear(3)), attributor,
                               SecondBlob(), tmp_path, ["alpha", "beta", "gamma"], {"*": "x"}, segments=3,
                               data_config=config, write_views=False)
    stage.model(batch["image"])  # materialise the lazy layer
    stage.on_predict_start()
    records = stage.predict_step(batch, 0)
    segments, shares, _ = ppeps_segments(attribution.numpy(), 3)
    want = segments == segments[25, 25]
    assert 0 < want.sum() < want.size and not want[5, 5]
    for rel, record in zip(rels, records):
        assert record["status"] == "ok" and record["spurious"].count(True) == 1
        assert np.array_equal(MaskStore(tmp_path).read(rel, "critic"), want)  # crop_pct 1: the view is the image
    assert stage.predict_step(batch, 1) == []  # done: skipped
