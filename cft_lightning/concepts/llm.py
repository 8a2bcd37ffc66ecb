"""A chat-completion call to any OpenAI-compatible endpoint, cached on disk.

Every answer is stored under `cache_dir/<sha256 of (model, messages, temperature, max_tokens, sample)>.json`
before it is used, so a rerun costs nothing and a crashed run resumes where it stopped. The cache holds
the request's model, messages and the answer text, never the API key (which is read from the environment
variable named by `api_key_env` and only handed to the client). Rate limits (429), timeouts and server
errors (5xx) are retried by the openai client with exponential backoff (`max_retries`). An endpoint that
cannot be used at all (unreachable, key missing or refused, unknown model) raises `ChatUnavailable`, which
the commands do not skip per item: they stop at once with one line saying what to set. Until the endpoint
has answered once, an unreachable server is tried only twice, so a wrong `--base_url` fails in seconds, not
after a minute of retries per item. Images in the
messages (data URLs) are stored in the cache record as their sha256, not their bytes. A refusal or an empty
answer raises `ChatRefusal` and is not cached (a rerun asks again).
"""

from __future__ import annotations

import hashlib
import json
import os
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cft_lightning._io import atomic_write
from cft_lightning.errors import ChatError, ChatUnavailable

__all__ = ["CachedChat", "ChatAnswer", "ChatError", "ChatRefusal", "ChatUnavailable"]


class ChatRefusal(ChatError):
    """The model refused, or answered nothing."""


@dataclass
class ChatAnswer:
    """An answer: its text, why generation stopped (`stop`, `length`, ...) and whether it came from the cache."""

    text: str
    finish_reason: str | None = None
    cached: bool = False


def _redact_images(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The messages with every data-URL image replaced by `sha256:<digest>` (for the cache record)."""
    out = []
    for message in messages:
        content = message.get("content")
        if isinstance(content, list):
            parts = []
            for part in content:
                url = part.get("image_url", {}).get("url", "") if isinstance(part, dict) else ""
                if url.startswith("data:"):
                    digest = hashlib.sha256(url.encode("ascii", "replace")).hexdigest()
                    part = {**part, "image_url": {**part["image_url"], "url": f"sha256:{digest}"}}
                parts.append(part)
            message = {**message, "content": parts}
        out.append(message)
    return out


@dataclass
class CachedChat:
    """`chat(messages, sample)` -> answer text, from the cache or the endpoint.

    Attributes:
        model: model name as the endpoint knows it (the CFT paper: gpt-4o-mini).
        cache_dir: folder of cached answers.
        base_url: endpoint (None: the client's default, or `OPENAI_BASE_URL`).
        api_key_env: environment variable holding the key (local servers accept any string; default "EMPTY").
        temperature, max_tokens: sampling settings (LF-CBM: 0.7, 256).
        max_retries, timeout: the openai client's retry budget and per-request timeout in seconds.
    """

    model: str
    cache_dir: str | os.PathLike[str]
    base_url: str | None = None
    api_key_env: str = "OPENAI_API_KEY"
    temperature: float = 0.7
    max_tokens: int = 256
    max_retries: int = 6
    timeout: float = 60.0
    usage: dict[str, int] = field(default_factory=lambda: {"calls": 0, "cached": 0, "prompt_tokens": 0,
                                                            "completion_tokens": 0})
    _client: Any = None
    _lock: Any = field(default_factory=threading.Lock, repr=False)
    _answered: bool = False  # the endpoint has answered once: from then on, full retries

    def endpoint(self) -> str:
        """Where requests go, for messages: `--base_url`, else `OPENAI_BASE_URL`, else the OpenAI API."""
        return self.base_url or os.environ.get("OPENAI_BASE_URL") or "the OpenAI API (https://api.openai.com/v1)"

    def key(self, messages: list[dict[str, Any]], sample: int, response_format: dict[str, Any] | None = None) -> str:
        request = {"model": self.model, "messages": messages, "temperature": self.temperature,
                   "max_tokens": self.max_tokens, "sample": sample}
        if response_format is not None:
            request["response_format"] = response_format
        payload = json.dumps(request, sort_keys=True)
        return hashlib.sha256(payload.encode("utf-8")).hexdigest()

    def __getstate__(self) -> dict[str, Any]:
        """Pickled (e.g. into ddp_spawn processes) without its lock and client: each process makes its own."""
        return {k: v for k, v in self.__dict__.items() if k not in ("_lock", "_client")}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state, _lock=threading.Lock(), _client=None)

    def _openai(self) -> Any:
        with self._lock:
            if self._client is None:
                from openai import OpenAI

                key = os.environ.get(self.api_key_env)
                if not key and not (self.base_url or os.environ.get("OPENAI_BASE_URL")):
                    raise ChatUnavailable(
                        f"no API key: ${self.api_key_env} is not set. Set it (or name another variable with "
                        "--api_key_env), or point --base_url at an OpenAI-compatible server "
                        "(e.g. http://127.0.0.1:8000/v1)")
                key = key or "EMPTY"  # local servers usually accept any key; a refusal is reported below
                self._client = OpenAI(api_key=key, base_url=self.base_url, max_retries=self.max_retries,
                                      timeout=self.timeout)
        return self._client

    def _classify(self, exc: Exception) -> ChatError:
        """A failed request as `ChatUnavailable` (stop the command) or `ChatError` (skip this item)."""
        import openai

        where = self.endpoint()
        if isinstance(exc, openai.APIConnectionError) and not isinstance(exc, openai.APITimeoutError):
            return ChatUnavailable(f"cannot reach {where} ({exc}): is the server running? Set --base_url to "
                                   "the OpenAI-compatible endpoint (e.g. http://127.0.0.1:8000/v1)")
        if isinstance(exc, (openai.AuthenticationError, openai.PermissionDeniedError)):
            state = "is not set" if not os.environ.get(self.api_key_env) else "was refused"
            return ChatUnavailable(f"{where} refused the request ({exc.status_code}): the API key in "
                                   f"${self.api_key_env} {state}; set it, or name another variable with --api_key_env")
        if isinstance(exc, openai.NotFoundError):
            return ChatUnavailable(f"{where} answered 404 for model {self.model!r} ({exc}): check the model name "
                                   "and --base_url")
        return ChatError(f"{type(exc).__name__} from {where}: {exc}")

    def __call__(self, messages: list[dict[str, Any]], sample: int = 0) -> str:
        """The answer text to `messages`; `sample` distinguishes repeated samples of the same prompt."""
        return self.complete(messages, sample).text

    def complete(self, messages: list[dict[str, Any]], sample: int = 0,
                 response_format: dict[str, Any] | None = None) -> ChatAnswer:
        """The answer to `messages` (from the cache if asked before), with its finish reason."""
        path = Path(self.cache_dir) / f"{self.key(messages, sample, response_format)}.json"
        if path.is_file():
            try:
                record = json.loads(path.read_text(encoding="utf-8"))
                answer = ChatAnswer(record["answer"], record.get("finish_reason"), cached=True)
                with self._lock:
                    self.usage["cached"] += 1
                return answer
            except (ValueError, KeyError):
                path.unlink()  # a damaged entry is asked again
        import openai

        extra = {} if response_format is None else {"response_format": response_format}
        client = self._openai()
        if not self._answered:  # a server that is not there should not cost a minute of backoff
            client = client.with_options(max_retries=min(self.max_retries, 1))
        try:
            response = client.chat.completions.create(
                model=self.model, messages=messages, temperature=self.temperature, max_tokens=self.max_tokens,
                **extra)
        except openai.APIError as exc:
            raise self._classify(exc) from exc
        self._answered = True
        with self._lock:  # the critique stage calls from several threads
            self.usage["calls"] += 1
            if response.usage is not None:
                self.usage["prompt_tokens"] += int(response.usage.prompt_tokens or 0)
                self.usage["completion_tokens"] += int(response.usage.completion_tokens or 0)
        if not response.choices:
            raise ChatRefusal(f"{self.model} returned no choices")
        choice = response.choices[0]
        refusal = getattr(choice.message, "refusal", None)
        if refusal:
            raise ChatRefusal(f"{self.model} refused: {refusal}")
        answer = choice.message.content or ""
        if not answer.strip():
            raise ChatRefusal(f"{self.model} returned an empty answer (finish_reason {choice.finish_reason!r})")
        record = {"model": self.model, "messages": _redact_images(messages), "sample": sample, "answer": answer,
                  "finish_reason": choice.finish_reason}
        text = json.dumps(record, indent=1) + "\n"
        atomic_write(path, lambda handle: handle.write(text.encode("utf-8")))
        return ChatAnswer(answer, choice.finish_reason)
