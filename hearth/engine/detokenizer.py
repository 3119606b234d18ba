"""Incremental detokenization for streaming: never half a character, never (part of) a stop string.

Decodes only a short window of recent tokens per step (the vLLM/TGI prefix-offset idea).
"""

from __future__ import annotations

from hearth.tokenizer import Tokenizer

REPLACEMENT = "\ufffd"  # what a decoder writes for bytes that do not (yet) form a character
CONTEXT_TOKENS = 4  # tokens kept before the unread ones, so word-boundary decoders (SentencePiece ▁) see context


class IncrementalDetokenizer:
    """Turns a growing list of token ids into text chunks that are safe to stream.

    Text ending in U+FFFD waits for the tokens that complete the character. Text that could still become a stop
    string waits until it is resolved. Emitted chunks concatenate to the decoded output cut before the first stop.
    """

    def __init__(self, tokenizer: Tokenizer, prompt_ids: list[int] | None = None, skip_special_tokens: bool = True,
                 stop: list[str] | None = None) -> None:  # fmt: skip
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self.stop = [s for s in stop or [] if s]
        self.token_ids = list(prompt_ids or [])
        self.window_start = max(0, len(self.token_ids) - CONTEXT_TOKENS)
        self.num_window_chars = len(self._decode_window())  # characters of the window already taken (prompt text)
        self.pending = ""  # decoded text held back because it may start a stop string
        self.stopped = False

    def _decode_window(self) -> str:
        return self.tokenizer.decode(self.token_ids[self.window_start :], self.skip_special_tokens)

    def step(self, new_ids: list[int]) -> tuple[str, bool]:
        """Add generated ids; returns (text safe to emit now, whether a stop string was hit)."""
        if self.stopped:
            return "", True
        self.token_ids.extend(new_ids)
        text = self._decode_window()
        complete = len(text.rstrip(REPLACEMENT))  # a trailing U+FFFD may be a character still arriving
        if complete > self.num_window_chars:
            self.pending += text[self.num_window_chars : complete]
            self.num_window_chars = complete
        if complete == len(text) and len(self.token_ids) - self.window_start > 2 * CONTEXT_TOKENS:
            # everything decoded so far is final: slide the window, keeping a few tokens of context
            self.window_start = len(self.token_ids) - CONTEXT_TOKENS
            self.num_window_chars = len(self._decode_window())
        return self._release(final=False)

    def flush(self) -> str:
        """The held-back text once generation ends without a stop string (empty after a stop)."""
        if self.stopped:
            return ""
        text = self._decode_window()
        self.pending += text[self.num_window_chars :]
        self.num_window_chars = len(text)
        out, _ = self._release(final=True)
        return out

    def _release(self, final: bool) -> tuple[str, bool]:
        hit = self._find_stop(self.pending)
        if hit is not None:
            out, self.pending, self.stopped = self.pending[:hit], "", True
            return out, True
        keep = 0 if final else self._partial_stop_len(self.pending)
        cut = len(self.pending) - keep
        out, self.pending = self.pending[:cut], self.pending[cut:]
        return out, False

    def _find_stop(self, text: str) -> int | None:
        found = [i for i in (text.find(s) for s in self.stop) if i >= 0]
        return min(found) if found else None

    def _partial_stop_len(self, text: str) -> int:
        """Length of the longest end of `text` that is the beginning of some stop string."""
        best = 0
        for s in self.stop:
            for n in range(min(len(s) - 1, len(text)), best, -1):
                if text.endswith(s[:n]):
                    best = n
                    break
        return best
