"""`cft concepts`: Label-Free CBM style concept discovery with any OpenAI-compatible chat model.

For every class, three prompt types (the visual features that identify it, its superclasses, the things
seen around it), `samples` answers each (LF-CBM: 2, temperature 0.7), parsed into lists, then the LF-CBM
filters (`filters.py`). The output is the concept bank (`bank.py`) the mask stage reads:

    {"format": "cft_lightning.concepts/1",
     "concepts": {"<class id>": ["<concept>", ...], ...},
     "provenance": {"model", "base_url", "prompts_sha256", "samples", "temperature", "filters", "embedder",
                    "counts": {class: {"raw", "kept"}}, "usage": {tokens}, "failed": {class: reason}}}

Class ids are the dataset's folder names (WNIDs for ImageNet); the prompts use their readable names. The
CFT paper uses gpt-4o-mini with LF-CBM's setup. A malformed answer (no list items) is asked again with a
new sample index, up to `malformed_retries` times, then that prompt is skipped for the class; a request
that keeps failing skips the class (recorded under `failed`). An endpoint that cannot be used at all
(unreachable, key missing or refused: `ChatUnavailable`) stops the run at the first request. The bank is
written whatever happened; the command exits with 1 when fewer than `--min_success` of the classes got a
concept (default: all of them), naming the ones that did not.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
from pathlib import Path
from typing import Any

from cft_lightning._tool_cli import Tool
from cft_lightning.concepts.bank import FORMAT, load_concept_bank, write_concept_bank
from cft_lightning.concepts.filters import Embedder, filter_concepts, sentence_transformer_embedder
from cft_lightning.concepts.llm import CachedChat, ChatRefusal
from cft_lightning.errors import ChatError, ChatUnavailable, CommandFailed, DataError

__all__ = ["PROMPTS", "TOOL", "concepts_command", "discover", "load_classes", "load_concept_bank", "main",
           "parse_list"]

log = logging.getLogger(__name__)

# Our own few-shot wording, in the spirit of LF-CBM's three prompt types (two worked examples each).
PROMPTS = {
    "features": (
        "Name the visual features that make something recognisable as the given object. Answer with a short "
        "list, one feature per line, each line starting with '- '.\n\n"
        "Object: zebra\n- black and white stripes\n- four legs\n- short upright mane\n- long face\n\n"
        "Object: teapot\n- spout\n- curved handle\n- lid\n- round body\n\n"
        "Object: {name}\n"
    ),
    "superclasses": (
        "Give the broader categories the given word belongs to, from specific to general. Answer with a short "
        "list, one category per line, each line starting with '- '.\n\n"
        "Word: zebra\n- equine\n- mammal\n- animal\n\n"
        "Word: teapot\n- kitchenware\n- container\n- object\n\n"
        "Word: {name}\n"
    ),
    "surroundings": (
        "Name the things most often seen around or together with the given object. Answer with a short list, "
        "one thing per line, each line starting with '- '.\n\n"
        "Object: zebra\n- grass\n- savanna\n- acacia tree\n- other zebras\n\n"
        "Object: teapot\n- cup\n- saucer\n- table\n- tray\n\n"
        "Object: {name}\n"
    ),
}

_BULLET = re.compile(r"^\s*(?:[-*\u2022\u2013]|\d+[.)]|[a-z][.)])\s+", re.IGNORECASE)


def parse_list(answer: str) -> list[str]:
    """List items of an answer: bullet or numbered lines, else a single comma-separated line; lower case,
    without trailing punctuation, quotes or a leading 'a'/'an'/'the'. Prose without a list gives []."""
    lines = [line.strip() for line in answer.replace("\r", "\n").split("\n") if line.strip()]
    items = [_BULLET.sub("", line) for line in lines if _BULLET.match(line)]
    if not items and len(lines) == 1 and "," in lines[0] and len(lines[0]) < 400:
        items = lines[0].split(",")
    out = []
    for item in items:
        item = item.strip().strip("\"'`*").rstrip(".;:,!").strip().lower()
        item = re.sub(r"^(a|an|the)\s+", "", item)
        if item and len(item.split()) <= 8:
            out.append(item)
    return list(dict.fromkeys(out))


def load_classes(spec: str) -> dict[str, str]:
    """{class id: readable name}: `imagenet` (WNIDs with timm's first lemma) or a text file with one class per
    line, `id<TAB>name` or just `name`."""
    if spec == "imagenet":
        from cft_lightning.data.image_folder import imagenet_class_names

        return imagenet_class_names()
    path = Path(spec)
    if not path.is_file():
        raise DataError(f"--classes: {spec} is neither 'imagenet' nor a file")
    classes = {}
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.strip():
            key, _, name = line.partition("\t")
            classes[key.strip()] = (name or key).strip().replace("_", " ")
    if not classes:
        raise DataError(f"--classes: {spec} lists no class")
    return classes


def _ask(chat: CachedChat, prompt: str, sample: int, malformed_retries: int) -> list[str]:
    for attempt in range(malformed_retries + 1):
        try:
            answer = chat.complete([{"role": "user", "content": prompt}], sample=sample + 1000 * attempt)
        except ChatRefusal as exc:  # a refusal or an empty answer: asked again like a malformed one
            log.warning("%s (prompt %r, sample %d, attempt %d)", exc, prompt[-60:], sample, attempt + 1)
            continue
        items = parse_list(answer.text)
        if answer.finish_reason == "length" and items:  # cut at max_tokens: the last item may be cut too
            log.warning("answer to %r cut at max_tokens: its last item %r is dropped", prompt[-60:], items[-1])
            items = items[:-1]
        if items:
            return items
        log.warning("no list in the answer to %r (sample %d, attempt %d)", prompt[-60:], sample, attempt + 1)
    return []


def discover(classes: dict[str, str], chat: CachedChat, embed: Embedder | None, samples: int = 2,
             malformed_retries: int = 2, max_length: int = 30, class_similarity: float = 0.85,
             duplicate_similarity: float = 0.9, progress: bool = True) -> dict[str, Any]:
    """Ask, parse and filter; returns the bank document (see the module docstring)."""
    from rich.progress import track

    raw: dict[str, list[str]] = {}
    failed: dict[str, str] = {}
    tokens: dict[str, int] = {}
    for cls, name in track(list(classes.items()), description="asking for concepts", disable=not progress):
        found: list[str] = []
        before = chat.usage["prompt_tokens"] + chat.usage["completion_tokens"]
        try:
            for template in PROMPTS.values():
                for sample in range(samples):
                    found += _ask(chat, template.format(name=name), sample, malformed_retries)
        except ChatUnavailable:
            raise
        except ChatError as exc:
            failed[cls] = str(exc)
            log.error("class %s (%s) skipped: %s", cls, name, exc)
            continue
        finally:
            tokens[cls] = chat.usage["prompt_tokens"] + chat.usage["completion_tokens"] - before
        raw[cls] = list(dict.fromkeys(found))
    bank, report = filter_concepts(raw, embed, max_length, class_similarity, duplicate_similarity, classes)
    return {
        "format": FORMAT,
        "concepts": bank,
        "provenance": {
            "model": chat.model,
            "base_url": chat.base_url,
            "prompts_sha256": hashlib.sha256(json.dumps(PROMPTS, sort_keys=True).encode()).hexdigest(),
            "samples": samples,
            "temperature": chat.temperature,
            "filters": {"max_length": max_length, "class_similarity": class_similarity if embed else None,
                        "duplicate_similarity": duplicate_similarity if embed else None},
            "counts": {c: {"raw": len(raw[c]), "kept": len(bank[c]), "tokens": tokens[c]} for c in raw},
            "filter_report": report,
            "usage": dict(chat.usage),
            "failed": failed,
        },
    }


def concepts_command(
    classes: str,
    out: str,
    model: str = "gpt-4o-mini",
    base_url: str | None = None,
    api_key_env: str = "OPENAI_API_KEY",
    cache: str | None = None,
    samples: int = 2,
    temperature: float = 0.7,
    max_length: int = 30,
    class_similarity: float = 0.85,
    duplicate_similarity: float = 0.9,
    embedder: str = "all-MiniLM-L6-v2",
    min_success: float = 1.0,
    no_progress: bool = False,
) -> None:
    """Discover concepts per class with an LLM (Label-Free CBM prompts and filters; the CFT paper uses
    gpt-4o-mini).

    Args:
        classes: 'imagenet' or a file: one class per line ('id<TAB>name' or name)
        out: concept bank JSON to write
        model: chat model (gpt-4o-mini: the CFT paper's)
        base_url: OpenAI-compatible endpoint, e.g. http://127.0.0.1:8000/v1 (null: $OPENAI_BASE_URL, else the
            OpenAI API)
        api_key_env: environment variable with the API key (never written anywhere)
        cache: answer cache folder (null: <out>.cache)
        samples: answers per prompt type and class (2: LF-CBM's)
        temperature: sampling temperature (0.7: LF-CBM's)
        max_length: longest concept in characters (30: LF-CBM's)
        class_similarity: drop concepts this similar to a class name (0.85: LF-CBM's)
        duplicate_similarity: drop concepts this similar to one already kept (0.9: LF-CBM's)
        embedder: sentence-transformers model for the similarity filters, or 'none' to skip them
        min_success: fraction of the classes that must get at least one concept, else exit 1 after writing the
            bank (1.0: every class; answers are cached, so a rerun asks only the failed ones again)
        no_progress: no progress bar
    """
    if not 0.0 <= min_success <= 1.0:
        raise DataError(f"--min_success must be a fraction in [0, 1], got {min_success}")
    class_names = load_classes(classes)
    path = Path(out)
    chat = CachedChat(model, cache or f"{path}.cache", base_url=base_url, api_key_env=api_key_env,
                      temperature=temperature)
    embed = None if embedder == "none" else sentence_transformer_embedder(embedder)
    doc = discover(class_names, chat, embed, samples, max_length=max_length, class_similarity=class_similarity,
                   duplicate_similarity=duplicate_similarity, progress=not no_progress)
    doc["provenance"]["embedder"] = embedder
    write_concept_bank(path, doc)
    usage = chat.usage
    kept = sum(len(v) for v in doc["concepts"].values())
    n = max(len(doc["concepts"]), 1)
    spent = usage["prompt_tokens"] + usage["completion_tokens"]
    print(f"cft concepts: {kept} concepts for {len(doc['concepts'])} classes in {path} "
          f"({usage['calls']} calls, {usage['cached']} cached, {usage['prompt_tokens']} + "
          f"{usage['completion_tokens']} tokens, {spent / n:.0f} per class; per class in provenance.counts; "
          f"{len(doc['provenance']['failed'])} class(es) failed)")
    without = [c for c in class_names if not doc["concepts"].get(c)]
    if len(class_names) - len(without) < min_success * len(class_names) or len(without) == len(class_names):
        failed = doc["provenance"]["failed"]
        examples = "; ".join(f"{c}: {failed.get(c, 'no concept survived the filters')}" for c in without[:3])
        raise CommandFailed(f"{len(without)} of {len(class_names)} classes have no concept in {path} (e.g. "
                            f"{examples}); --min_success is {min_success:g}. A rerun asks only the failed ones "
                            "again (answers are cached); lower --min_success to accept the bank as it is")


TOOL = Tool(concepts_command, prog="cft concepts", epilog=(
    "Then: `cft concepts validate --bank BANK --images FOLDER --out VALIDATED` keeps the concepts the grounding "
    "models find often and on the object (the paper's occurrence and coverage filters; `cft concepts validate "
    "--help`), and `cft masks generate` grounds them in every training image."))


def main(argv: list[str] | None = None) -> None:
    """Entry point of `cft concepts` (and `cft concepts validate`): flags, or a YAML file with --config."""
    if argv and argv[0] == "validate":
        # one-way (validate.py reads the bank through bank.py, never this module); imported here so that
        # `cft concepts --help` does not load numpy and the mask store
        from cft_lightning.concepts.validate import main as validate_main

        validate_main(argv[1:])
        return
    TOOL(argv)
