"""A chat-completion call to any OpenAI-compatible endpoint, cached on disk.

Every answer is stored under `cache_dir/<sha256 of (model, messages, temperature, max_tokens, sample)>.json`
before it is used, so a rerun costs nothing and a crashed run resumes where it stopped. The cache holds
the request's model, messages and the answer text, never the API key (which is read from the environment
variable named by `api_key_env` and only handed to the client). Rate limits (429), timeouts and server
errors (5xx) are retried by the openai client with exponential backoff (`max_retries`).
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cft_lightning.data.mask_store import atomic_write

__all__ = ["CachedChat", "ChatError"]


class ChatError(RuntimeError):
    """The endpoint failed for good (after the client's retries)."""


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

    def key(self, messages: list[dict[str, str]], sample: int) -> str:
        payload = json.dumps({"model": self.model, "messages": messages, "temperature": self.temperature,
                              "max_tokens": self.max_tokens, "sample": sample}, sort_keys=True)
        return hashlib.sha256(payload.encode("utf-8")).hexdigest()

    def _openai(self) -> Any:
        if self._client is None:
            from openai import OpenAI

            key = os.environ.get(self.api_key_env) or "EMPTY"
            self._client = OpenAI(api_key=key, base_url=self.base_url, max_retries=self.max_retries,
                                  timeout=self.timeout)
        return self._client

    def __call__(self, messages: list[dict[str, str]], sample: int = 0) -> str:
        """The answer to `messages`; `sample` distinguishes repeated samples of the same prompt."""
        path = Path(self.cache_dir) / f"{self.key(messages, sample)}.json"
        if path.is_file():
            try:
                self.usage["cached"] += 1
                return json.loads(path.read_text(encoding="utf-8"))["answer"]
            except (ValueError, KeyError):
                path.unlink()  # a damaged entry is asked again
        import openai

        try:
            response = self._openai().chat.completions.create(
                model=self.model, messages=messages, temperature=self.temperature, max_tokens=self.max_tokens)
        except openai.APIError as exc:
            raise ChatError(f"{type(exc).__name__} from {self.base_url or 'the OpenAI API'}: {exc}") from exc
        answer = response.choices[0].message.content or ""
        self.usage["calls"] += 1
        if response.usage is not None:
            self.usage["prompt_tokens"] += int(response.usage.prompt_tokens or 0)
            self.usage["completion_tokens"] += int(response.usage.completion_tokens or 0)
        record = {"model": self.model, "messages": messages, "sample": sample, "answer": answer}
        text = json.dumps(record, indent=1) + "\n"
        atomic_write(path, lambda handle: handle.write(text.encode("utf-8")))
        return answer
