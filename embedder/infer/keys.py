"""Content keys: a 128-bit hash of the exact text the tokenizer is given (prompt included), per row or chunk.

An output carries them (`text_key`) so that a later run can find the rows whose text did not change and take
their vectors instead of embedding them again (--reuse). BLAKE2b, from the standard library: a collision among
10^9 texts has a probability near 10^-21.
"""

from __future__ import annotations

from collections.abc import Iterable
from hashlib import blake2b

import numpy as np

KEY_BYTES = 16


def text_keys(texts: Iterable[str]) -> np.ndarray:
    """(n, 16) uint8: the BLAKE2b-128 of each text's UTF-8 bytes."""
    digests = b"".join(blake2b(text.encode("utf-8", "surrogatepass"), digest_size=KEY_BYTES).digest()
                       for text in texts)
    return np.frombuffer(digests, dtype=np.uint8).reshape(-1, KEY_BYTES)
