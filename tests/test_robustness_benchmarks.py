"""The robustness benchmarks read as distributed (fake trees with the real quirks) and scored by their
protocols; expected labels and hits are computed independently here."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from cft_lightning.benchmarks.robustness import get_benchmark, target_rank
from cft_lightning.data.image_folder import imagenet_classes
from cft_lightning.errors import DataError

WNIDS = imagenet_classes()


def touch(path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"")


def tree(root: Path, folders: dict[str, int], ext: str = ".JPEG") -> Path:
    for folder, n in folders.items():
        for i in range(n):
            touch(root / folder / f"img {i}{ext}")
    return root


def timm_list(name: str) -> list[str]:
    import pkgutil

    return pkgutil.get_data("timm.data", f"_info/{name}").decode().split()


def test_imagenet_val_and_sketch_labels_are_sorted_wnid_indices(tmp_path: Path):
    root = tree(tmp_path / "val", {WNIDS[5]: 2, WNIDS[999]: 1})
    for name in ("in_val", "in_sketch"):
        bench, samples = get_benchmark(name, root)
        assert sorted((s.path, s.label) for s in samples) == [
            (f"{WNIDS[5]}/img 0.JPEG", 5), (f"{WNIDS[5]}/img 1.JPEG", 5), (f"{WNIDS[999]}/img 0.JPEG", 999)]
        assert bench.columns is None and bench.groups is None


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda r: touch(r / "README.txt"), "unexpected file"),
        (lambda r: (r / WNIDS[3]).mkdir(), "holds no image"),
        (lambda r: tree(r, {"not_a_wnid": 1}), "not a known class"),
    ],
)
def test_wrong_layouts_name_the_path(tmp_path: Path, make, message: str):
    root = tree(tmp_path / "val", {WNIDS[0]: 1})
    make(root)
    with pytest.raises(DataError, match=message) as info:
        get_benchmark("in_val", root)
    assert str(root) in str(info.value)


def test_v2_folders_are_class_indices_in_numeric_order(tmp_path: Path):
    root = tree(tmp_path / "v2", {"0": 1, "2": 1, "10": 1, "100": 1}, ext=".jpeg")
    _, samples = get_benchmark("in_v2", root)
    assert {s.path.split("/")[0]: s.label for s in samples} == {"0": 0, "2": 2, "10": 10, "100": 100}
    tree(root, {"n01440764": 1})
    with pytest.raises(DataError, match="class index folder"):
        get_benchmark("in_v2", root)


@pytest.mark.parametrize("name, prefix", [("in_a", "imagenet_a"), ("in_r", "imagenet_r")])
def test_subset_benchmarks_score_over_their_200_classes(tmp_path: Path, name: str, prefix: str):
    wnids, indices = timm_list(f"{prefix}_synsets.txt"), [int(i) for i in timm_list(f"{prefix}_indices.txt")]
    assert len(wnids) == len(indices) == 200 and all(WNIDS[i] == w for w, i in zip(wnids, indices))
    root = tree(tmp_path / name, {wnids[0]: 1, wnids[7]: 2}, ext=".jpg")
    touch(root / "README.txt")  # shipped with the dataset: allowed
    bench, samples = get_benchmark(name, root)
    assert sorted(s.label for s in samples) == [0, 7, 7]
    logits = torch.randn(3, 1000, generator=torch.Generator().manual_seed(0))
    labels = torch.tensor([0, 7, 7])
    sub = logits[:, indices]
    want = torch.tensor([int((sub[b] > sub[b, labels[b]]).sum()) for b in range(3)])
    assert torch.equal(bench.rank(logits, labels), want)
    # the release's protocol: 1000-way labels, no restriction
    release, samples_r = get_benchmark(name, root, "release")
    assert sorted(s.label for s in samples_r) == sorted([indices[0], indices[7], indices[7]])
    assert "release" in release.title and release.columns is None
    tree(root, {WNIDS[0] if WNIDS[0] not in wnids else WNIDS[1]: 1})
    with pytest.raises(DataError, match="not a known class"):
        get_benchmark(name, root)


def objectnet_tree(root: Path) -> Path:
    maps = root / "mappings"
    maps.mkdir(parents=True)
    (maps / "folder_to_objectnet_label.json").write_text(json.dumps(
        {"alarm_clock": "Alarm clock", "banana": "Banana", "cat_toy": "Cat toy"}))
    (maps / "objectnet_to_imagenet_1k.json").write_text(json.dumps(
        {"Alarm clock": "analog clock; digital clock", "Banana": "banana"}))
    (maps / "imagenet_to_label_2012_v2").write_text("banana\nanalog clock\ndigital clock\n")
    (maps / "pytorch_to_imagenet_2012_id.json").write_text(json.dumps({"954": 0, "409": 1, "530": 2}))
    tree(root / "images", {"alarm_clock": 2, "banana": 1, "cat_toy": 3}, ext=".png")
    touch(root / "README")
    return root


def test_objectnet_groups_official_scoring_and_release_protocol(tmp_path: Path):
    root = objectnet_tree(tmp_path / "objectnet-1.0")
    bench, samples = get_benchmark("objectnet", root)
    assert bench.border == 2 and bench.class_names == ["Alarm clock", "Banana"]
    assert sorted((s.path.split("/")[1], s.label) for s in samples) == [
        ("alarm_clock", 0), ("alarm_clock", 0), ("banana", 1)]  # cat_toy is not an ImageNet class: left out
    logits = torch.zeros(4, 1000)
    logits[0, 530] = 5  # digital clock for an alarm clock: a hit (any class of the group)
    logits[1, 954] = 5  # banana for an alarm clock: a miss ...
    logits[1, 409] = 4  # ... but the group's analog clock is second: a top-5 hit
    logits[2, 954] = 5  # banana: a hit
    logits[3, 1:7] = torch.arange(6.0) + 1  # six other classes beat the banana group: outside the top 5
    labels = torch.tensor([0, 0, 1, 1])
    ranks = bench.rank(logits, labels)
    assert (ranks < 1).tolist() == [True, False, True, False]
    assert (ranks < 5).tolist() == [True, True, True, False]
    release, samples_r = get_benchmark("objectnet", root, "release")
    assert release.border == 0 and sorted(s.label for s in samples_r) == [409, 409, 954]
    assert release.rank(logits[:1], torch.tensor([409])).item() == 1  # the digital clock no longer counts


def test_objectnet_missing_mapping_file_is_named(tmp_path: Path):
    root = objectnet_tree(tmp_path / "objectnet-1.0")
    (root / "mappings" / "pytorch_to_imagenet_2012_id.json").unlink()
    with pytest.raises(DataError, match="pytorch_to_imagenet_2012_id.json is missing"):
        get_benchmark("objectnet", root)


def test_si_score_labels_and_csvs(tmp_path: Path):
    root = tree(tmp_path / "location20_area02_min0pc", {"koala": 1, "bagel": 2}, ext=".jpg")
    touch(root / "metadata.csv")
    touch(root / "foreground_classes.csv")
    bench, samples = get_benchmark("si_score_location", root)
    assert sorted(s.label for s in samples) == [105, 931, 931]
    assert bench.name == "si_score_location"
    tree(root, {"unicorn": 1})
    with pytest.raises(DataError, match="SI-Score class"):
        get_benchmark("si_score_location", root)


def test_target_rank_plain_matches_topk():
    logits = torch.randn(50, 1000, generator=torch.Generator().manual_seed(1))
    labels = torch.randint(0, 1000, (50,), generator=torch.Generator().manual_seed(2))
    ranks = target_rank(logits, labels)
    for k in (1, 5):
        want = (logits.topk(k, dim=1).indices == labels[:, None]).any(dim=1)
        assert torch.equal(ranks < k, want)


def test_unknown_benchmark_and_protocol(tmp_path: Path):
    with pytest.raises(DataError, match="unknown benchmark"):
        get_benchmark("imagenet_c", tmp_path)
    with pytest.raises(DataError, match="unknown protocol"):
        get_benchmark("in_val", tmp_path, "paper")


def test_files_that_are_not_images_are_named_in_one_warning(tmp_path: Path):
    """Stray files inside class folders (a tar's notes, a partial download) are skipped, and said so once with
    the count and the first names; hidden files are skipped quietly."""
    root = tree(tmp_path / "val", {WNIDS[1]: 2, WNIDS[2]: 1})
    touch(root / WNIDS[1] / "notes.txt")
    touch(root / WNIDS[2] / "img 9.JPEG.part")
    touch(root / WNIDS[2] / ".DS_Store")
    with pytest.warns(UserWarning, match=r"skipped 2 file\(s\) in .*val.*not images") as record:
        _, samples = get_benchmark("in_val", root)
    assert len(samples) == 3
    message = str(record[0].message)
    assert f"{WNIDS[1]}/notes.txt" in message and "img 9.JPEG.part" in message and "DS_Store" not in message
    objectnet = objectnet_tree(tmp_path / "objectnet-1.0")
    touch(objectnet / "images" / "banana" / "Thumbs.db")
    with pytest.warns(UserWarning, match=r"skipped 1 file\(s\).*banana/Thumbs.db"):
        get_benchmark("objectnet", objectnet)
