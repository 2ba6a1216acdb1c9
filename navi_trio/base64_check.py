"""Is a long string base64? Checked in chunks, with a checkpoint between them.

``binascii.a2b_base64`` of 50 MB holds the GIL for ~300 ms (in a worker thread too, so
it stalled every stream), and decoding is not needed to know the answer. The rules are
those of ``a2b_base64(s, strict_mode=True)``: only the 64 alphabet characters, then at
most two ``=``, and a length that is a multiple of 4; and RFC 4648's padding, where
CPython also takes ``=`` after a complete group (``"AAAA="``). Each chunk is one C call
(``bytes.translate`` deletes the alphabet; whatever is left is not base64), ~0.2 ms here.
"""

from __future__ import annotations

from typing import Final

import trio

#: Characters per step.
CHUNK: Final = 64 * 1024
ALPHABET: Final = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"


async def is_base64(text: str, start: int = 0) -> bool:
    """Whether ``a2b_base64(text[start:], strict_mode=True)`` would accept it (``start``
    skips a ``data:`` URL's head without copying the rest).

    Cancellation: a cancel at a checkpoint between chunks ends the check, nothing kept.
    """
    if not text.isascii() or (len(text) - start) % 4:
        return False
    # Up to two "=" end it; a third, or one anywhere else, is left over below.
    end = len(text) - (2 if text.endswith("==") else 1 if text.endswith("=") else 0)
    for at in range(start, end, CHUNK):
        rest = text[at : min(end, at + CHUNK)].encode("ascii").translate(None, ALPHABET)
        await trio.lowlevel.checkpoint()
        if rest:
            return False
    return True
