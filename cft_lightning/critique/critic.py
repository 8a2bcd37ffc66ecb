"""The critic and the judge (LVLM-VA): per segment of a model's evidence, is it relevant or spurious?

The critic (a vision LLM) sees the model's view of the image, the numbered segment map, the segments laid
over the image, the true class and the expert's description of that class, and reasons in six steps:
observe, locate the class's regions, map each segment to what it covers, synthesise, explain each
segment's relevance, give a verdict. The judge (an LLM, possibly the same one) turns that free text into
one binary verdict per segment, guided by few-shot (review -> expert verdicts) examples the user edits,
and answers in JSON that is validated here. The paper's prompt texts are unpublished; these are ours.

`OracleCritic` stands in for both when ground truth exists (the embedded benchmark's decoy masks): a
segment is spurious when at least `threshold` of its positive effect lies in the ground-truth mask.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from cft_lightning.concepts.llm import CachedChat, ChatRefusal
from cft_lightning.critique.views import PALETTE, data_url, overlay, segment_map, view_scale
from cft_lightning.errors import ChatError, DataError

__all__ = [
    "CritiqueSample",
    "Critic",
    "CriticAndJudge",
    "OracleCritic",
    "Verdicts",
    "load_descriptions",
    "load_judge_examples",
    "describe",
    "parse_verdicts",
]

log = logging.getLogger(__name__)
DEFAULT_EXAMPLES = Path(__file__).resolve().parent.parent / "_data" / "judge_examples.yaml"

CRITIC_SYSTEM = (
    "You review the evidence an image classifier relied on. You are shown the image as the classifier saw it, "
    "a map that splits the classifier's positive evidence into numbered coloured segments, and the segments "
    "laid over the image. Judge each segment against the expert's description of the class: relevant when it "
    "covers what the description says decides the class, spurious when it covers anything else (background, "
    "artefacts, markings, tags, unrelated objects). Be concrete about what each segment covers."
)
CRITIC_TASK = (
    "True class: {label}\n"
    "Expert description of the class: {description}\n"
    "Image 1: what the classifier saw. Image 2: its positive evidence split into {count} segments: {legend}. "
    "Image 3: the segments over the image. Share of the evidence per segment: {shares}.\n\n"
    "Answer in six numbered steps:\n"
    "1. Observe: describe the image.\n"
    "2. Locate: which regions belong to the class '{label}', according to the description?\n"
    "3. Map: for each segment, which part of the image does it cover?\n"
    "4. Synthesise: relate the segments to the regions of step 2.\n"
    "5. Explain: for each segment, does it cover a region relevant to '{label}' or something spurious?\n"
    "6. Verdict: one line per segment, 'Segment k: relevant' or 'Segment k: spurious'."
)
JUDGE_SYSTEM = (
    "You turn a reviewer's assessment of numbered image segments into verdicts. A segment is spurious when the "
    "reviewer concluded it covers something not relevant to the class, relevant otherwise. Reply with JSON only: "
    '{"verdicts": [{"segment": 1, "spurious": false}, ...]}, one entry for every segment from 1 to the count.'
)


def _judge_schema(count: int) -> dict[str, Any]:
    item = {"type": "object", "additionalProperties": False, "required": ["segment", "spurious"],
            "properties": {"segment": {"type": "integer"}, "spurious": {"type": "boolean"}}}
    return {"type": "json_schema", "json_schema": {"name": "verdicts", "strict": True, "schema": {
        "type": "object", "additionalProperties": False, "required": ["verdicts"],
        "properties": {"verdicts": {"type": "array", "items": item, "minItems": count, "maxItems": count}}}}}


class MalformedVerdicts(ValueError):
    """The judge's answer is not one boolean verdict per segment."""


def parse_verdicts(text: str, count: int) -> list[bool]:
    """[spurious for segment 1..count] from the judge's JSON (code fences and text around it tolerated)."""
    start, end = text.find("{"), text.rfind("}")
    if start < 0 or end <= start:
        raise MalformedVerdicts(f"no JSON object in the judge's answer: {text[:200]!r}")
    try:
        data = json.loads(text[start:end + 1])
    except ValueError as exc:
        raise MalformedVerdicts(f"invalid JSON from the judge ({exc}): {text[:200]!r}") from exc
    items = data.get("verdicts") if isinstance(data, dict) else None
    if not isinstance(items, list):
        raise MalformedVerdicts(f"the judge's JSON has no 'verdicts' list: {text[:200]!r}")
    found: dict[int, bool] = {}
    for item in items:
        if not (isinstance(item, dict) and isinstance(item.get("segment"), int)
                and isinstance(item.get("spurious"), bool)):
            raise MalformedVerdicts(f"verdict {item!r} is not {{'segment': int, 'spurious': bool}}")
        if not 1 <= item["segment"] <= count or item["segment"] in found:
            raise MalformedVerdicts(f"segment {item['segment']} is out of 1..{count} or repeated")
        found[item["segment"]] = item["spurious"]
    if len(found) != count:
        raise MalformedVerdicts(f"the judge gave verdicts for segments {sorted(found)}, expected 1..{count}")
    return [found[k] for k in range(1, count + 1)]


@dataclass
class CritiqueSample:
    """One image to critique, on the model's view.

    Attributes:
        key: the image's path relative to the data root.
        label: class id (folder name); label_name: readable name; description: the expert's text.
        view: (h, w, 3) uint8, what the model saw.
        segments: (h, w) int, PPEPS-WGM segments (0..J-1; -1 = none).
        shares: (J,) share of the positive effect per segment; mass: (h, w) the effect mass p.
        truth: (h, w) bool ground-truth spurious mask (for the oracle), else None.
    """

    key: str
    label: str
    label_name: str
    description: str
    view: np.ndarray
    segments: np.ndarray
    shares: np.ndarray
    mass: np.ndarray
    truth: np.ndarray | None = None


@dataclass
class Verdicts:
    """The outcome for one sample: spurious flags per segment, the critic's reasoning, the judge's answer."""

    spurious: list[bool]
    reasoning: str
    judge: str
    notes: list[str] = field(default_factory=list)


class Critic(Protocol):
    name: str

    def __call__(self, sample: CritiqueSample) -> Verdicts:
        """Verdicts for every segment of `sample`; raises `ChatError` when it cannot get them."""


class OracleCritic:
    """Verdicts from a ground-truth spurious mask: segment j is spurious when >= `threshold` of its positive
    effect lies inside the mask (segments without positive effect: by their pixels instead)."""

    name = "oracle"

    def __init__(self, threshold: float = 0.5) -> None:
        if not 0.0 < threshold <= 1.0:
            raise ValueError(f"oracle threshold must lie in (0, 1], got {threshold}")
        self.threshold = threshold

    def __call__(self, sample: CritiqueSample) -> Verdicts:
        if sample.truth is None:
            raise ValueError(f"{sample.key}: the oracle critic needs a ground-truth mask")
        flags, lines = [], []
        for j in range(len(sample.shares)):
            inside = sample.segments == j
            total = float(sample.mass[inside].sum())
            if total > 0:
                share = float(sample.mass[inside & sample.truth].sum()) / total
            else:
                share = float((inside & sample.truth).sum()) / max(int(inside.sum()), 1)
            flags.append(share >= self.threshold)
            lines.append(f"Segment {j + 1}: {100 * share:.0f}% of its effect in the ground-truth spurious mask "
                         f"-> {'spurious' if flags[-1] else 'relevant'}")
        return Verdicts(flags, "\n".join(lines), json.dumps({"verdicts": [
            {"segment": j + 1, "spurious": f} for j, f in enumerate(flags)]}))


def load_judge_examples(path: str | os.PathLike[str] | None = None) -> list[dict[str, Any]]:
    """The judge's few-shot examples: a YAML/JSON list of {segments, critique, verdicts: {k: bool}}."""
    import yaml

    source = Path(path) if path is not None else DEFAULT_EXAMPLES
    try:
        data = yaml.safe_load(source.read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError) as exc:
        raise DataError(f"judge examples {source}: {exc}") from exc
    if not isinstance(data, list):
        raise DataError(f"judge examples {source}: expected a list of examples")
    for i, ex in enumerate(data):
        ok = isinstance(ex, dict) and isinstance(ex.get("critique"), str) and isinstance(ex.get("verdicts"), dict)
        count = ex.get("segments") if ok else None
        if not ok or not isinstance(count, int) or sorted(int(k) for k in ex["verdicts"]) != list(
                range(1, count + 1)) or not all(isinstance(v, bool) for v in ex["verdicts"].values()):
            raise DataError(f"judge examples {source}: example {i} needs 'segments' (int), 'critique' (text) and "
                            "'verdicts' mapping every segment 1..segments to true/false")
    return data


def load_descriptions(path: str | os.PathLike[str]) -> dict[str, str]:
    """The expert's class descriptions: a YAML/JSON mapping {class id: text}; key '*' is the fallback."""
    import yaml

    try:
        data = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError) as exc:
        raise DataError(f"--descriptions {path}: {exc}") from exc
    if not isinstance(data, dict) or not all(isinstance(v, str) and v.strip() for v in data.values()):
        raise DataError(f"--descriptions {path}: expected a mapping from class id to a non-empty description")
    return {str(k): v.strip() for k, v in data.items()}


def describe(descriptions: Mapping[str, str], cls: str, source: str = "--descriptions") -> str:
    """The description of `cls` (or the '*' fallback); a clear error names the class and the file."""
    if cls in descriptions:
        return descriptions[cls]
    if "*" in descriptions:
        return descriptions["*"]
    raise DataError(f"{source} has no description for class {cls!r} (and no '*' fallback)")


class CriticAndJudge:
    """Critic and judge on OpenAI-compatible endpoints (cached, retried; the key only ever reaches the client)."""

    name = "lvlm"

    def __init__(self, critic: CachedChat, judge: CachedChat, examples: list[dict[str, Any]] | None = None,
                 retries: int = 2, structured: bool = True, image_side: int = 448) -> None:
        """
        Args:
            critic: the vision model's chat (e.g. gpt-4o; the critic needs a few hundred tokens: max_tokens ~1500).
            judge: the judge's chat (may be the same model; temperature 0 advised).
            examples: few-shot (review -> verdicts) examples (default: the shipped `judge_examples.yaml`).
            retries: extra attempts (new samples) after a refusal, an empty or a malformed answer.
            structured: ask the judge for JSON through `response_format` (json_schema); turn off for servers
                that reject it (the answer is validated either way).
            image_side: small views are upscaled (nearest) to about this side before they are sent.
        """
        self.critic, self.judge = critic, judge
        self.examples = examples if examples is not None else load_judge_examples()
        self.retries, self.structured, self.image_side = retries, structured, image_side

    def critic_messages(self, sample: CritiqueSample) -> list[dict[str, Any]]:
        count = len(sample.shares)
        scale = view_scale(max(sample.view.shape[:2]), self.image_side)
        from PIL import Image

        view = Image.fromarray(sample.view)
        if scale > 1:
            view = view.resize((view.width * scale, view.height * scale), Image.NEAREST)
        legend = ", ".join(f"{j + 1} = {PALETTE[j][0]}" for j in range(count))
        shares = ", ".join(f"{j + 1}: {100 * s:.0f}%" for j, s in enumerate(sample.shares))
        text = CRITIC_TASK.format(label=sample.label_name, description=sample.description, count=count,
                                  legend=legend, shares=shares)
        images = [view, segment_map(sample.segments, scale), overlay(sample.view, sample.segments, scale=scale)]
        content: list[dict[str, Any]] = [{"type": "text", "text": text}]
        content += [{"type": "image_url", "image_url": {"url": data_url(im), "detail": "high"}} for im in images]
        return [{"role": "system", "content": CRITIC_SYSTEM}, {"role": "user", "content": content}]

    def judge_messages(self, reasoning: str, count: int) -> list[dict[str, Any]]:
        messages: list[dict[str, Any]] = [{"role": "system", "content": JUDGE_SYSTEM}]
        for ex in self.examples:
            answer = {"verdicts": [{"segment": int(k), "spurious": bool(v)}
                                   for k, v in sorted(ex["verdicts"].items(), key=lambda kv: int(kv[0]))]}
            messages += [{"role": "user", "content": f"Segments: {ex['segments']}\nReview:\n{ex['critique']}"},
                         {"role": "assistant", "content": json.dumps(answer)}]
        messages.append({"role": "user", "content": f"Segments: {count}\nReview:\n{reasoning}"})
        return messages

    def __call__(self, sample: CritiqueSample) -> Verdicts:
        notes: list[str] = []
        messages = self.critic_messages(sample)
        reasoning = None
        for attempt in range(self.retries + 1):
            try:
                answer = self.critic.complete(messages, sample=attempt)
            except ChatRefusal as exc:
                notes.append(f"critic attempt {attempt + 1}: {exc}")
                continue
            if answer.finish_reason == "length":
                notes.append("the critic's answer was cut at max_tokens")
            reasoning = answer.text
            break
        if reasoning is None:
            raise ChatError(f"{sample.key}: the critic gave no answer after {self.retries + 1} attempts ({notes[-1]})")
        count = len(sample.shares)
        judge_messages = self.judge_messages(reasoning, count)
        response_format = _judge_schema(count) if self.structured else None
        for attempt in range(self.retries + 1):
            try:
                answer = self.judge.complete(judge_messages, sample=attempt, response_format=response_format)
                return Verdicts(parse_verdicts(answer.text, count), reasoning, answer.text, notes)
            except (ChatRefusal, MalformedVerdicts) as exc:
                notes.append(f"judge attempt {attempt + 1}: {exc}")
                log.warning("%s: %s", sample.key, notes[-1])
        raise ChatError(f"{sample.key}: no valid verdicts after {self.retries + 1} attempts ({notes[-1]})")


