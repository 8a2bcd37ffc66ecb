"""The critic and judge against a local OpenAI-compatible vision stub (127.0.0.1): good answers, a refusal, a
malformed judge answer, a timeout; the requests' images and response_format; the cache; verdict parsing;
the user files (descriptions, judge examples) and the oracle."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from _vision_stub import SECRET

from cft_lightning.concepts.llm import CachedChat, ChatError
from cft_lightning.critique.critic import (
    CriticAndJudge,
    CritiqueSample,
    OracleCritic,
    describe,
    load_descriptions,
    load_judge_examples,
    parse_verdicts,
)
from cft_lightning.errors import DataError


def sample(label: str, count: int = 3) -> CritiqueSample:
    rng = np.random.default_rng(0)
    segments = np.repeat(np.arange(count), 16 * 16 // count + 1)[: 16 * 16].reshape(16, 16)
    mass = rng.random((16, 16))
    mass /= mass.sum()
    shares = np.bincount(segments.reshape(-1), weights=mass.reshape(-1), minlength=count)
    return CritiqueSample(f"{label}/0.png", label, label, "the creature's body and parts decide the class",
                          rng.integers(0, 255, (16, 16, 3), dtype=np.uint8), segments, shares, mass)


def critic_for(url: str, cache: Path, monkeypatch: pytest.MonkeyPatch, timeout: float = 60.0) -> CriticAndJudge:
    monkeypatch.setenv("CRITIQUE_TEST_KEY", SECRET)
    common = dict(base_url=url, api_key_env="CRITIQUE_TEST_KEY", temperature=0.0, max_retries=0, timeout=timeout)
    return CriticAndJudge(CachedChat("vision-model", cache, max_tokens=500, **common),
                          CachedChat("judge-model", cache, max_tokens=200, **common))


def test_good_answers_give_one_verdict_per_segment(vision_stub, tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    stub, url = vision_stub
    critic = critic_for(url, tmp_path / "cache", monkeypatch)
    out = critic(sample("good", 3))
    assert out.spurious == [False, False, True] and "Segment 3: spurious" in out.reasoning
    critic_request, judge_request = stub.requests
    images = [p for p in critic_request["messages"][1]["content"] if p["type"] == "image_url"]
    assert len(images) == 3 and all(p["image_url"]["url"].startswith("data:image/png;base64,") for p in images)
    assert "True class: good" in critic_request["messages"][1]["content"][0]["text"]
    schema = judge_request["response_format"]["json_schema"]["schema"]["properties"]["verdicts"]
    assert judge_request["response_format"]["type"] == "json_schema" and schema["minItems"] == 3
    # the shipped few-shot examples precede the review: (user, assistant) pairs
    assert len(judge_request["messages"]) == 1 + 2 * len(load_judge_examples()) + 1
    assert stub.auth == {f"Bearer {SECRET}"}
    # cached: asking again calls nothing
    before = len(stub.requests)
    assert critic_for(url, tmp_path / "cache", monkeypatch)(sample("good", 3)).spurious == [False, False, True]
    assert len(stub.requests) == before
    for path in (tmp_path / "cache").rglob("*"):
        if path.is_file():
            text = path.read_text()
            assert SECRET not in text and "base64," not in text  # images are stored as their digest


def test_refusal_and_malformed_answers_are_retried(vision_stub, tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    stub, url = vision_stub
    critic = critic_for(url, tmp_path / "cache", monkeypatch)
    out = critic(sample("refuser", 2))
    assert out.spurious == [False, True] and stub.calls["critic:refuser"] == 2
    assert any("refused" in note for note in out.notes)
    out = critic(sample("mumbler", 2))
    assert out.spurious == [False, True] and stub.calls["judge:mumbler"] == 2
    assert any("no JSON object" in note for note in out.notes)


def test_refusals_and_timeouts_end_in_a_chat_error(vision_stub, tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    stub, url = vision_stub
    with pytest.raises(ChatError, match="no answer after 3 attempts"):
        critic_for(url, tmp_path / "cache", monkeypatch)(sample("blank"))
    assert stub.calls["critic:blank"] == 3
    with pytest.raises(ChatError, match="Timeout"):
        critic_for(url, tmp_path / "cache2", monkeypatch, timeout=0.5)(sample("sleeper"))
    assert not list((tmp_path / "cache").glob("*.json"))  # refusals are never cached


def test_parse_verdicts():
    assert parse_verdicts('{"verdicts": [{"segment": 2, "spurious": true}, {"segment": 1, "spurious": false}]}',
                          2) == [False, True]
    assert parse_verdicts('Here:\n```json\n{"verdicts": [{"segment": 1, "spurious": true}]}\n```', 1) == [True]
    bad = ["no json", '{"verdict": []}', '{"verdicts": [{"segment": 1, "spurious": "yes"}]}',
           '{"verdicts": [{"segment": 1, "spurious": true}, {"segment": 1, "spurious": true}]}',
           '{"verdicts": [{"segment": 3, "spurious": true}]}', '{"verdicts": [{"segment": 1, "spurious": true}]',
           '{"verdicts": [{"segment": 1, "spurious": true}]}']
    for text in bad:
        with pytest.raises(ValueError):
            parse_verdicts(text, 2)


def test_user_files(tmp_path: Path):
    (tmp_path / "d.yaml").write_text("alpha: the two parts\n'*': the creature\n")
    descriptions = load_descriptions(tmp_path / "d.yaml")
    assert describe(descriptions, "alpha") == "the two parts" and describe(descriptions, "beta") == "the creature"
    (tmp_path / "e.yaml").write_text("alpha: the two parts\n")
    with pytest.raises(DataError, match="no description for class 'beta'"):
        describe(load_descriptions(tmp_path / "e.yaml"), "beta")
    (tmp_path / "bad.yaml").write_text("alpha: ''\n")
    with pytest.raises(DataError, match="bad.yaml"):
        load_descriptions(tmp_path / "bad.yaml")
    (tmp_path / "ex.yaml").write_text("- segments: 2\n  critique: text\n  verdicts: {1: true}\n")
    with pytest.raises(DataError, match="example 0"):
        load_judge_examples(tmp_path / "ex.yaml")


def test_oracle_marks_segments_whose_effect_lies_in_the_truth():
    s = sample("good", 2)
    s.segments = np.zeros((16, 16), dtype=int)
    s.segments[:, 8:] = 1
    s.mass = np.zeros((16, 16))
    s.mass[0, 0], s.mass[0, 1], s.mass[0, 12] = 0.3, 0.3, 0.4
    s.truth = np.zeros((16, 16), dtype=bool)
    s.truth[0, 0] = True  # half of segment 1's effect, none of segment 2's
    assert OracleCritic(0.5)(s).spurious == [True, False]
    assert OracleCritic(0.6)(s).spurious == [False, False]


def test_chat_pickles_without_its_lock_and_client(tmp_path: Path):
    """ddp_spawn pickles the stage with its critic: the chat travels without its lock and client."""
    import pickle

    chat = CachedChat("m", tmp_path, base_url="http://127.0.0.1:9/v1")
    chat.usage["calls"] = 3
    copy = pickle.loads(pickle.dumps(chat))
    assert copy.usage["calls"] == 3 and copy._client is None and copy._lock is not chat._lock
