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

import argparse
import hashlib
import json
import logging
import re
from pathlib import Path
from typing import Any

from cft_lightning.concepts.bank import FORMAT, load_concept_bank, write_concept_bank
from cft_lightning.concepts.filters import Embedder, filter_concepts, sentence_transformer_embedder
from cft_lightning.concepts.llm import CachedChat, ChatRefusal
from cft_lightning.errors import ChatError, ChatUnavailable, CommandFailed, DataError

__all__ = ["PROMPTS", "discover", "load_classes", "load_concept_bank", "main", "parse_list"]

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


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="cft concepts", description="Discover concepts per class with an LLM (Label-Free CBM prompts and "
        "filters; the CFT paper uses gpt-4o-mini).",
        epilog="Then: `cft concepts validate --bank BANK --images FOLDER --out VALIDATED` keeps the concepts "
        "the grounding models find often and on the object (the paper's occurrence and coverage filters; "
        "`cft concepts validate --help`), and `cft masks generate` grounds them in every training image.")
    p.add_argument("--classes", required=True, help="'imagenet' or a file: one class per line ('id<TAB>name' or name)")
    p.add_argument("--out", required=True, help="concept bank JSON to write")
    p.add_argument("--model", default="gpt-4o-mini", help="chat model (default: %(default)s, as the CFT paper)")
    p.add_argument("--base_url", default=None, help="OpenAI-compatible endpoint, e.g. http://127.0.0.1:8000/v1 "
                   "(default: $OPENAI_BASE_URL, else the OpenAI API)")
    p.add_argument("--api_key_env", default="OPENAI_API_KEY",
                   help="environment variable with the API key (default: %(default)s; never written anywhere)")
    p.add_argument("--cache", default=None, help="answer cache folder (default: <out>.cache)")
    p.add_argument("--samples", type=int, default=2,
                   help="answers per prompt type and class (default: %(default)s, LF-CBM's)")
    p.add_argument("--temperature", type=float, default=0.7, help="sampling temperature (default: %(default)s, "
                   "LF-CBM's)")
    p.add_argument("--max_length", type=int, default=30,
                   help="longest concept in characters (default: %(default)s, LF-CBM's)")
    p.add_argument("--class_similarity", type=float, default=0.85,
                   help="drop concepts this similar to a class name (default: %(default)s, LF-CBM's)")
    p.add_argument("--duplicate_similarity", type=float, default=0.9,
                   help="drop concepts this similar to one already kept (default: %(default)s, LF-CBM's)")
    p.add_argument("--embedder", default="all-MiniLM-L6-v2",
                   help="sentence-transformers model for the similarity filters, or 'none' to skip them "
                   "(default: %(default)s)")
    p.add_argument("--min_success", type=float, default=1.0,
                   help="fraction of the classes that must get at least one concept, else exit 1 after writing "
                   "the bank (default: %(default)s, every class; answers are cached, so a rerun asks only again)")
    p.add_argument("--no_progress", action="store_true", help="no progress bar")
    return p


def main(argv: list[str] | None = None) -> None:
    """Entry point of `cft concepts` (and `cft concepts validate`)."""
    if argv and argv[0] == "validate":
        # one-way (validate.py reads the bank through bank.py, never this module); imported here so that
        # `cft concepts --help` does not load numpy and the mask store
        from cft_lightning.concepts.validate import main as validate_main

        validate_main(argv[1:])
        return
    args = _parser().parse_args(argv)
    if not 0.0 <= args.min_success <= 1.0:
        raise DataError(f"--min_success must be a fraction in [0, 1], got {args.min_success}")
    classes = load_classes(args.classes)
    out = Path(args.out)
    chat = CachedChat(args.model, args.cache or f"{out}.cache", base_url=args.base_url, api_key_env=args.api_key_env,
                      temperature=args.temperature)
    embed = None if args.embedder == "none" else sentence_transformer_embedder(args.embedder)
    doc = discover(classes, chat, embed, args.samples, max_length=args.max_length,
                   class_similarity=args.class_similarity, duplicate_similarity=args.duplicate_similarity,
                   progress=not args.no_progress)
    doc["provenance"]["embedder"] = args.embedder
    write_concept_bank(out, doc)
    usage = chat.usage
    kept = sum(len(v) for v in doc["concepts"].values())
    n = max(len(doc["concepts"]), 1)
    spent = usage["prompt_tokens"] + usage["completion_tokens"]
    print(f"cft concepts: {kept} concepts for {len(doc['concepts'])} classes in {out} "
          f"({usage['calls']} calls, {usage['cached']} cached, {usage['prompt_tokens']} + "
          f"{usage['completion_tokens']} tokens, {spent / n:.0f} per class; per class in provenance.counts; "
          f"{len(doc['provenance']['failed'])} class(es) failed)")
    without = [c for c in classes if not doc["concepts"].get(c)]
    if len(classes) - len(without) < args.min_success * len(classes) or len(without) == len(classes):
        failed = doc["provenance"]["failed"]
        examples = "; ".join(f"{c}: {failed.get(c, 'no concept survived the filters')}" for c in without[:3])
        raise CommandFailed(f"{len(without)} of {len(classes)} classes have no concept in {out} (e.g. {examples}); "
                            f"--min_success is {args.min_success:g}. A rerun asks only the failed ones again "
                            "(answers are cached); lower --min_success to accept the bank as it is")
