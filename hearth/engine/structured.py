"""Grammar-constrained decoding: one llguidance matcher per constrained sequence, their token masks every step.

llguidance compiles JSON Schema, regex and Lark grammars against a vocabulary and computes, for a parser state, which
tokens keep the output inside the grammar (one bit per token), in Rust threads that release the GIL. Writing that by
hand (an Earley parser over a lexer over the token trie) is what llguidance exists for; this module only wires it in:

- `GrammarCompiler`, one per tokenizer and shared by the API's worker threads (which compile a request's grammar to
  refuse a bad one with a 400) and the engine thread: llguidance's tokenizer is built once from the HF `tokenizers`
  backend (an HF folder's or one built from a GGUF vocabulary), and each distinct grammar is compiled once (an LRU of
  prototype matchers keyed by kind and source); every sequence gets a copy.
- `SequenceGrammar`, one per constrained sequence: it waits for its trigger (token ids in the output, such as the end
  of the reasoning), then advances its matcher with each committed token and says when the grammar is complete.
- `Grammars`, one per engine: `start(seqs)` computes the masks of a step's constrained rows in one llguidance call on a
  background thread while the model runs its forward pass; `MaskJob.result()` gives them to the sampler as a boolean
  [rows, vocab] tensor of the tokens each row may not pick. Sequences without a grammar never reach this module.
"""

from __future__ import annotations

import json
import threading
import weakref
from collections import OrderedDict
from concurrent.futures import Future, ThreadPoolExecutor
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from hearth.sampling_params import Grammar

if TYPE_CHECKING:
    from hearth.engine.sequence import Sequence

# JSON as json.dumps writes it (", " and ": ", no other whitespace): a sampled model cannot pad the output with
# whitespace until max_tokens runs out, and the text reads like ordinary JSON
JSON_STYLE = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}
CACHE_SIZE = 64  # compiled grammars kept per tokenizer


class GrammarError(ValueError):
    """A grammar llguidance cannot compile or does not support; the message says what (a schema keyword, a regex)."""


def llguidance_grammar(kind: str, source: str) -> str:
    """The llguidance grammar text for one of Grammar's kinds."""
    from llguidance import LLMatcher

    if kind in ("json_schema", "json_object"):
        schema = source if kind == "json_schema" else '{"type": "object"}'
        try:
            return LLMatcher.grammar_from_json_schema(schema, defaults=JSON_STYLE)
        except ValueError as e:
            raise GrammarError(f"the JSON schema is not a JSON object: {e}") from None
    if kind == "regex":
        return LLMatcher.grammar_from_regex(source)
    return LLMatcher.grammar_from_lark(source)


class GrammarCompiler:
    """Compiles grammars against one tokenizer's vocabulary; thread-safe."""

    def __init__(self, tokenizer: Any) -> None:
        from llguidance import LLExecutor, LLTokenizer

        backend = getattr(tokenizer, "backend", None)
        if backend is None:
            raise GrammarError("structured output needs a tokenizer built on HF tokenizers")
        eos = list(getattr(tokenizer, "eos_token_ids", []) or []) or None
        self.ll_tokenizer = LLTokenizer(backend.to_str(), eos_token=eos)
        self.vocab_size = self.ll_tokenizer.vocab_size
        self.executor = LLExecutor()
        self._lock = threading.Lock()
        self._cache: OrderedDict[tuple[str, str], Any] = OrderedDict()

    def matcher(self, grammar: Grammar) -> Any:
        """A fresh matcher for `grammar` (compiled on first use); GrammarError when it does not compile."""
        from llguidance import LLMatcher

        key = (grammar.kind, grammar.source)
        with self._lock:
            proto = self._cache.get(key)
            if proto is not None:
                self._cache.move_to_end(key)
                return proto.deep_copy()
        proto = LLMatcher(self.ll_tokenizer, llguidance_grammar(grammar.kind, grammar.source), log_level=0)
        if proto.is_error():
            raise GrammarError(proto.get_error().strip())
        with self._lock:
            self._cache[key] = proto
            while len(self._cache) > CACHE_SIZE:
                self._cache.popitem(last=False)
        return proto.deep_copy()


_compilers: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_compilers_lock = threading.Lock()


def compiler_for(tokenizer: Any) -> GrammarCompiler:
    """The tokenizer's GrammarCompiler, built on first use (about a second for a large vocabulary) and shared."""
    with _compilers_lock:
        compiler = _compilers.get(tokenizer)
        if compiler is None:
            compiler = _compilers[tokenizer] = GrammarCompiler(tokenizer)
        return compiler


def check_grammar(tokenizer: Any, grammar: Grammar) -> None:
    """Compile `grammar` for this tokenizer (so the engine finds it compiled); GrammarError if it cannot be. A
    tokenizer with no HF backend (a test double) has no vocabulary to compile against: the grammar is checked alone."""
    if getattr(tokenizer, "backend", None) is None:
        from llguidance import LLMatcher

        failed, messages = LLMatcher.validate_grammar_with_warnings(llguidance_grammar(grammar.kind, grammar.source))
        if failed:
            raise GrammarError(messages[0].strip())
        return
    compiler_for(tokenizer).matcher(grammar)


def json_schema_text(schema: dict) -> str:
    """A schema as the grammar source: canonical JSON text, so equal schemas share one compiled grammar."""
    return json.dumps(schema, sort_keys=True, ensure_ascii=False)


class SequenceGrammar:
    """One sequence's constraint: free until its trigger appears in the output, then every token goes through the
    matcher. `accept` returns True once the grammar is complete (nothing but a stop can follow)."""

    __slots__ = ("matcher", "trigger", "active", "complete")

    def __init__(self, matcher: Any, trigger: tuple[int, ...]) -> None:
        self.matcher = matcher
        self.trigger = trigger
        self.active = not trigger
        self.complete = False

    def accept(self, seq: Sequence, token_id: int) -> bool:
        """`token_id` was just appended to `seq`. A token the matcher refuses (none can pass the mask) leaves it in
        its error state, which the next mask reports."""
        if not self.active:
            k = len(self.trigger)
            ids = seq.token_ids
            if len(ids) - seq.num_prompt_tokens >= k and tuple(ids[-k:]) == self.trigger:
                self.active = True
            return False
        self.matcher.consume_token(token_id)
        self.complete = self.matcher.is_stopped() and not self.matcher.is_error()
        return self.complete


def banned_tokens(bitmask: torch.Tensor, vocab: int) -> torch.Tensor:
    """[rows, words] int32 of allowed tokens (bit j of word w: token 32w + j) -> bool [rows, vocab], True where a token
    is NOT allowed (what the sampler sets to -inf); tokens past the mask are banned. Little-endian words read as bytes
    in order are the tokens in order, so numpy's unpackbits does the work in one C loop."""
    words = (~bitmask).numpy().view(np.uint8)
    bits = torch.from_numpy(np.unpackbits(words, axis=1, bitorder="little")).view(torch.bool)
    if bits.shape[1] >= vocab:
        return bits[:, :vocab]
    return torch.cat([bits, bits.new_ones(bits.shape[0], vocab - bits.shape[1])], dim=1)


class MaskJob:
    """The banned tokens of one step's constrained rows, being computed; `result()` -> (row indices, bool mask)."""

    def __init__(self, future: Future) -> None:
        self.future = future

    def result(self) -> tuple[list[int], torch.Tensor]:
        return self.future.result()


class Grammars:
    """The engine's grammar state: compiles requests' grammars and computes the masks of each step."""

    def __init__(self, tokenizer: Any, eos_token_ids: set[int]) -> None:
        self.compiler = compiler_for(tokenizer)
        self.eos_token_ids = sorted(eos_token_ids)
        self.live: set[str] = set()  # request ids of the unfinished sequences with a grammar (empty: no mask work)
        self._pool: ThreadPoolExecutor | None = None

    def sequence_grammar(self, grammar: Grammar) -> SequenceGrammar:
        return SequenceGrammar(self.compiler.matcher(grammar), grammar.trigger)

    def start(self, seqs: list[Sequence], vocab: int) -> MaskJob | None:
        """Begin computing the masks of the rows of `seqs` whose constraint is active (None when there are none)."""
        rows = [(i, seq) for i, seq in enumerate(seqs) if seq.grammar is not None and seq.grammar.active]
        if not rows:
            return None
        if self._pool is None:
            self._pool = ThreadPoolExecutor(1, thread_name_prefix="hearth-grammar")
        return MaskJob(self._pool.submit(self._masks, rows, vocab))

    def _stop_ids(self, seq: Sequence) -> list[int]:
        eos = [] if seq.params.ignore_eos else self.eos_token_ids
        return [*eos, *seq.params.stop_token_ids]

    def _masks(self, rows: list[tuple[int, Sequence]], vocab: int) -> tuple[list[int], torch.Tensor]:
        for _, seq in rows:
            if seq.grammar.matcher.is_error():
                raise ValueError(f"the grammar of request {seq.request_id} failed: {seq.grammar.matcher.get_error()}")
        words = (self.compiler.vocab_size + 31) // 32
        bitmask = torch.zeros(len(rows), words, dtype=torch.int32)
        # one call for the whole step; llguidance spreads the rows over its threads without the GIL
        matchers = [(seq.grammar.matcher, k) for k, (_, seq) in enumerate(rows)]
        self.compiler.executor.unsafe_compute_mask_ptr(matchers, bitmask.data_ptr(), words * 4, len(rows))
        banned = banned_tokens(bitmask, vocab)
        for k, (_, seq) in enumerate(rows):
            if seq.grammar.matcher.is_accepting():  # complete: the request's stop tokens end it as well as eos
                banned[k, [t for t in self._stop_ids(seq) if t < vocab]] = False
        stuck = banned.all(dim=1).nonzero().flatten().tolist()
        if stuck:
            raise ValueError(f"the grammar of request {rows[stuck[0]][1].request_id} allows no token")
        return [i for i, _ in rows], banned

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=False)
            self._pool = None
