"""Packaging: the licence file matches the declared licence, project URLs, true lower bounds, and the README's
real-data steps name the extras they need."""

from __future__ import annotations

import inspect
import re
import sys
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.version import Version

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    tomllib = pytest.importorskip("tomli")

ROOT = Path(__file__).resolve().parents[1]
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))
PROJECT = PYPROJECT["project"]


def _requirement(name: str, requirements: list[str]) -> Requirement:
    found = [Requirement(r) for r in requirements if Requirement(r).name == name]
    assert len(found) == 1, f"{name} is declared {len(found)} times"
    return found[0]


def _lower_bound(req: Requirement) -> Version:
    bounds = [Version(s.version) for s in req.specifier if s.operator in (">=", "==", "~=")]
    assert bounds, f"{req} has no lower bound"
    return max(bounds)


def test_license_file_is_the_apache_2_text_the_metadata_declares() -> None:
    assert PROJECT["license"] == "Apache-2.0"  # PEP 639 SPDX expression, not the deprecated table
    assert PROJECT["license-files"] == ["LICENSE"]
    text = (ROOT / "LICENSE").read_text(encoding="utf-8")
    assert "Apache License" in text and "Version 2.0, January 2004" in text
    for number, title in enumerate(["Definitions", "Grant of Copyright License", "Grant of Patent License",
                                    "Redistribution", "Submission of Contributions", "Trademarks",
                                    "Disclaimer of Warranty", "Limitation of Liability",
                                    "Accepting Warranty or Additional Liability"], start=1):
        assert f"{number}. {title}." in text, title
    assert "END OF TERMS AND CONDITIONS" in text and len(text) > 11000  # the full text, not a pointer to it
    # setuptools reads the SPDX string form from 77 on (PEP 639)
    setuptools = _requirement("setuptools", PYPROJECT["build-system"]["requires"])
    assert _lower_bound(setuptools) >= Version("77")
    assert not any(c.startswith("License ::") for c in PROJECT.get("classifiers", []))  # PEP 639 forbids both


def test_project_urls_are_declared() -> None:
    urls = PROJECT["urls"]
    assert {"Homepage", "Documentation", "Issues"} <= set(urls)
    assert all(re.fullmatch(r"https://\S+", url) for url in urls.values()), urls


def test_lightning_bound_admits_only_versions_with_weights_only_loading() -> None:
    # `cft explain --ckpt` calls load_from_checkpoint(..., weights_only=True): a keyword Lightning added in 2.6.0
    # (before it, the keyword fell into **kwargs and reached the module's __init__ as a hyperparameter)
    lightning = _requirement("lightning", PROJECT["dependencies"])
    assert _lower_bound(lightning) >= Version("2.6.0"), lightning
    from lightning.pytorch import LightningModule

    assert "weights_only" in inspect.signature(LightningModule.load_from_checkpoint).parameters
    timm = _requirement("timm", PROJECT["dependencies"])
    assert _lower_bound(timm) >= Version("1.0.3")  # timm.data.ImageNetInfo, the source of ImageNet class names


def test_readme_real_data_steps_name_the_extras_they_need() -> None:
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    extras = PROJECT["optional-dependencies"]
    section = readme.split("## Real data", 1)[1].split("\n## ", 1)[0]
    named = set(re.findall(r'pip install -e "\.\[([a-z_,]+)\]"', section))
    assert {"concepts", "masks", "benchmarks", "critique"} <= named, named
    assert all(part in extras for name in named for part in name.split(",")), named
    for command, extra in (("cft concepts", "concepts"), ("cft masks generate", "masks"),
                           ("ImageNet-Segmentation", "benchmarks"), ("cft critique", "critique")):
        after = section[section.index(command):]
        assert f'".[{extra}]"' in after[:400], f"{command} does not name .[{extra}]"
    assert "h5py" in " ".join(extras["benchmarks"]) and "openai" in " ".join(extras["concepts"])


def test_imagenet_segmentation_without_h5py_names_the_extra(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    from cft_lightning.benchmarks.imagenet_seg import ImageNetSegmentation
    from cft_lightning.errors import DataError

    monkeypatch.setitem(sys.modules, "h5py", None)  # import h5py -> ImportError
    with pytest.raises(DataError, match=r"\[benchmarks\]"):
        ImageNetSegmentation(tmp_path / "gtsegs_ijcv.mat", {"input_size": (3, 32, 32)})
