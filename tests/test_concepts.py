"""`cft concepts` against a local OpenAI-compatible stub server: good, malformed, 429 and 500 answers, the
disk cache (a rerun makes no call), the filters, and no API key in any written file."""

from __future__ import annotations

import json
import re
import threading
import zlib
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest

from cft_lightning.cli import main
from cft_lightning.concepts import CachedChat, discover, filter_concepts, load_concept_bank, parse_list

SECRET = "sk-test-secret-0123456789"


class Stub:
    """Answers by object name: `cat` a list, `dog` prose once then a list, `fox` 429 once then a list,
    `owl` always 500, `emu` an empty answer once then a list, `yak` a list cut at max_tokens."""

    def __init__(self) -> None:
        self.calls: Counter[str] = Counter()
        self.auth: set[str] = set()
        self.lock = threading.Lock()

    def answer(self, name: str) -> tuple[int, str]:
        with self.lock:
            self.calls[name] += 1
            n = self.calls[name]
        if name == "owl":
            return 500, ""
        if name == "fox" and n == 1:
            return 429, ""
        if name == "dog" and n == 1:
            return 200, "I am happy to help! Dogs are wonderful animals."
        if name == "emu" and n == 1:
            return 200, ""
        if name == "yak":
            return 200, "- shaggy coat\n- curved horns\n- hump"  # finish_reason "length": "hump" may be cut
        items = {"tabby cat": ["- Pointed ears", "- ears pointed", "- whiskers", "- tabby cat",
                               "- a very long description of the fur pattern"],
                 "dog": ["1. wagging tail", "2. snout"], "fox": ["* bushy tail"], "emu": ["- long neck"]}[name]
        return 200, "\n".join(items)


def serve(stub: Stub):
    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args) -> None:  # quiet
            pass

        def do_POST(self) -> None:
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            stub.auth.add(self.headers.get("Authorization", ""))
            prompt = body["messages"][-1]["content"]
            name = re.findall(r"(?:Object|Word): (.+)\n", prompt)[-1]
            status, text = stub.answer(name)
            if status != 200:
                self.send_response(status)
                self.send_header("retry-after-ms", "1")
                self.send_header("Content-Type", "application/json")
                self.end_headers()
                self.wfile.write(json.dumps({"error": {"message": "busy", "type": "server"}}).encode())
                return
            payload = {"id": "x", "object": "chat.completion", "created": 0, "model": body["model"],
                       "choices": [{"index": 0, "finish_reason": "length" if name == "yak" else "stop",
                                    "message": {"role": "assistant", "content": text}}],
                       "usage": {"prompt_tokens": 10, "completion_tokens": 5, "total_tokens": 15}}
            data = json.dumps(payload).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


@pytest.fixture()
def stub():
    s = Stub()
    server = serve(s)
    yield s, f"http://127.0.0.1:{server.server_address[1]}/v1"
    server.shutdown()


def bag_of_words(texts):
    """A deterministic stand-in for a sentence embedder: normalised word counts (hashed to 512 slots)."""
    rows = [Counter(zlib.crc32(w.encode()) % 512 for w in t.lower().split()) for t in texts]
    out = np.zeros((len(texts), 512))
    for i, row in enumerate(rows):
        for j, c in row.items():
            out[i, j] = c
    return out / np.linalg.norm(out, axis=1, keepdims=True).clip(1e-12)


def test_parse_list_variants():
    assert parse_list("- Round eye.\n- a striped fin\n* Forked tail\n1. The spotted belly\n2) horn") == [
        "round eye", "striped fin", "forked tail", "spotted belly", "horn"]
    assert parse_list("stripes, mane, hooves") == ["stripes", "mane", "hooves"]
    assert parse_list("Sure! Zebras are lovely animals that live in Africa.") == []


def test_discover_with_the_stub(stub, tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    server, url = stub
    monkeypatch.setenv("MY_KEY", SECRET)
    classes = {"n1": "tabby cat", "n2": "dog", "n3": "fox", "n4": "owl"}
    chat = CachedChat("gpt-test", tmp_path / "cache", base_url=url, api_key_env="MY_KEY", max_retries=2)
    doc = discover(classes, chat, bag_of_words, samples=1, progress=False)
    bank = doc["concepts"]
    # lists parsed; the class name, the too-long item and one of two duplicates removed
    assert bank["n1"] == ["pointed ears", "whiskers"] or bank["n1"] == ["ears pointed", "whiskers"]
    assert bank["n2"] == ["wagging tail", "snout"]  # prose first: asked again
    assert bank["n3"] == ["bushy tail"]  # 429 first: retried by the client
    assert "n4" not in bank and "InternalServerError" in doc["provenance"]["failed"]["n4"]
    report = doc["provenance"]["filter_report"]["n1"]
    assert report["class_name"] == ["tabby cat"] and report["too_long"] and report["duplicate"]
    assert server.auth == {f"Bearer {SECRET}"}
    assert doc["provenance"]["usage"]["prompt_tokens"] > 0
    assert doc["provenance"]["counts"]["n2"]["tokens"] == 15 * 4  # dog: 3 prompts, the first asked twice; 15 each
    # a rerun answers everything from the cache except the failing class
    before = sum(v for k, v in server.calls.items() if k != "owl")
    again = discover(classes, CachedChat("gpt-test", tmp_path / "cache", base_url=url, api_key_env="MY_KEY",
                                         max_retries=0), bag_of_words, samples=1, progress=False)
    assert sum(v for k, v in server.calls.items() if k != "owl") == before
    assert again["concepts"] == bank
    for path in (tmp_path / "cache").iterdir():
        assert SECRET not in path.read_text()


def test_empty_and_cut_answers(stub, tmp_path: Path):
    """An empty answer is asked again and never cached; an answer cut at max_tokens loses its last item."""
    server, url = stub
    chat = CachedChat("gpt-test", tmp_path / "cache", base_url=url, max_retries=0)
    doc = discover({"n5": "emu", "n6": "yak"}, chat, None, samples=1, progress=False)
    assert doc["concepts"]["n5"] == ["long neck"] and server.calls["emu"] == 4  # 3 prompts, the first twice
    assert doc["concepts"]["n6"] == ["shaggy coat", "curved horns"]
    cached = [json.loads(p.read_text())["answer"] for p in (tmp_path / "cache").iterdir()]
    assert "" not in cached and len(cached) == 6


def test_cli_writes_the_bank_without_the_key(stub, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                             capsys: pytest.CaptureFixture):
    _, url = stub
    monkeypatch.setenv("OPENAI_API_KEY", SECRET)
    (tmp_path / "classes.txt").write_text("n1\ttabby cat\nn2\tdog\n")
    out = tmp_path / "bank" / "concepts.json"
    main(["concepts", "--classes", str(tmp_path / "classes.txt"), "--out", str(out), "--base_url", url,
          "--model", "gpt-test", "--embedder", "none", "--samples", "1", "--no_progress"])
    printed = capsys.readouterr().out
    assert "for 2 classes" in printed and "per class" in printed
    assert load_concept_bank(out)["n2"] == ["wagging tail", "snout"]
    doc = json.loads(out.read_text())
    assert doc["format"] == "cft_lightning.concepts/1" and doc["provenance"]["filters"]["class_similarity"] is None
    for path in [out, *Path(f"{out}.cache").iterdir()]:
        assert SECRET not in path.read_text()


def test_filters_by_hand():
    bank, report = filter_concepts(
        {"zebra": ["zebra", "The zebra", "black stripes", "stripes black", "mane", "zebra animal", "long concept x"]},
        bag_of_words, max_length=13)
    assert bank["zebra"] in (["black stripes", "mane", "zebra animal"], ["stripes black", "mane", "zebra animal"])
    assert report["zebra"]["class_name"] == ["zebra", "The zebra"]
    assert report["zebra"]["too_long"] == ["long concept x"]
    assert "similar_to_class" not in report["zebra"]  # "zebra animal": cosine 0.71 with "zebra", below 0.85
    strict, report = filter_concepts({"zebra": ["zebra animal"]}, bag_of_words, class_similarity=0.7)
    assert strict["zebra"] == [] and report["zebra"]["similar_to_class"] == ["zebra animal"]


def test_validation_on_the_embedded_benchmark(tmp_path: Path, capsys: pytest.CaptureFixture):
    """The oracle grounder finds each class's parts and not the others: a concept the class does not have is
    dropped by occurrence; an impossible coverage threshold drops the class's concepts with that reason."""
    from cft_lightning.benchmarks import ShortcutPartsSpec, build_shortcut_parts
    from cft_lightning.benchmarks.shortcut_parts import class_parts

    spec = ShortcutPartsSpec(num_classes=3, image_size=32, train_per_class=8, val_per_class=2, test_per_class=2)
    data = build_shortcut_parts(tmp_path / "sp", spec, progress=False)
    parts = class_parts(3)
    bank = {cls: [*ps, "pointed horn"] for cls, ps in parts.items() if "pointed horn" not in ps}
    (tmp_path / "bank.json").write_text(json.dumps(bank))
    args = ["concepts", "validate", "--bank", str(tmp_path / "bank.json"), "--images", str(data / "images" / "train"),
            "--grounder", "oracle", "--masks", str(data / "masks"), "--out", str(tmp_path / "v.json"),
            "--per_class", "5"]
    main(args)
    assert "kept" in capsys.readouterr().out
    doc = json.loads((tmp_path / "v.json").read_text())
    for cls in bank:
        assert doc["concepts"][cls] == list(parts[cls])
        report = doc["provenance"]["report"][cls]
        assert report["dropped"] == {"pointed horn": "occurrence 0.00 < 0.15"} and report["images"] == 5
        assert 0.2 < report["coverage"] < 0.6
    main([*args[:-2], "--coverage", "0.95", "--per_class", "5"])
    doc = json.loads((tmp_path / "v.json").read_text())
    assert all(v == [] for v in doc["concepts"].values())
    first = next(iter(bank))
    assert "class coverage" in doc["provenance"]["report"][first]["dropped"][parts[first][0]]


def test_masks_from_a_validated_bank_with_the_oracle_grounder(tmp_path: Path):
    """concepts -> masks offline: the oracle grounder's per-concept masks, their union and the object mask
    land in a new store equal to the benchmark's ground truth; a rerun skips everything."""
    from cft_lightning.benchmarks import ShortcutPartsSpec, build_shortcut_parts
    from cft_lightning.benchmarks.shortcut_parts import class_parts
    from cft_lightning.concepts.validate import OracleGrounder, images_by_class
    from cft_lightning.data.mask_store import MaskStore
    from cft_lightning.masks.generate import generate_masks

    spec = ShortcutPartsSpec(num_classes=3, image_size=32, train_per_class=4, val_per_class=2, test_per_class=2)
    data = build_shortcut_parts(tmp_path / "sp", spec, progress=False)
    bank = {cls: list(ps) for cls, ps in class_parts(3).items()}
    images = images_by_class(data / "images" / "train")
    summary = generate_masks(images, bank, OracleGrounder(data / "masks"), tmp_path / "store", progress=False)
    assert summary["written"] == 12 and summary["empty_concept_masks"] == [] and summary["mean_concepts_found"] == 2
    truth, made = MaskStore(data / "masks"), MaskStore(tmp_path / "store")
    for cls, rels in images.items():
        for rel in rels:
            for kind in ("concept", "object"):
                assert np.array_equal(made.read(rel, kind), truth.read(rel, kind))
            for concept in bank[cls]:
                assert np.array_equal(made.read(rel, "concept", concept=concept),
                                      truth.read(rel, "concept", concept=concept))
    again = generate_masks(images, bank, OracleGrounder(data / "masks"), tmp_path / "store", progress=False)
    assert again["written"] == 0 and again["skipped"] == 12


def _oracle_setup(tmp_path: Path):
    from cft_lightning.benchmarks import ShortcutPartsSpec, build_shortcut_parts
    from cft_lightning.benchmarks.shortcut_parts import class_parts
    from cft_lightning.concepts.validate import images_by_class

    spec = ShortcutPartsSpec(num_classes=3, image_size=32, train_per_class=5, val_per_class=2, test_per_class=2)
    data = build_shortcut_parts(tmp_path / "sp", spec, progress=False)
    return data, {cls: list(ps) for cls, ps in class_parts(3).items()}, images_by_class(data / "images" / "train")


@pytest.mark.parametrize("devices", [1, 2])
def test_mask_generation_as_trainer_predict_writes_every_image_once(tmp_path: Path, devices: int):
    """Two CPU processes (ddp_spawn) share the 15 images: the per-rank logs hold each image exactly once, and
    a second run (a resume) skips all of them."""
    import lightning as L

    from cft_lightning.concepts.validate import OracleGrounder
    from cft_lightning.data.mask_store import MaskStore
    from cft_lightning.masks.predict import MaskGeneration, generation_loader

    data, bank, images = _oracle_setup(tmp_path)
    store = tmp_path / "store"
    for _ in range(2):
        trainer = L.Trainer(accelerator="cpu", devices=devices, strategy="ddp_spawn" if devices > 1 else "auto",
                            logger=False, enable_progress_bar=False, enable_model_summary=False,
                            default_root_dir=tmp_path)
        trainer.predict(MaskGeneration(OracleGrounder(data / "masks"), bank, store),
                        generation_loader(images, batch_size=2), return_predictions=False)
    records = [json.loads(line) for log in sorted((store / "logs").glob("*.jsonl"))
               for line in log.read_text().splitlines()]
    written = [r["image"] for r in records if not r["skipped"]]
    assert sorted(written) == sorted(rel for rels in images.values() for rel in rels)  # each once
    assert len({r["rank"] for r in records}) == devices
    assert sum(r["skipped"] for r in records) == 15  # the second run skipped everything
    truth, made = MaskStore(data / "masks"), MaskStore(store)
    assert all(np.array_equal(made.read(rel, "concept"), truth.read(rel, "concept")) for rel in written)


def test_cft_masks_generate_cli_with_the_oracle(tmp_path: Path, capsys: pytest.CaptureFixture):
    data, bank, images = _oracle_setup(tmp_path)
    (tmp_path / "bank.json").write_text(json.dumps(bank))
    args = ["masks", "generate", "--images", str(data / "images" / "train"), "--concepts", str(tmp_path / "bank.json"),
            "--out", str(tmp_path / "store"), "--grounder", "oracle", "--oracle_masks", str(data / "masks"),
            "--accelerator", "cpu", "--devices", "1", "--no_progress"]
    main(args)
    out = capsys.readouterr().out
    assert "15 images, 15 written so far, 2.00 concepts found per image, 0 empty" in out
    with pytest.raises(SystemExit):
        main([*args[:10], "--accelerator", "cpu"])
    assert "needs --oracle_masks" in capsys.readouterr().err


def test_mask_generation_resumes_after_a_crash(tmp_path: Path):
    """A grounder that dies on the 7th image stops the run; the rerun writes only the rest: no image twice,
    none missing, no partial file (writes are atomic)."""
    import lightning as L

    from cft_lightning.concepts.validate import OracleGrounder
    from cft_lightning.masks.predict import MaskGeneration, generation_loader

    data, bank, images = _oracle_setup(tmp_path)

    class Dying(OracleGrounder):
        calls = 0

        def __call__(self, rel, class_name, prompts):
            Dying.calls += 1
            if Dying.calls == 7:
                raise KeyboardInterrupt("killed")
            return super().__call__(rel, class_name, prompts)

    def run(grounder) -> None:
        trainer = L.Trainer(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
                            enable_model_summary=False, default_root_dir=tmp_path)
        trainer.predict(MaskGeneration(grounder, bank, tmp_path / "store"), generation_loader(images, 4),
                        return_predictions=False)

    with pytest.raises((KeyboardInterrupt, SystemExit)):
        run(Dying(data / "masks"))
    run(OracleGrounder(data / "masks"))
    records = [json.loads(line) for line in (tmp_path / "store" / "logs" / "rank_0.jsonl").read_text().splitlines()]
    written = [r["image"] for r in records if not r["skipped"]]
    assert sorted(written) == sorted(rel for rels in images.values() for rel in rels)
    assert not list((tmp_path / "store").rglob("*.tmp*"))
