"""`perf/mask_cost.py` (the throughput of `cft masks generate` and where its time goes) run end to end on tiny
models, so the script cannot rot: every time bucket is fed by the call it names, the buckets are disjoint
(none negative) and sum to the run's total, the warm-up image is not counted, FLOPs are counted for the three
model parts, every mask is written, and the command line writes the same figures as JSON."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from types import ModuleType

import pytest

pytest.importorskip("transformers")
pytest.importorskip("segment_anything")

REPO = Path(__file__).resolve().parents[1]


def mask_cost() -> ModuleType:
    spec = importlib.util.spec_from_file_location("mask_cost", REPO / "perf" / "mask_cost.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("backend", ["transformers", "segment-anything"])
def test_the_breakdown_is_disjoint_fed_and_sums_to_the_total(backend: str, tmp_path: Path,
                                                              monkeypatch: pytest.MonkeyPatch):
    from cft_lightning.data.mask_store import MaskStore

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    mc = mask_cost()
    result = mc.measure(tmp_path, "tiny", backend, images=3)
    seconds, calls = result["seconds"], result["calls"]
    assert set(seconds) == set(mc.BUCKETS) and set(mc.BUCKETS) == {*mc.MODELS, *mc.PROCESSORS, *mc.OURS}
    assert all(value >= 0 for value in seconds.values()), seconds  # "ours: other" < 0 would mean overlapping timers
    assert sum(seconds.values()) == pytest.approx(result["total_s"], rel=1e-9, abs=1e-9)
    assert all(seconds[k] > 0 for k in mc.BUCKETS), seconds  # a renamed library method would leave its bucket at 0
    assert sum(mc.shares(result).values()) == pytest.approx(1.0)
    assert result["per_image_s"] == pytest.approx(result["total_s"] / 3)
    # the 3 timed images only (the warm-up is not counted): one batched detector forward, one SAM encode, one
    # image load and 4 mask writes per image
    assert calls["detector_forward"] == calls["sam_encode"] == calls["ours_load"] == 3
    assert calls["ours_write"] == 4 * 3 and calls["lightning"] == 0  # Lightning: the time outside predict_step
    assert calls["sam_decode"] == 3 * (1 if backend == "transformers" else 3)  # prompt enc, dense PE, decoder
    assert all(result["flops_per_image"][k] > 0 for k in mc.MODELS)
    store = MaskStore(result["store"])
    for rel in ("alpha/0.jpg", "beta/1.jpg", "alpha/2.jpg"):
        assert store.has(rel, "concept") and store.has(rel, "object")
        assert all(store.has(rel, "concept", concept=c) for c in ("round eye", "striped fin"))
    assert not store.has("alpha/warmup.jpg", "object")
    text = mc.report(result)
    assert all(label in text for label in mc.BUCKETS.values()) and "ESTIMATE" in text


def test_the_command_line_writes_the_figures_as_json(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                    capsys: pytest.CaptureFixture):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    mc = mask_cost()
    results = mc.main(["--size", "tiny", "--images", "1", "--backends", "segment-anything",
                       "--json", str(tmp_path / "out.json")])
    saved = json.loads((tmp_path / "out.json").read_text())
    assert [r["backend"] for r in saved] == ["segment-anything"] and saved[0]["seconds"] == results[0]["seconds"]
    assert "seconds per image" in capsys.readouterr().out


def test_the_gpu_estimate_is_flops_at_the_assumed_rate_plus_the_host_side_time():
    mc = mask_cost()
    seconds = dict.fromkeys(mc.BUCKETS, 0.0) | {"detector_processor": 0.2, "ours_write": 0.1, "sam_encode": 50.0,
                                                "lightning": 0.08}
    result = {"images": 2, "seconds": seconds, "flops_per_image": {"detector_forward": 6e12, "sam_encode": 3e12,
                                                                  "sam_decode": 0.0}}
    # 9e12 FLOPs at 30 % of 300e12 = 0.1 s, plus (0.2 + 0.1) / 2 images of host-side time, per image; Lightning's
    # 0.08 s once per run
    assert mc.gpu_estimate(result, 300e12, 0.3) == pytest.approx(1000 * (0.1 + 0.15) + 0.08)


def test_both_sam_backends_count_the_same_flops_on_the_same_weights(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """Both backends run one SAM's weights, so their counted FLOPs agree, attention included: the transformers SAM
    attends through `scaled_dot_product_attention`, whose CPU kernel torch's counter does not know by itself."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    mc = mask_cost()
    flops = [mc.measure(tmp_path, "tiny", backend, images=1)["flops_per_image"] for backend in mc.BACKENDS]
    assert flops[0] == flops[1]
