"""`cft test` on robustness benchmarks: fake trees of real images, Original and fine-tuned in one pass, the
numbers checked against an independent evaluation loop; benchmark selection and skipping."""

from __future__ import annotations

import json
import pkgutil
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
from PIL import Image

from cft_lightning.benchmarks.robustness import get_benchmark
from cft_lightning.data.datamodule import GuidanceDataModule
from cft_lightning.data.image_folder import imagenet_classes, load_image
from cft_lightning.data.transforms import JointTransform
from cft_lightning.errors import DataError
from cft_lightning.models import BackboneSpec, GuidedFineTuner
from cft_lightning.regularizers import PlainFineTuning

WNIDS = imagenet_classes()
A_WNIDS = pkgutil.get_data("timm.data", "_info/imagenet_a_synsets.txt").decode().split()
A_INDEX = [int(i) for i in pkgutil.get_data("timm.data", "_info/imagenet_a_indices.txt").decode().split()]


def image(path: Path, seed: int, size: tuple[int, int] = (40, 36)) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(path)


@pytest.fixture(scope="module")
def trees(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("bench")
    train = root / "train"  # ImageNet-style training folder: 2 classes of A's, 1 image each
    for k, w in enumerate(A_WNIDS[:2]):
        image(train / w / "t.JPEG", 100 + k)
    in_a = root / "imagenet-a"
    for k, w in enumerate(A_WNIDS[:4]):
        for i in range(2):
            image(in_a / w / f"0.1_{w} _ x_{i}.jpg", 10 * k + i)
    (in_a / "README.txt").write_text("ImageNet-A\n")
    v2 = root / "imagenetv2"
    for c in ("0", "7", "100"):
        image(v2 / c / "abc.jpeg", int(c))
    return {"train": train, "in_a": in_a, "in_v2": v2}


def model() -> GuidedFineTuner:
    torch.manual_seed(0)
    spec = BackboneSpec("vit_tiny_patch16_224", pretrained=False, num_classes=1000,
                        model_kwargs={"img_size": 32, "patch_size": 8, "depth": 1})
    module = GuidedFineTuner(spec, PlainFineTuning(), None, lr=1e-3)
    with torch.no_grad():  # make the fine-tuned model differ from its reference
        module.backbone.head.bias.add_(torch.randn(1000, generator=torch.Generator().manual_seed(1)))
    return module


def independent_accuracy(net: torch.nn.Module, root: Path, name: str, data_config: dict) -> tuple[float, float]:
    bench, samples = get_benchmark(name, root)
    tf = JointTransform(data_config, train=False)
    x = torch.stack([tf(load_image(root / s.path), {})[0] for s in samples])
    with torch.no_grad():
        logits = net.eval()(x)
    y = torch.tensor([s.label for s in samples])
    if bench.columns is not None:
        logits = logits[:, bench.columns]
    top = logits.topk(5, dim=1).indices
    return float((top[:, 0] == y).float().mean()), float((top == y[:, None]).any(1).float().mean())


def test_test_runs_benchmarks_side_by_side(trees: dict[str, Path], tmp_path: Path):
    module = model()
    dm = GuidanceDataModule(str(trees["train"]), mask_kinds=[], classes="imagenet", images_per_class=1,
                            class_fraction=0.5, seed=0, batch_size=2, eval_batch_size=3,
                            benchmarks={"in_a": str(trees["in_a"]), "in_v2": str(trees["in_v2"])})
    trainer = L.Trainer(accelerator="cpu", default_root_dir=tmp_path, logger=False, enable_progress_bar=False,
                        enable_model_summary=False, inference_mode=True)
    trainer.test(module, dm, verbose=False)
    results = json.loads((tmp_path / "results.json").read_text())["splits"]
    assert list(results) == ["in_v2", "in_a"]  # registry order
    assert results["in_a"]["num_images"] == 8 and results["in_v2"]["num_images"] == 3
    for name in ("in_a", "in_v2"):
        for who, net in (("fine_tuned", module.backbone), ("original", module.reference)):
            acc1, acc5 = independent_accuracy(net, trees[name], name, module.data_config)
            assert results[name]["metrics"]["acc1"][who] == pytest.approx(acc1)
            assert results[name]["metrics"]["acc5"][who] == pytest.approx(acc5)
    # the fine-tuning class (1 of the 2 training classes) splits IN-A's accuracy into seen / held-out
    assert {"acc1_seen", "acc1_held_out"} <= set(results["in_a"]["metrics"])
    assert "acc1_seen" not in results["in_v2"]["metrics"]  # none of V2's 3 classes is a training class


def test_benchmark_selection_environment_and_skips(trees: dict[str, Path], monkeypatch: pytest.MonkeyPatch,
                                                   caplog: pytest.LogCaptureFixture):
    monkeypatch.setenv("CFT_BENCHMARK_IN_V2", str(trees["in_v2"]))
    dm = GuidanceDataModule(str(trees["train"]), mask_kinds=[], classes="imagenet", batch_size=2,
                            data_config={"input_size": (3, 32, 32), "mean": (0.5,) * 3, "std": (0.5,) * 3,
                                         "interpolation": "bilinear", "crop_pct": 1.0})
    assert dm.benchmark_roots() == {"in_v2": str(trees["in_v2"])}
    dm.setup("test")
    plan = dm.test_plan()
    assert dm.test_split_names == plan.split_names == ["in_v2"] and plan.splits[0].scorer is not None
    assert plan.splits[0].is_benchmark and plan.splits[0].imagenet_logits and len(plan.class_names) == 1000
    named = GuidanceDataModule(str(trees["train"]), mask_kinds=[], classes="imagenet", benchmark_names="all",
                               data_config=dm.data_config)
    with caplog.at_level("INFO"):
        named.setup("test")
    assert "skipped" in caplog.text and "in_a" in caplog.text and named.test_split_names == ["in_v2"]
    for names, message in (("in_a", "no root for"), ("in_v2,imagenet_c", "unknown benchmark")):
        bad = GuidanceDataModule(str(trees["train"]), mask_kinds=[], classes="imagenet", benchmark_names=names,
                                 data_config=dm.data_config)
        with pytest.raises(DataError, match=message):
            bad.setup("test")
    with pytest.raises(DataError, match="unknown benchmark"):
        GuidanceDataModule(str(trees["train"]), mask_kinds=[], benchmarks={"imagenet_c": "x"})
    monkeypatch.delenv("CFT_BENCHMARK_IN_V2")
    empty = GuidanceDataModule(str(trees["train"]), mask_kinds=[], classes="imagenet", data_config=dm.data_config)
    with pytest.raises(DataError, match="nothing to test"):
        empty.setup("test")


def test_objectnet_border_is_cropped_before_the_transform(tmp_path: Path):
    from cft_lightning.benchmarks.robustness import BenchmarkDataset

    root = tmp_path / "objectnet-1.0"
    maps = root / "mappings"
    maps.mkdir(parents=True)
    (maps / "folder_to_objectnet_label.json").write_text(json.dumps({"banana": "Banana"}))
    (maps / "objectnet_to_imagenet_1k.json").write_text(json.dumps({"Banana": "banana"}))
    (maps / "imagenet_to_label_2012_v2").write_text("banana\n")
    (maps / "pytorch_to_imagenet_2012_id.json").write_text(json.dumps({"954": 0}))
    pixels = np.zeros((12, 12, 3), dtype=np.uint8)
    pixels[:2], pixels[-2:], pixels[:, :2], pixels[:, -2:] = 255, 255, 255, 255  # a 2-pixel frame
    (root / "images" / "banana").mkdir(parents=True)
    Image.fromarray(pixels).save(root / "images" / "banana" / "a.png")
    bench, samples = get_benchmark("objectnet", root)
    config = {"input_size": (3, 8, 8), "mean": (0.0,) * 3, "std": (1.0,) * 3, "interpolation": "bilinear",
              "crop_pct": 1.0}
    item = BenchmarkDataset(root, bench, samples, JointTransform(config, train=False), {954})[0]
    assert item["image"].max() == 0.0  # the frame is gone: only the black inside is left
    assert item["class_split"] == 1 and item["label"] == 0


def write_gtsegs(path: Path, sizes: list[tuple[int, int]]) -> list[tuple[np.ndarray, np.ndarray]]:
    """A small file in gtsegs_ijcv.mat's HDF5 layout (MATLAB column-major arrays, cell references)."""
    import h5py

    rng = np.random.default_rng(0)
    items = []
    with h5py.File(path, "w") as f:
        refs = f.create_group("#refs#")
        img_refs = np.empty((len(sizes), 1), dtype=h5py.ref_dtype)
        gt_refs = np.empty((len(sizes), 1), dtype=h5py.ref_dtype)
        for i, (h, w) in enumerate(sizes):
            img = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
            mask = np.zeros((h, w), dtype=np.uint8)
            mask[h // 4 : 3 * h // 4, w // 3 :] = 1
            items.append((img, mask))
            img_refs[i, 0] = refs.create_dataset(f"img{i}", data=img.transpose(2, 1, 0)).ref
            m = refs.create_dataset(f"mask{i}", data=mask.transpose(1, 0))
            cell = refs.create_dataset(f"cell{i}", data=np.array([[m.ref]], dtype=h5py.ref_dtype))
            gt_refs[i, 0] = cell.ref
        value = f.create_group("value")
        value.create_dataset("img", data=img_refs)
        value.create_dataset("gt", data=gt_refs)
    return items


def test_imagenet_segmentation_reads_the_mat_layout_and_scores_alignment(tmp_path: Path, trees: dict[str, Path]):
    import torch.nn.functional as F

    from cft_lightning.benchmarks.imagenet_seg import ImageNetSegmentation
    from cft_lightning.relevance import AttnLRP

    mat = tmp_path / "gtsegs_ijcv.mat"
    items = write_gtsegs(mat, [(40, 30), (24, 48), (32, 32)])
    module = model()
    module.relevance = AttnLRP()
    config = module.data_config
    ds = ImageNetSegmentation(mat, config)
    assert len(ds) == 3
    item = ds[1]
    want_mask = np.asarray(Image.fromarray(items[1][1] * 255).resize((32, 32), Image.NEAREST)) > 0
    assert item["image"].shape == (3, 32, 32) and torch.equal(item["masks"]["object"], torch.from_numpy(want_mask))
    assert item["label"] == -1

    dm = GuidanceDataModule(str(trees["train"]), mask_kinds=[], classes="imagenet", eval_batch_size=2,
                            benchmarks={"imagenet_seg": str(mat)}, benchmark_names="imagenet_seg")
    trainer = L.Trainer(accelerator="cpu", default_root_dir=tmp_path, logger=False, enable_progress_bar=False,
                        enable_model_summary=False, inference_mode=False)
    trainer.test(module, dm, verbose=False)
    metrics = json.loads((tmp_path / "results.json").read_text())["splits"]["imagenet_seg"]["metrics"]
    assert "acc1" not in metrics and {"pixel_acc", "miou", "map"} <= set(metrics)
    # pixel accuracy by hand: predicted-class AttnLRP map, bilinear to the mask, min-max, above its mean
    x = torch.stack([ds[i]["image"] for i in range(3)])
    gt = torch.stack([ds[i]["masks"]["object"] for i in range(3)])
    maps = AttnLRP()(module.backbone.eval(), x, None, differentiable=False).maps
    up = F.interpolate(maps[:, None], size=(32, 32), mode="bilinear", align_corners=False)[:, 0]
    lo, hi = up.flatten(1).amin(1)[:, None, None], up.flatten(1).amax(1)[:, None, None]
    up = (up - lo) / (hi - lo)
    pred = up > up.flatten(1).mean(1)[:, None, None]
    assert metrics["pixel_acc"]["fine_tuned"] == pytest.approx(float((pred == gt).float().mean()), abs=1e-6)


def _ddp_test(module: GuidedFineTuner, dm: GuidanceDataModule, root: str, devices: int) -> dict:
    trainer = L.Trainer(accelerator="cpu", devices=devices, strategy="ddp_spawn" if devices > 1 else "auto",
                        default_root_dir=root, logger=False, enable_progress_bar=False, enable_model_summary=False,
                        inference_mode=True)
    trainer.test(module, dm, verbose=False)
    return json.loads((Path(root) / "results.json").read_text())["splits"]


@pytest.mark.slow
def test_two_process_ddp_counts_every_image_once(trees: dict[str, Path], tmp_path: Path):
    """8 IN-A images + 3 V2 images with eval batch 3 on 2 ranks: Lightning's default sampler would pad the
    odd shard with a repeated image; here the counts and accuracies equal the single-process run."""
    def dm() -> GuidanceDataModule:
        return GuidanceDataModule(str(trees["train"]), mask_kinds=[], classes="imagenet", images_per_class=1,
                                  class_fraction=0.5, eval_batch_size=3,
                                  benchmarks={"in_a": str(trees["in_a"]), "in_v2": str(trees["in_v2"])})

    single = _ddp_test(model(), dm(), str(tmp_path / "one"), 1)
    double = _ddp_test(model(), dm(), str(tmp_path / "two"), 2)
    for split in ("in_a", "in_v2"):
        assert double[split]["num_images"] == single[split]["num_images"]
        for metric in ("acc1", "acc5"):
            assert double[split]["metrics"][metric] == pytest.approx(single[split]["metrics"][metric])
