"""A local OpenAI-compatible vision endpoint for the critique tests (127.0.0.1, no network)."""

from __future__ import annotations

import json
import re
import threading
import time
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

SECRET = "sk-critique-secret-987654321"


class VisionStub:
    """Critic answers by the class in the prompt: `good` reviews at once, `refuser` refuses first, `mumbler`'s
    judge answers prose first, `sleeper` never answers in time, `blank` always answers nothing. The judge
    reads 'Segment k: spurious' lines of the review."""

    def __init__(self) -> None:
        self.calls: Counter[str] = Counter()
        self.requests: list[dict] = []
        self.auth: set[str] = set()
        self.lock = threading.Lock()

    def reply(self, body: dict) -> tuple[dict | None, float]:
        system = body["messages"][0]["content"]
        last = body["messages"][-1]["content"]
        if system.startswith("You review"):
            label = re.search(r"True class: (\w+)", last[0]["text"]).group(1)
            with self.lock:
                self.calls["critic:" + label] += 1
                n = self.calls["critic:" + label]
            if label == "sleeper":
                return None, 3.0
            if label == "blank" or (label == "refuser" and n == 1):
                return {"role": "assistant", "content": None, "refusal": "I can't help with that."}, 0
            count = int(re.search(r"split into (\d+) segments", last[0]["text"]).group(1))
            verdicts = " ".join(f"Segment {k}: {'spurious' if k == count else 'relevant'}."
                                for k in range(1, count + 1))
            return {"role": "assistant", "content": f"1. Observe: a {label} creature.\n6. Verdict: {verdicts}"}, 0
        label = "mumbler" if "mumbler" in json.dumps(body["messages"][-1]) else "other"
        with self.lock:
            self.calls["judge:" + label] += 1
            n = self.calls["judge:" + label]
        if label == "mumbler" and n == 1:
            return {"role": "assistant", "content": "Segment 2 looks spurious to me."}, 0
        count = int(re.search(r"Segments: (\d+)", last).group(1))
        spurious = {int(k) for k in re.findall(r"Segment (\d+): spurious", last)}
        answer = {"verdicts": [{"segment": k, "spurious": k in spurious} for k in range(1, count + 1)]}
        return {"role": "assistant", "content": "```json\n" + json.dumps(answer) + "\n```"}, 0


def serve(stub: VisionStub) -> ThreadingHTTPServer:
    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args) -> None:
            pass

        def do_POST(self) -> None:
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            with stub.lock:
                stub.requests.append(body)
                stub.auth.add(self.headers.get("Authorization", ""))
            message, delay = stub.reply(body)
            if delay:
                time.sleep(delay)
            if message is None:
                return
            payload = {"id": "x", "object": "chat.completion", "created": 0, "model": body["model"],
                       "choices": [{"index": 0, "finish_reason": "stop", "message": message}],
                       "usage": {"prompt_tokens": 100, "completion_tokens": 20, "total_tokens": 120}}
            data = json.dumps(payload).encode()
            try:
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)
            except OSError:
                pass  # the client gave up (timeout)

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server
