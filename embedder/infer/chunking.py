"""Texts -> chunks of at most N tokens that begin at word starts, from the tokenizer's own offsets and word ids.

One tokenizer pass per window gives every token's character offsets and word. A chunk is a run of a text's
tokens, wrapped in the model's special tokens (and the prompt's tokens), that ends where a word begins, so
that the model, given text[chunk_start:chunk_end] on its own, sees the same token ids: the chunk's vector is
that text's vector. Where a word begins depends on how the tokenizer splits text into words:

    WordPiece (BERT)        every word of its pre-tokenizer: text split at whitespace and punctuation, CJK
                            characters one word each, with no context across words
    byte-level BPE          a word preceded by a space (U+0020), which the word's first token carries (Ġ);
    (RoBERTa, GPT-2)        the chunk then starts at that space unless the tokenizer adds a prefix space itself
    SentencePiece           a word preceded by a space, which the tokenizer turns into its word marker (▁)
    (Metaspace: XLM-R, T5)

A probe at start-up finds whether a chunk must begin at the space before its first word or at the word.
A run of tokens longer than a chunk with no word start in it (a URL, a long line without spaces) is cut
inside the word: those cuts are counted (cut_in_word) and such chunks are not the same as their text alone.
"""

from __future__ import annotations

import json
import unicodedata
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from embedder.errors import UsageError
from embedder.infer.tokenize import TokenizedWindow

# Characters tokenized per call: bounds the tokenizer's transient memory (about 100 bytes a token).
SLICE_CHARS = 1 << 20
# Pre-tokenizers whose words tokenize the same wherever they stand: any word start is a chunk boundary.
_CONTEXT_FREE = ("BertPreTokenizer", "Whitespace", "WhitespaceSplit")


@dataclass
class Chunks:
    """A window's texts as chunks, in text order then chunk order."""

    tokens: TokenizedWindow  # one entry per chunk: special tokens, prompt and the chunk's tokens
    counts: np.ndarray  # int64 per text: its number of chunks (at least 1; an empty text is one empty chunk)
    starts: np.ndarray  # int64 per chunk: character offsets into the text, so text[start:end] is the chunk
    ends: np.ndarray
    cut: np.ndarray  # bool per chunk: it starts or ends inside a word (not the same as its text alone)

    @property
    def cut_in_word(self) -> int:
        """Chunk boundaries put inside a word (no word start within reach)."""
        return int(self.cut.sum())

    @property
    def firsts(self) -> np.ndarray:
        """Each text's first chunk (a text's chunks are consecutive)."""
        return first_of_groups(self.counts)

    @property
    def chunked_texts(self) -> int:
        """Texts split into more than one chunk."""
        return int((self.counts > 1).sum())


class Chunker:
    """Splits texts (the prompt prepended) into chunks of at most max_tokens tokens, overlapping by at most
    overlap tokens, every boundary at a word start where the text has one within reach."""

    def __init__(self, tokenizer_path: Path, max_tokens: int, overlap: int = 0, prompt: str = ""):
        from tokenizers import Tokenizer

        self._tokenizer = Tokenizer.from_file(str(tokenizer_path))
        self._tokenizer.no_padding()
        self._tokenizer.no_truncation()
        self.max_tokens, self.overlap, self.prompt = max_tokens, overlap, prompt
        self._prefix, self._suffix = self._special_tokens()
        pre_tokenizer = json.loads(self._tokenizer.to_str()).get("pre_tokenizer") or {}
        self._context_free = pre_tokenizer.get("type") in _CONTEXT_FREE
        self._with_space = self._starts_at_space()
        self._prompt_ids = self._prompt_before_word()
        prompt_tokens = len(self._prompt_ids)
        room = max_tokens - len(self._prefix) - len(self._suffix) - prompt_tokens
        if room < 1:
            raise UsageError(f"--chunk-tokens {max_tokens} leaves no room for text after the model's "
                             f"{len(self._prefix) + len(self._suffix)} special tokens and the prompt's "
                             f"{prompt_tokens}")
        if overlap >= room:
            raise UsageError(f"--chunk-overlap {overlap} leaves no room: a chunk of {max_tokens} tokens holds "
                             f"{room} of text after special tokens and prompt; give an overlap below {room}")

    def _special_tokens(self) -> tuple[list[int], list[int]]:
        """The ids the post-processor puts before and after a text ([CLS] ... [SEP], <s> ... </s>)."""
        probe = self._tokenizer.encode("hello", add_special_tokens=True)
        content = [i for i, special in enumerate(probe.special_tokens_mask) if not special]
        if not content:
            return [], []
        return probe.ids[: content[0]], probe.ids[content[-1] + 1 :]

    def _starts_at_space(self) -> bool:
        """Whether a chunk must include the space before its first word to tokenize as it does in the text
        (byte-level BPE without a prefix space of its own)."""
        if self._context_free:
            return False
        whole = self._tokenizer.encode("hello world", add_special_tokens=False)
        last = whole.word_ids[-1]
        tail = [i for i, w in zip(whole.ids, whole.word_ids) if w == last]
        if self._tokenizer.encode("world", add_special_tokens=False).ids == tail:
            return False
        return self._tokenizer.encode(" world", add_special_tokens=False).ids == tail

    def _prompt_before_word(self) -> np.ndarray:
        """The prompt's tokens where a word follows it: what chunks after a text's first begin with (the first
        keeps the prompt's tokens as they came with the text: the prompt and text tokenized together)."""
        if not self.prompt:
            return np.zeros(0, dtype=np.int64)
        probe = self._tokenizer.encode(self.prompt + "hello", add_special_tokens=False)
        last = probe.word_ids[-1]
        return np.asarray([i for i, w in zip(probe.ids, probe.word_ids) if w != last], dtype=np.int64)

    def chunk(self, texts: list[str]) -> Chunks:
        """Every text as chunks (with the prompt prepended, as the model sees it).

        Texts are tokenized a slice of about SLICE_CHARS characters at a time: the tokenizer's encodings (ids,
        strings, offsets, word ids: on the order of 100 bytes a token) are freed before the next slice, so a
        window's transient memory does not grow with its size.
        """
        prompt = self.prompt
        prefix, suffix = np.asarray(self._prefix, np.int64), np.asarray(self._suffix, np.int64)
        pieces: list[np.ndarray] = []
        sizes: list[int] = []  # tokens per chunk
        counts = np.zeros(len(texts), dtype=np.int64)
        starts: list[int] = []
        ends: list[int] = []
        cut: list[bool] = []
        shift = len(prompt)
        for first, stop in _slices(texts, SLICE_CHARS):
            encodings = self._tokenizer.encode_batch([prompt + t for t in texts[first:stop]] if prompt
                                                     else texts[first:stop], add_special_tokens=False)
            for index, encoding in zip(range(first, stop), encodings):
                text = texts[index]
                text_ids = np.array(encoding.ids, dtype=np.int64)
                n = len(text_ids)
                spans = np.array(encoding.offsets, dtype=np.int64).reshape(-1, 2) if shift else None
                # The prompt's tokens are the leading ones that end within it; they start every chunk.
                lead = int(np.searchsorted(spans[:, 1], shift, side="right")) if shift else 0
                room = self.max_tokens - len(prefix) - len(suffix) - max(lead, len(self._prompt_ids))
                if n - lead <= room:  # the common case: the whole text is one chunk
                    pieces += (prefix, text_ids, suffix)
                    sizes.append(len(prefix) + n + len(suffix))
                    starts.append(0)
                    ends.append(len(text))
                    cut.append(False)
                    counts[index] = 1
                    continue
                if spans is None:
                    spans = np.array(encoding.offsets, dtype=np.int64).reshape(-1, 2)
                # Word ids (None only for special tokens, which are not added here) as a sorted int array.
                words = np.nan_to_num(np.array(encoding.word_ids, dtype=np.float64), nan=-1).astype(np.int64)
                found = self._split(prompt + text if prompt else text, spans[lead:], words[lead:], room)
                for number, (first_token, stop_token, start_char, end_char, inside) in enumerate(found):
                    head = text_ids[:lead] if number == 0 else self._prompt_ids
                    pieces += (prefix, head, text_ids[lead + first_token : lead + stop_token], suffix)
                    sizes.append(len(prefix) + len(head) + stop_token - first_token + len(suffix))
                    starts.append(start_char - shift)
                    ends.append(end_char - shift)
                    cut.append(inside)
                counts[index] = len(found)
            del encodings
        flat = np.concatenate(pieces) if pieces else np.zeros(0, dtype=np.int64)
        offsets = np.zeros(len(sizes) + 1, dtype=np.int64)
        np.cumsum(sizes, out=offsets[1:])
        tokens = TokenizedWindow(flat, offsets, np.zeros(len(sizes), dtype=bool))
        return Chunks(tokens, counts, np.asarray(starts, np.int64), np.asarray(ends, np.int64),
                      np.asarray(cut, dtype=bool))

    def _split(self, text: str, spans: np.ndarray, words: np.ndarray, room: int) -> list:
        """[(first token, stop token, start char, end char, cut inside a word)] of one text's content tokens.
        Offsets are into text (the prompt included)."""
        count = len(spans)
        chunks = []
        first, start_char = 0, len(self.prompt)  # the first chunk starts where the text does
        starts_inside = False
        while True:
            if count - first <= room:
                chunks.append((first, count, start_char, len(text), starts_inside))
                return chunks
            limit = first + room
            stop, next_char = self._last_word_start(text, spans, words, first + 1, limit)
            inside = stop is None
            if inside:  # no word starts within reach: cut inside the word, between characters if possible
                stop = limit
                while stop > first + 1 and spans[stop, 0] < spans[stop - 1, 1]:
                    stop -= 1
                next_char = int(spans[stop, 0])
            chunks.append((first, stop, start_char, _past_marks(text, int(spans[stop - 1, 1])), starts_inside or inside))
            following, following_char, starts_inside = stop, next_char, inside
            if self.overlap:
                back, back_char = self._first_word_start(text, spans, words, max(stop - self.overlap, first + 1),
                                                         stop)
                if back is not None:
                    following, following_char, starts_inside = back, back_char, False
            first, start_char = following, following_char

    def _last_word_start(self, text, spans, words, low: int, high: int) -> tuple[int | None, int]:
        """The last token in [low, high] that begins a word a chunk can start at, and the chunk's start char."""
        for j in np.flatnonzero(words[low : high + 1] != words[low - 1 : high])[::-1] + low:
            start = self._chunk_start(text, spans, words, int(j))
            if start is not None:
                return int(j), start
        return None, 0

    def _first_word_start(self, text, spans, words, low: int, high: int) -> tuple[int | None, int]:
        """The first token in [low, high) that begins a word a chunk can start at, and the chunk's start char."""
        for j in np.flatnonzero(words[low:high] != words[low - 1 : high - 1]) + low:
            start = self._chunk_start(text, spans, words, int(j))
            if start is not None:
                return int(j), start
        return None, 0

    def _chunk_start(self, text: str, spans: np.ndarray, words: np.ndarray, j: int) -> int | None:
        """Where a chunk beginning at token j (the first of its word) starts in text, or None if it cannot."""
        word_end = int(spans[int(np.searchsorted(words, words[j], side="right")) - 1, 1])
        char = int(spans[j, 0])
        while char < word_end and text[char].isspace():
            char += 1
        if char >= word_end:  # a word of whitespace only (byte-level BPE's extra-space token)
            return None
        if self._context_free:
            return char
        if char == 0 or text[char - 1] != " ":
            return None
        # The space goes with the chunk unless the prompt's own trailing space stands in for it.
        return char - 1 if self._with_space and not self.prompt.endswith(" ") else char



def _slices(texts: list[str], chars: int) -> list[tuple[int, int]]:
    """[first, stop) ranges of texts of about `chars` characters each (a longer text is a range alone)."""
    ranges, first, size = [], 0, 0
    for index, text in enumerate(texts):
        if size and size + len(text) > chars:
            ranges.append((first, index))
            first, size = index, 0
        size += len(text)
    if first < len(texts):
        ranges.append((first, len(texts)))
    return ranges


def first_of_groups(counts: np.ndarray) -> np.ndarray:
    """Where each of consecutive groups of these sizes begins."""
    firsts = np.zeros(len(counts), dtype=np.int64)
    np.cumsum(counts[:-1], out=firsts[1:])
    return firsts


def _past_marks(text: str, end: int) -> int:
    """end moved past combining marks: a normalizer that composes e + U+0301 into é reports the token's end
    after the e, and a chunk cut there would lose the accent."""
    while end < len(text) and unicodedata.category(text[end]).startswith("M"):
        end += 1
    return end
