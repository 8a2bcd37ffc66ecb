"""Failures that fail: an unreachable endpoint or a missing/refused key stops `cft concepts` and `cft critique`
at the first request with one line saying what to set; a run that produced nothing, or less than
`--min_success`, exits non-zero after writing what it did produce."""

from __future__ import annotations

import json
import socket
import time
from pathlib import Path

import pytest
import timm
import torch
from test_concepts import SECRET, Stub, serve

from cft_lightning.benchmarks import ShortcutPartsSpec, build_shortcut_parts
from cft_lightning.cli import main


def closed_port_url() -> str:
    """A local URL where nothing listens (the port was free a moment ago)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}/v1"


def run(args: list[str], capsys: pytest.CaptureFixture) -> tuple[int, str, float]:
    """(exit code, stderr, seconds) of `cft <args>`."""
    start = time.perf_counter()
    with pytest.raises(SystemExit) as exc:
        main(args)
    return exc.value.code, capsys.readouterr().err, time.perf_counter() - start


def concepts_args(tmp_path: Path, *extra: str) -> list[str]:
    (tmp_path / "classes.txt").write_text("n1\ttabby cat\nn2\tdog\nn3\tfox\n")
    return ["concepts", "--classes", str(tmp_path / "classes.txt"), "--out", str(tmp_path / "bank.json"),
            "--model", "gpt-test", "--embedder", "none", "--samples", "1", "--no_progress", *extra]


def test_concepts_with_the_server_down_stops_at_once(tmp_path: Path, capsys: pytest.CaptureFixture):
    code, err, seconds = run(concepts_args(tmp_path, "--base_url", closed_port_url()), capsys)
    assert code == 2 and seconds < 15
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("cft: error: cannot reach http://127.0.0.1:")
    assert "--base_url" in lines[0]
    assert not (tmp_path / "bank.json").exists()


def test_concepts_without_a_key_for_the_openai_api_stops_before_any_request(
        tmp_path: Path, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    monkeypatch.delenv("OPENAI_BASE_URL", raising=False)
    code, err, seconds = run(concepts_args(tmp_path), capsys)
    assert code == 2 and seconds < 5
    assert "$OPENAI_API_KEY is not set" in err and "--base_url" in err and len(err.strip().splitlines()) == 1


class Refusing(Stub):
    """Every request answered 401, like a server that wants a key."""

    def answer(self, name: str) -> tuple[int, str]:
        with self.lock:
            self.calls[name] += 1
        return 401, ""


def test_concepts_with_a_refused_key_stops_at_once(tmp_path: Path, capsys: pytest.CaptureFixture,
                                                   monkeypatch: pytest.MonkeyPatch):
    stub = Refusing()
    server = serve(stub)
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}/v1"
        monkeypatch.setenv("MY_KEY", SECRET)
        code, err, _ = run(concepts_args(tmp_path, "--base_url", url, "--api_key_env", "MY_KEY"), capsys)
    finally:
        server.shutdown()
    assert code == 2 and "refused the request (401)" in err and "$MY_KEY was refused" in err
    assert sum(stub.calls.values()) == 1  # the first class's first request, then the command stops
    assert SECRET not in err


def test_concepts_below_min_success_exits_1_after_writing_the_bank(tmp_path: Path, capsys: pytest.CaptureFixture):
    stub = Stub()
    server = serve(stub)
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}/v1"
        (tmp_path / "classes.txt").write_text("n1\ttabby cat\nn4\towl\n")  # owl: always 500
        args = ["concepts", "--classes", str(tmp_path / "classes.txt"), "--base_url", url, "--model", "gpt-test",
                "--embedder", "none", "--samples", "1", "--no_progress"]
        code, err, _ = run([*args, "--out", str(tmp_path / "bank.json")], capsys)
        assert code == 1 and "1 of 2 classes have no concept" in err and "n4: InternalServerError" in err
        bank = json.loads((tmp_path / "bank.json").read_text())  # written all the same
        assert bank["concepts"]["n1"] and "n4" in bank["provenance"]["failed"]
        main([*args, "--out", str(tmp_path / "half.json"), "--min_success", "0.5"])  # accepted: no exit
    finally:
        server.shutdown()


SPEC = ShortcutPartsSpec(num_classes=3, image_size=32, train_per_class=4, val_per_class=1, test_per_class=1,
                         decoy=True, background_shortcut=False)


@pytest.fixture(scope="module")
def critique_inputs(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    data = build_shortcut_parts(tmp_path_factory.mktemp("decoy") / "sp", SPEC, progress=False)
    torch.manual_seed(0)
    weights = tmp_path_factory.mktemp("w") / "cnn.pth"
    torch.save(timm.create_model("test_resnet", num_classes=3).state_dict(), weights)
    return data, weights


def critique_args(inputs: tuple[Path, Path], out: Path, url: str, descriptions: Path) -> list[str]:
    descriptions.write_text("'*': a creature's body with its two parts decides the class\n")
    data, weights = inputs
    return ["critique", "--model", "test_resnet", "--weights", str(weights), "--num_classes", "3",
            "--data", str(data / "images" / "train"), "--out", str(out), "--samples", "3", "--segments", "3",
            "--batch_size", "4", "--no_progress", "--attribution", "ixg", "--descriptions", str(descriptions),
            "--llm", "vision-model", "--base_url", url, "--retries", "0"]


def test_critique_with_the_server_down_stops_at_once(critique_inputs, tmp_path: Path,
                                                     capsys: pytest.CaptureFixture):
    code, err, _ = run(critique_args(critique_inputs, tmp_path / "store", closed_port_url(), tmp_path / "d.yaml"),
                       capsys)
    assert code == 2 and "cft: error: cannot reach http://127.0.0.1:" in err


def test_critique_that_writes_no_mask_exits_1_with_its_report(critique_inputs, tmp_path: Path,
                                                             capsys: pytest.CaptureFixture, vision_stub,
                                                             monkeypatch: pytest.MonkeyPatch):
    stub, url = vision_stub
    monkeypatch.setattr(stub, "reply", lambda body: ({"role": "assistant", "content": None,
                                                      "refusal": "I can't help with that."}, 0))
    out = tmp_path / "store"
    code, err, _ = run(critique_args(critique_inputs, out, url, tmp_path / "d.yaml"), capsys)
    assert code == 1 and "3 of 3 images got no corrective mask" in err and "refused" in err
    summary = json.loads((out / "critique" / "summary.json").read_text())
    assert summary["masks_written"] == 0 and len(summary["failed"]) == 3
    assert (out / "critique" / "report.md").is_file()


def test_explain_offline_names_its_own_weight_flag(tmp_path: Path, capsys: pytest.CaptureFixture,
                                                   monkeypatch: pytest.MonkeyPatch):
    """Hub weights that cannot be fetched: one line naming `--weights` (cft explain's flag, not a config key),
    how to pre-download, and HF_HUB_OFFLINE=1."""
    constants = pytest.importorskip("huggingface_hub.constants")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    from PIL import Image

    Image.new("RGB", (32, 32)).save(tmp_path / "x.png")
    code, err, _ = run(["explain", "--model", "vit_tiny_patch16_224.augreg_in21k", "--pretrained", "--images",
                        str(tmp_path / "x.png"), "--out", str(tmp_path / "out"), "--no_progress"], capsys)
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert "with --weights." in err and "HF_HUB_OFFLINE=1" in err and "model.backbone" not in err
