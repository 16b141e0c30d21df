"""`vidya chat --base-url URL`: the tutor's conversation in a terminal, streamed from any running
`vidya serve` (or other OpenAI-compatible server) over /v1/chat/completions, for a teacher
checking a server. Uses the server's tutor prompt when it has one."""
from __future__ import annotations

import json
import sys

import httpx


def read_question() -> str | None:
    """The student's next line; None on an empty line or end of input (both quit)."""
    try:
        line = input("\nछात्र> ").strip()
    except EOFError:
        return None
    return line or None


def _root(url: str) -> str:
    url = url.strip().rstrip("/")
    if "://" not in url:
        raise ValueError(f"--base-url {url!r} is not an http(s) URL; pass e.g. http://127.0.0.1:8000")
    return url.removesuffix("/v1")


def _system_prompt(client: httpx.Client, subject: str, klass: str, fallback: str) -> str:
    r = client.get("/tutor/system-prompt", params={"subject": subject, "klass": klass})
    if r.status_code == 400:
        raise ValueError(r.json()["error"]["message"])
    return r.json()["prompt"] if r.status_code == 200 else fallback


def _stream(client: httpx.Client, body: dict, out) -> tuple[str, str | None]:
    """Print the answer as it streams; returns (text, finish_reason). Raises ValueError for errors
    the user should read, and LookupError for a context that no longer fits."""
    text, reason = "", None
    with client.stream("POST", "/v1/chat/completions", json=body) as r:
        if r.status_code != 200:
            err = json.loads(r.read() or b"{}").get("error", {})
            if err.get("code") == "context_length_exceeded":
                raise LookupError(err.get("message"))
            hint = {401: " (pass --api-key)", 429: " (the server is busy; try again shortly)"}.get(r.status_code, "")
            raise ValueError(f"the server answered {r.status_code}: {err.get('message', r.reason_phrase)}{hint}")
        for line in r.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            for choice in chunk.get("choices", []):
                piece = choice.get("delta", {}).get("content") or ""
                out.write(piece)
                out.flush()
                text += piece
                reason = choice.get("finish_reason") or reason
    return text, reason


def run(base_url: str, api_key: str | None, subject: str, klass: str, system: str | None,
        max_tokens: int, temperature: float, model: str | None = None, fallback_system: str = "") -> int:
    """Chat with a running server: `system` if given, else the server's tutor prompt for the
    subject and class (`fallback_system` where the server has no tutor routes)."""
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    with httpx.Client(base_url=_root(base_url), headers=headers, timeout=httpx.Timeout(600, connect=10)) as client:
        try:
            models = client.get("/v1/models")
        except httpx.TransportError as e:
            raise ValueError(f"cannot reach {base_url}: is the server running? ({type(e).__name__})") from None
        if models.status_code != 200:
            raise ValueError(f"{base_url}/v1/models answered {models.status_code}"
                             + (": pass --api-key" if models.status_code == 401 else ""))
        model = model or models.json()["data"][0]["id"]
        system = system or _system_prompt(client, subject, klass, fallback_system)
        history: list[dict] = []
        print(f"vidya chat: {model} at {_root(base_url)}; type a question (Hindi or English); empty line or Ctrl-D to quit.")
        while (line := read_question()) is not None:
            history.append({"role": "user", "content": line})
            print("शिक्षक> ", end="", flush=True)
            while True:
                body = {"model": model, "stream": True, "max_tokens": max_tokens, "temperature": temperature,
                        "messages": [{"role": "system", "content": system}, *history]}
                try:
                    text, reason = _stream(client, body, sys.stdout)
                    break
                except LookupError:  # drop the oldest turn and ask again
                    if len(history) <= 1:
                        print("(this question is too long for the model's context)")
                        text, reason = "", None
                        break
                    history = history[2:]
            print("\n(cut at the length limit)" if reason == "length" else "")
            if text:
                history.append({"role": "assistant", "content": text})
            else:
                history.pop()
    return 0
