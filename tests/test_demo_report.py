"""The demo's statistics: per-seed rows, paired differences with bootstrap intervals and sign tests."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from cft_lightning.demo.report import (
    bar_chart,
    bootstrap_interval,
    paired,
    paired_markdown,
    per_seed,
    sign_test,
    summarize,
)


def _result(original: float, tuned: float, id_tuned: float = 0.9) -> dict:
    return {"splits": {"test_ood": {"metrics": {"acc1": {"original": original, "fine_tuned": tuned}}},
                       "test_id": {"metrics": {"acc1": {"original": 0.9, "fine_tuned": id_tuned}}}}}


def test_sign_test_is_the_exact_binomial() -> None:
    assert sign_test([1, 2, 3, 4, 5]) == pytest.approx(2 / 32)
    assert sign_test([1, -1]) == 1.0
    assert sign_test([0.0, 0.0]) == 1.0  # ties dropped: nothing to test
    assert sign_test([1] * 9 + [-1]) == pytest.approx(2 * 11 / 1024)


def test_bootstrap_interval_brackets_the_mean_and_collapses_for_constant_differences() -> None:
    assert bootstrap_interval([0.05] * 5) == pytest.approx((0.05, 0.05))
    low, high = bootstrap_interval([0.01, 0.03, -0.02, 0.04, 0.02])
    assert low < 0.016 < high and low >= -0.02 and high <= 0.04
    assert all(math.isnan(v) for v in bootstrap_interval([0.1]))


def test_paired_differences_are_taken_per_seed(tmp_path: Path) -> None:
    # seed 1's original is lower; cft gains 5 points on every seed, plain loses 2 on one and gains on the others
    results = {"0": {"plain": _result(0.40, 0.38), "cft": _result(0.40, 0.45)},
               "1": {"plain": _result(0.20, 0.22), "cft": _result(0.20, 0.25)},
               "2": {"plain": _result(0.30, 0.31), "cft": _result(0.30, 0.35)}}
    rows = per_seed(results)
    assert rows["original"]["OOD top-1"] == {"0": 0.40, "1": 0.20, "2": 0.30}
    diffs = paired(results, "original")
    cft = diffs["cft"]["OOD top-1"]
    assert cft.mean == pytest.approx(0.05) and cft.std == pytest.approx(0.0, abs=1e-12)
    assert cft.positive == cft.n == 3 and cft.excludes_zero
    assert not diffs["plain"]["OOD top-1"].excludes_zero  # -2, +2, +1 points: the interval holds 0
    versus_plain = paired(results, "plain")["cft"]["OOD top-1"]
    assert versus_plain.mean == pytest.approx((0.07 + 0.03 + 0.04) / 3)
    assert "original" in paired(results, "plain")  # the Original is a row against plain too
    text = paired_markdown(diffs, "original")
    assert "**+5.0 [+5.0, +5.0] (3/3)**" in text
    summary = summarize(results)
    assert summary["original"]["OOD top-1"][0] == pytest.approx(0.30)
    path = bar_chart(summary, tmp_path / "metrics.png", diffs)
    assert path.stat().st_size > 1000


def _stage(stage: str, id_acc: float, ood: float, probe: float) -> dict:
    return {"recipe": {"stage": stage}, "train_seconds": 1.0,
            "profile": {"test_id_acc1": id_acc, "test_ood_acc1": ood, "bg_follow": 0.5, "probe_ood_acc1": probe}}


def test_calibration_criteria_are_checked_per_seed() -> None:
    from cft_lightning.demo import calibration

    good = {"stages": [_stage("parts", 0.6, 0.55, 0.56), _stage("shortcut", 0.95, 0.35, 0.50)]}
    forgot = {"stages": [_stage("parts", 0.6, 0.55, 0.56), _stage("shortcut", 0.95, 0.35, 0.30)]}
    no_shortcut = {"stages": [_stage("parts", 0.6, 0.45, 0.5), _stage("shortcut", 0.85, 0.44, 0.5)]}
    scratch = {"stages": [_stage("scratch", 0.95, 0.2, 0.3)]}
    assert all(calibration.check(good).values())
    assert calibration.check(forgot) == {"parts_known": True, "id_high": True, "leans_on_shortcut": True,
                                         "parts_still_decodable": False}
    verdict = calibration.check(no_shortcut)
    assert not verdict["id_high"] and not verdict["leans_on_shortcut"] and verdict["parts_known"]
    assert calibration.check(scratch) is None  # the criteria are those of the pretrained start
    starts = {"0": good, "1": forgot, "2": scratch}
    assert calibration.failed(starts) == ["seed 1: " + dict(calibration.CRITERIA)["parts_still_decodable"]]
    text = calibration.calibration_markdown(starts)
    assert text.count("| 0 | ") == 2 and "**no**" in text and "| 2 | scratch |" in text
