"""MaskStore: layout, round trip, atomic writes, validation and manifest."""

from __future__ import annotations

import json
import os
import stat

import numpy as np
import pytest
from PIL import Image

from cft_lightning._io import atomic_write
from cft_lightning.data import DataError, MaskStore, concept_slug


@pytest.fixture
def mask() -> np.ndarray:
    m = np.zeros((20, 30), dtype=bool)
    m[5:12, 3:25] = True
    return m


def _visible_and_temp_files(root):
    return sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file())


def test_layout_and_round_trip(tmp_path, mask):
    store = MaskStore(tmp_path / "store")
    path = store.write("n01440764/img_1.JPEG", "concept", mask)
    assert path == tmp_path / "store" / "concept" / "n01440764" / "img_1.png"
    assert store.has("n01440764/img_1.JPEG", "concept")
    assert not store.has("n01440764/img_1.JPEG", "object")
    with Image.open(path) as img:
        assert img.mode == "L" and img.size == (30, 20)
        assert set(np.unique(np.asarray(img)).tolist()) == {0, 255}
    back = store.read("n01440764/img_1.JPEG", "concept")
    assert back.dtype == bool and back.shape == (20, 30)
    np.testing.assert_array_equal(back, mask)
    assert store.kinds() == ["concept"]


def test_masks_are_written_with_the_run_length_strategy(tmp_path, monkeypatch):
    """The PNG is deflated with zlib's run-length strategy (faster than PIL's default on binary masks, and smaller
    on compact ones) and stays an ordinary 8-bit PNG that PIL reads back exactly."""
    import zlib

    seen = []
    save = Image.Image.save

    def recording(self, fp, format=None, **params):
        seen.append(params)
        return save(self, fp, format, **params)

    monkeypatch.setattr(Image.Image, "save", recording)
    yy, xx = np.mgrid[:240, :320]
    blob = ((yy - 120) / 70) ** 2 + ((xx - 150) / 100) ** 2 < 1
    path = MaskStore(tmp_path).write("a/b.jpg", "object", blob)
    assert seen == [{"compress_type": zlib.Z_RLE}]
    with Image.open(path) as img:
        assert img.mode == "L" and np.array_equal(np.asarray(img) > 0, blob)


@pytest.mark.parametrize(
    "convert",
    [
        lambda m: m.astype(np.float32),  # 0/1 float
        lambda m: m.astype(np.uint8),  # 0/1 uint8
        lambda m: m.astype(np.uint8) * 255,  # 0/255 uint8
        lambda m: np.where(m, 0.9, 0.1),  # soft float, thresholded at 0.5
    ],
)
def test_write_accepts_common_dtypes(tmp_path, mask, convert):
    store = MaskStore(tmp_path)
    store.write("a/b.jpg", "object", convert(mask))
    np.testing.assert_array_equal(store.read("a/b.jpg", "object"), mask)


def test_per_concept_masks_use_slugs(tmp_path, mask):
    store = MaskStore(tmp_path)
    path = store.write("cls/x.png", "concept", mask, concept="Long Beak!")
    assert path == tmp_path / "concepts" / "long_beak" / "cls" / "x.png"
    assert store.has("cls/x.png", "concept", concept="long beak")
    np.testing.assert_array_equal(store.read("cls/x.png", "concept", concept="LONG-beak"), mask)
    assert store.concepts() == ["long_beak"]
    assert store.kinds() == []  # the per-concept directory is not a kind
    assert concept_slug("  bird's  eye ") == "bird_s_eye"
    with pytest.raises(DataError, match="kind 'concept'"):
        store.path("cls/x.png", "object", concept="long beak")


@pytest.mark.parametrize(
    "bad", [np.zeros((2, 3, 4)), np.full((4, 4), np.nan), np.full((4, 4), 2.0), np.full((4, 4), 7)]
)
def test_write_rejects_non_binary_or_non_2d(tmp_path, bad):
    with pytest.raises(DataError, match="img.png"):
        MaskStore(tmp_path).write("c/img.png", "concept", bad)
    assert _visible_and_temp_files(tmp_path) == []


@pytest.mark.parametrize("rel", ["../escape.png", "/abs/path.png", ""])
def test_bad_keys_are_rejected(tmp_path, rel):
    with pytest.raises(DataError):
        MaskStore(tmp_path).path(rel, "concept")


def test_atomic_write_leaves_no_temp_file(tmp_path, mask):
    store = MaskStore(tmp_path)
    store.write("c/img.png", "concept", mask)
    store.write("c/img.png", "concept", ~mask)  # overwrite in place
    assert _visible_and_temp_files(tmp_path) == ["concept/c/img.png"]
    np.testing.assert_array_equal(store.read("c/img.png", "concept"), ~mask)


@pytest.mark.parametrize("umask", [0o022, 0o077, 0o002], ids=oct)
def test_atomic_write_gives_files_the_umask_mode_of_any_other_output(tmp_path, umask):
    # mkstemp creates 0600 files: results, manifests and masks must be as readable as a plain open(..., "w") file
    old = os.umask(umask)
    try:
        atomic_write(tmp_path / "results.json", lambda fh: fh.write(b"{}"))
        (tmp_path / "plain.txt").write_text("x")
    finally:
        os.umask(old)
    mode = stat.S_IMODE((tmp_path / "results.json").stat().st_mode)
    assert mode == 0o666 & ~umask == stat.S_IMODE((tmp_path / "plain.txt").stat().st_mode), oct(mode)


def test_interrupted_write_keeps_old_file_and_no_temp(tmp_path, mask):
    store = MaskStore(tmp_path)
    target = store.write("c/img.png", "concept", mask)
    before = target.read_bytes()

    def dies_half_way(handle):
        handle.write(b"\x89PNG half")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        atomic_write(target, dies_half_way)
    assert target.read_bytes() == before
    assert _visible_and_temp_files(tmp_path) == ["concept/c/img.png"]


def test_corrupt_and_wrong_mode_masks_raise_with_file_name(tmp_path):
    store = MaskStore(tmp_path)
    corrupt = store.path("c/broken.png", "concept")
    corrupt.parent.mkdir(parents=True)
    corrupt.write_bytes(b"not a png at all")
    with pytest.raises(DataError, match="broken.png"):
        store.read("c/broken.png", "concept")
    rgb = store.path("c/rgb.png", "concept")
    Image.new("RGB", (8, 8)).save(rgb)
    with pytest.raises(DataError, match=r"rgb\.png.*2-D"):
        store.read("c/rgb.png", "concept")
    with pytest.raises(DataError, match="missing.png"):
        store.read("c/missing.jpg", "concept")


def test_manifest_defaults_update_and_bank_hash(tmp_path):
    store = MaskStore(tmp_path / "store")
    manifest = store.read_manifest()
    assert manifest["format_version"] == 1 and manifest["kinds"] == [] and manifest["concept_bank"] is None
    bank = tmp_path / "bank.json"
    bank.write_text(json.dumps({"bird": ["beak", "wings"]}))
    store.update_manifest(kinds=["concept"], concept_bank=bank, models={"detector": "gdino"}, extra={"a": 1})
    store.update_manifest(kinds=["object"], models={"segmenter": "sam"}, thresholds={"box": 0.35})
    on_disk = json.loads((tmp_path / "store" / "manifest.json").read_text())
    assert on_disk["kinds"] == ["concept", "object"]
    assert on_disk["models"] == {"detector": "gdino", "segmenter": "sam"}
    assert on_disk["thresholds"] == {"box": 0.35} and on_disk["extra"] == {"a": 1}
    assert on_disk["concept_bank"]["path"] == str(bank.resolve())
    assert len(on_disk["concept_bank"]["sha256"]) == 64
    assert store.read_manifest() == on_disk
    assert _visible_and_temp_files(tmp_path / "store") == ["manifest.json"]
    with pytest.raises(DataError, match="unknown manifest field"):
        store.update_manifest(colour="red")


def test_reads_zero_one_masks_from_other_tools(tmp_path, mask):
    store = MaskStore(tmp_path)
    path = store.path("c/x.png", "object")
    path.parent.mkdir(parents=True)
    Image.fromarray(mask.astype(np.uint8), mode="L").save(path)  # 0/1 values, not 0/255
    np.testing.assert_array_equal(store.read("c/x.png", "object"), mask)


def test_corrupt_manifest_names_file(tmp_path):
    (tmp_path / "manifest.json").write_text("{not json")
    with pytest.raises(DataError, match="manifest.json"):
        MaskStore(tmp_path).read_manifest()
