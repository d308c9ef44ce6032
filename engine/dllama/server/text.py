"""From generated tokens to the text deltas a client sees.

    tokens -> StreamDecoder (whole characters) -> StopStrings (hold back a possible stop string,
    end at the first one) -> ReasoningSplitter (Qwen3's <think>...</think> -> reasoning_content)

Each stage only holds back what it must, so a stream shows text as soon as it is certain, and the
deltas joined equal the non-streaming answer.
"""
from __future__ import annotations

from typing import Iterable, NamedTuple, Sequence

THINK_OPEN = "<think>"
THINK_CLOSE = "</think>"

CONTENT = "content"
REASONING = "reasoning_content"


class Delta(NamedTuple):
    kind: str  # CONTENT or REASONING: the message field it extends
    text: str


class StopStrings:
    """Passes text through until one of `stops` appears; text that could be the start of one is
    held back until the next piece settles it. The stop string itself is never returned."""

    def __init__(self, stops: Sequence[str]) -> None:
        self.stops = [s for s in stops if s]
        self._longest = max((len(s) for s in self.stops), default=0)
        self._pending = ""

    def push(self, text: str) -> tuple[str, bool]:
        """(text that is certain, whether a stop string was found: nothing follows it)."""
        if not self.stops:
            return text, False
        self._pending += text
        hits = [i for i in (self._pending.find(s) for s in self.stops) if i >= 0]
        if hits:
            out, self._pending = self._pending[: min(hits)], ""
            return out, True
        keep = 0
        for k in range(min(len(self._pending), self._longest - 1), 0, -1):
            tail = self._pending[-k:]
            if any(s.startswith(tail) for s in self.stops):
                keep = k
                break
        cut = len(self._pending) - keep
        out, self._pending = self._pending[:cut], self._pending[cut:]
        return out, False

    def flush(self) -> str:
        out, self._pending = self._pending, ""
        return out


def reasoning_mode(prompt: str) -> str:
    """How a reply to this rendered chat prompt starts: "reasoning" when the prompt opened a
    <think> block (the model continues inside it), "content" when it holds a closed empty one
    (thinking switched off), else "detect" (the reply may open one itself)."""
    tail = prompt.rstrip()
    if tail.endswith(THINK_OPEN):
        return "reasoning"
    if tail.endswith(THINK_CLOSE):
        return "content"
    return "detect"


class ReasoningSplitter:
    """Splits a reply into reasoning (inside <think>...</think>) and content, as text arrives.

    Only a <think> at the very start of the reply (after whitespace) opens reasoning; the
    newlines just inside the block and just after it are dropped, as Qwen3's own template drops
    them when it renders the reply back into a conversation."""

    def __init__(self, mode: str = "detect") -> None:
        if mode not in ("detect", "reasoning", "content"):
            raise ValueError(f"unknown reasoning mode {mode!r}")
        self._state = "open" if mode == "reasoning" else mode  # detect, open, reasoning, after, content
        self._buffer = ""

    def push(self, text: str) -> list[Delta]:
        out: list[Delta] = []
        self._buffer += text
        while self._buffer:
            state, buf = self._state, self._buffer
            if state == "content":
                out.append(Delta(CONTENT, buf))
                self._buffer = ""
            elif state == "detect":
                head = buf.lstrip()
                if head.startswith(THINK_OPEN):
                    self._state, self._buffer = "open", head[len(THINK_OPEN):]
                elif THINK_OPEN.startswith(head):
                    break  # whitespace or a piece of "<think>": wait
                else:
                    self._state = "content"
            elif state in ("open", "after"):
                rest = buf.lstrip("\n")
                if not rest:
                    self._buffer = ""
                    break  # only newlines so far: they may all be dropped
                self._state, self._buffer = ("reasoning" if state == "open" else "content"), rest
            else:  # reasoning
                end = buf.find(THINK_CLOSE)
                if end >= 0:
                    out.append(Delta(REASONING, buf[:end].rstrip("\n")))
                    self._state, self._buffer = "after", buf[end + len(THINK_CLOSE):]
                    continue
                keep = _partial_suffix(buf, THINK_CLOSE)
                body = buf[: len(buf) - keep]
                held_newlines = len(body) - len(body.rstrip("\n"))  # dropped if </think> follows
                cut = len(body) - held_newlines
                out.append(Delta(REASONING, buf[:cut]))
                self._buffer = buf[cut:]
                break
        return _merge(out)

    def flush(self) -> list[Delta]:
        """What is held back at the end of the reply."""
        buf, self._buffer = self._buffer, ""
        if not buf:
            return []
        if self._state in ("open", "reasoning"):
            return [Delta(REASONING, buf)]
        if self._state == "after":
            return []
        return [Delta(CONTENT, buf)]


class ReplyText:
    """One reply: push(token) -> (deltas, stopped), then finish() -> the deltas held back."""

    def __init__(self, tokenizer, stops: Sequence[str] = (), reasoning: str | None = None) -> None:
        self._decoder = tokenizer.stream_decoder()
        self._stops = StopStrings(stops)
        self._splitter = ReasoningSplitter(reasoning) if reasoning is not None else None
        self.stopped = False  # a stop string ended the reply
        self._done = False

    def push(self, token: int) -> tuple[list[Delta], bool]:
        if self._done:
            return [], self.stopped
        text, self.stopped = self._stops.push(self._decoder.push(token))
        return self._split(text), self.stopped

    def finish(self) -> list[Delta]:
        if self._done:
            return []
        self._done = True
        deltas: list[Delta] = []
        if not self.stopped:
            text, self.stopped = self._stops.push(self._decoder.flush())
            if not self.stopped:
                text += self._stops.flush()
            deltas = self._split(text)
        if self._splitter is not None:
            deltas += self._splitter.flush()
        return _merge(deltas)

    def _split(self, text: str) -> list[Delta]:
        if self._splitter is None:
            return [Delta(CONTENT, text)] if text else []
        return self._splitter.push(text)


def join(deltas: Iterable[Delta]) -> dict[str, str]:
    """The message fields of a whole reply: {"content": ..., "reasoning_content": ...}."""
    fields = {CONTENT: "", REASONING: ""}
    for delta in deltas:
        fields[delta.kind] += delta.text
    return fields


def _partial_suffix(text: str, tag: str) -> int:
    """Length of the longest end of text that is a proper start of tag."""
    for k in range(min(len(text), len(tag) - 1), 0, -1):
        if tag.startswith(text[-k:]):
            return k
    return 0


def _merge(deltas: list[Delta]) -> list[Delta]:
    out: list[Delta] = []
    for delta in deltas:
        if not delta.text:
            continue
        if out and out[-1].kind == delta.kind:
            out[-1] = Delta(delta.kind, out[-1].text + delta.text)
        else:
            out.append(delta)
    return out
