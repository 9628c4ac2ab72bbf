"""A client of an OpenAI-compatible inference server that returns per-token log-probabilities (vLLM first).

What the study asks of a served target, and how (vLLM's OpenAI-compatible server, ``/v1`` routes and its own):

=====================  ==============================================================================================
call                   request
=====================  ==============================================================================================
:meth:`tokenize`       ``POST /tokenize`` with ``messages`` and ``add_generation_prompt``: the server applies the
                       model's own chat template and tokenizer, so the prompt is what a chat request would run
:meth:`greedy`         ``POST /v1/completions`` with the prompt as token ids, ``temperature 0``, ``logprobs K``,
                       ``return_tokens_as_token_ids`` (ids, not strings: strings collapse distinct tokens) and
                       ``return_token_ids``: the greedy continuation and, per step, the K most probable tokens with
                       their log-probabilities (log-softmax over the whole vocabulary, before any sampling
                       processing: vLLM's default ``logprobs_mode`` is ``raw_logprobs``)
:meth:`score`          ``POST /v1/completions`` with ``prompt_logprobs K`` and ``max_tokens 1``: teacher-forced
                       log-probabilities along a given text (a served drafter scored along the target's greedy
                       text); each position also carries the actual next token's log-probability and rank
:meth:`metrics`        ``GET /metrics``: Prometheus counters (the engine's own speculative decoding)
=====================  ==============================================================================================

Requests run on a bounded pool of threads (``concurrency``), spread over one or more server URLs (replicas of one
model) in turn. Transient failures (a connection refused or reset, a timeout, HTTP 429 or 5xx) are retried with
exponential backoff on the next replica; anything else is a :class:`ServedError` with one line saying what was wrong
and what to do.
"""

from __future__ import annotations

import itertools
import threading
import time
from dataclasses import dataclass
from urllib.parse import urlsplit

import httpx
import numpy as np

# Seconds before the first retry; each further one waits twice as long.
BACKOFF = 0.5


class ServedError(RuntimeError):
    """A served target failed in a way a retry does not fix (one line: what, and what to do)."""


@dataclass
class Continuation:
    """The target's greedy continuation of one prompt, with the K most probable tokens of every step."""

    prompt: list[int]
    tokens: list[int]  # [T] generated token ids (the greedy token of each step)
    top_ids: np.ndarray  # [T, K] int64, most probable first
    top_logprobs: np.ndarray  # [T, K] float64, log p over the whole vocabulary, descending
    finish_reason: str  # "length" or "stop"


@dataclass
class Scores:
    """Teacher-forced log-probabilities of a text: row t is the distribution of token ``start + t`` given the
    tokens before it."""

    top_ids: np.ndarray  # [T, K] int64
    top_logprobs: np.ndarray  # [T, K] float64, descending
    token_logprob: np.ndarray  # [T] float64, log p of the text's own token there
    token_rank: np.ndarray  # [T] int64, its rank (1 = most probable)


def _base(url: str) -> str:
    """The server's root from a URL given as ``http://host:port`` or ``http://host:port/v1``."""
    parts = urlsplit(url.strip())
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise ValueError(f"served target {url!r}: give the server's URL, e.g. http://127.0.0.1:8000/v1")
    path = parts.path.rstrip("/")
    if path.endswith("/v1"):
        path = path[: -len("/v1")]
    return f"{parts.scheme}://{parts.netloc}{path}"


def is_served(spec: str) -> bool:
    """Whether a target spec names a served model (one or more comma-separated server URLs)."""
    return spec.strip().startswith(("http://", "https://"))


def _token_id(key: str) -> int:
    """A token id from vLLM's ``token_id:123`` (``return_tokens_as_token_ids``) or a bare ``123``."""
    return int(key.rpartition(":")[2])


class ServedModel:
    """A model served by one or more OpenAI-compatible servers (replicas), asked over HTTP.

    Args:
        urls: the servers, ``http://host:port[/v1]`` each (comma-separated in a target spec).
        model: the served model name; default the only one the first server serves.
        concurrency: requests in flight at once (:meth:`map`).
        timeout: seconds a request may take before it is retried.
        retries: attempts after the first on transient failures, each on the next replica.
        transport: an ``httpx`` transport to send requests through (default: the network).
    """

    def __init__(self, urls: list[str] | str, model: str | None = None, concurrency: int = 4,
                 timeout: float = 600.0, retries: int = 4, transport: httpx.BaseTransport | None = None):
        if isinstance(urls, str):
            urls = [u for u in urls.split(",") if u.strip()]
        if not urls:
            raise ValueError("a served target needs at least one server URL, e.g. http://127.0.0.1:8000/v1")
        if concurrency < 1 or timeout <= 0 or retries < 0:
            raise ValueError("--concurrency must be >= 1, --timeout > 0 and --retries >= 0")
        self.bases = [_base(u) for u in urls]
        self.concurrency, self.timeout, self.retries = concurrency, timeout, retries
        self._http = httpx.Client(timeout=timeout, limits=httpx.Limits(max_connections=concurrency + 2),
                                  transport=transport)
        self._turn = itertools.count()
        self._lock = threading.Lock()
        self.model = model or ""
        self.name = ",".join(urls)

    def close(self) -> None:
        self._http.close()

    def _request(self, method: str, path: str, body: dict | None = None) -> dict | str:
        """One request on the next replica, retried on transient failures; the parsed JSON (or text) reply."""
        last = ""
        for attempt in range(self.retries + 1):
            with self._lock:
                base = self.bases[next(self._turn) % len(self.bases)]
            try:
                reply = self._http.request(method, base + path, json=body)
            except httpx.TimeoutException:
                last = f"{base} did not answer within {self.timeout:g} s (raise --timeout, or lower --concurrency)"
            except httpx.TransportError as e:
                last = f"cannot reach {base} ({type(e).__name__}: {e}); is the server running?"
            else:
                if reply.status_code < 400:
                    return reply.json() if "json" in reply.headers.get("content-type", "") else reply.text
                message = _error_message(reply)
                if reply.status_code != 429 and reply.status_code < 500:
                    raise ServedError(f"{base}{path} refused the request (HTTP {reply.status_code}): {message}")
                last = f"{base}{path} failed (HTTP {reply.status_code}): {message}"
            if attempt < self.retries:
                time.sleep(BACKOFF * 2**attempt)
        raise ServedError(f"{last} (after {self.retries + 1} attempts)")

    def check(self) -> dict:
        """Ask every server which models it serves; pick or check :attr:`model`. Returns the model's entry of
        ``/v1/models`` (``id``, ``root``: the path or hub id it was loaded from, ``max_model_len``)."""
        entry = None
        for base in self.bases:
            reply = self._on(base, "GET", "/v1/models")
            served = {m["id"]: m for m in reply.get("data", [])}
            if not self.model:
                if len(served) != 1:
                    raise ServedError(f"{base} serves {len(served)} models ({', '.join(served) or 'none'}); "
                                      "name one with --served-model")
                self.model = next(iter(served))
            if self.model not in served:
                raise ServedError(f"{base} does not serve model {self.model!r} (it serves "
                                  f"{', '.join(served) or 'none'}); fix --served-model")
            entry = entry or served[self.model]
        return entry

    def _on(self, base: str, method: str, path: str) -> dict:
        """A request to one given server (no replica rotation), with the same retries."""
        saved, self.bases = self.bases, [base]
        try:
            return self._request(method, path)
        finally:
            self.bases = saved

    def tokenize(self, messages: list[dict]) -> list[int]:
        """Token ids of a chat (``[{"role": ..., "content": ...}]``) through the server's chat template, with the
        generation prompt added (the assistant's turn opened), as a chat completion would run it."""
        reply = self._request("POST", "/tokenize", {"model": self.model, "messages": messages,
                                                    "add_generation_prompt": True})
        return [int(t) for t in reply["tokens"]]

    def greedy(self, prompt: list[int], max_tokens: int, k: int) -> Continuation:
        """The greedy continuation of ``prompt`` (token ids) with the ``k`` most probable tokens of each step."""
        reply = self._request("POST", "/v1/completions", {
            "model": self.model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0.0, "logprobs": k,
            "return_tokens_as_token_ids": True, "return_token_ids": True, "skip_special_tokens": False})
        choice = reply["choices"][0]
        tops = choice["logprobs"]["top_logprobs"]
        tokens = [int(t) for t in choice.get("token_ids") or [_token_id(t) for t in choice["logprobs"]["tokens"]]]
        ids, logprobs = _top_arrays([{_token_id(key): v for key, v in top.items()} for top in tops], k, "logprobs")
        return Continuation(list(prompt), tokens, ids, logprobs, choice.get("finish_reason") or "length")

    def score(self, tokens: list[int], start: int, k: int) -> Scores:
        """Teacher-forced log-probabilities of ``tokens[start:]`` given what precedes each (``start >= 1``): the
        ``k`` most probable tokens at each position, and the actual token's log-probability and rank."""
        reply = self._request("POST", "/v1/completions", {
            "model": self.model, "prompt": tokens, "max_tokens": 1, "temperature": 0.0, "prompt_logprobs": k,
            "return_tokens_as_token_ids": True})
        rows = reply["choices"][0]["prompt_logprobs"] or reply.get("prompt_logprobs")
        own = [rows[i][str(tokens[i])] for i in range(start, len(tokens))]
        # each position holds the top k and the actual token, which may be one of them or an extra entry
        tops = [{_token_id(key): v["logprob"] for key, v in rows[i].items() if v["rank"] <= k}
                for i in range(start, len(tokens))]
        ids, logprobs = _top_arrays(tops, k, "prompt_logprobs")
        return Scores(ids, logprobs, np.array([o["logprob"] for o in own], dtype=np.float64),
                      np.array([o["rank"] for o in own], dtype=np.int64))

    def metrics(self) -> str:
        """The Prometheus text of every server's ``/metrics``, concatenated."""
        return "\n".join(str(self._on(base, "GET", "/metrics")) for base in self.bases)


def _error_message(reply: httpx.Response) -> str:
    """The one-line message of an OpenAI-style error reply (or its first line of text)."""
    try:
        body = reply.json()
        message = body.get("error", {}).get("message") if isinstance(body.get("error"), dict) else body.get("message")
        message = message or body.get("detail") or str(body)
    except ValueError:
        message = reply.text
    return " ".join(str(message).split())[:300]


def _top_arrays(tops: list[dict[int, float]], k: int, what: str) -> tuple[np.ndarray, np.ndarray]:
    """``[T, k]`` ids and log-probabilities (descending) from per-step dicts; refused when a step holds fewer than
    ``k`` (a server that caps log-probabilities below what was asked)."""
    n = len(tops)
    ids, logprobs = np.zeros((n, k), dtype=np.int64), np.zeros((n, k), dtype=np.float64)
    for t, top in enumerate(tops):
        if len(top) < k:
            raise ServedError(f"the server returned {len(top)} {what} at a step where {k} were asked; start vLLM "
                              f"with --max-logprobs {k} (or -1 for every token), or ask fewer with --logprobs")
        best = sorted(top.items(), key=lambda item: -item[1])[:k]
        ids[t] = [i for i, _ in best]
        logprobs[t] = [v for _, v in best]
    return ids, logprobs
