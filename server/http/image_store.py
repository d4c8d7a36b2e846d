"""The images of `response_format=url` answers, held for a limited time so that URL-reading clients can GET them.

Each image gets an unguessable token (the URL is the capability, as OpenAI's signed URLs are: clients that read the
URL carry no API key); an entry lives `ttl_s` seconds and the store holds at most `max_bytes` in all, dropping the
oldest entries first, so a flood of url requests cannot grow the server's memory.
"""

from __future__ import annotations

import secrets
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

DEFAULT_TTL_S = 3600.0  # OpenAI's image URLs are valid for 60 minutes
DEFAULT_MAX_BYTES = 256 << 20
MEDIA_TYPES = {"png": "image/png", "jpeg": "image/jpeg", "webp": "image/webp"}


@dataclass(frozen=True)
class StoredImage:
    data: bytes
    media_type: str
    expires_at: float


class ImageStore:
    def __init__(self, max_bytes: int = DEFAULT_MAX_BYTES, ttl_s: float = DEFAULT_TTL_S,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.max_bytes = max_bytes
        self.ttl_s = ttl_s
        self._clock = clock
        self._items: OrderedDict[str, StoredImage] = OrderedDict()  # oldest first
        self._bytes = 0
        self._lock = threading.Lock()  # put from the encoding threads, get from the event loop

    @property
    def nbytes(self) -> int:
        return self._bytes

    def __len__(self) -> int:
        return len(self._items)

    def put(self, data: bytes, fmt: str) -> str:
        """Store an image (png, jpeg or webp bytes) and return its token. An image larger than the whole store is
        refused with ValueError."""
        if len(data) > self.max_bytes:
            raise ValueError(f"the image ({len(data)} bytes) is larger than the URL store ({self.max_bytes} bytes)")
        token = secrets.token_urlsafe(24)
        with self._lock:
            self._expire(self._clock())
            while self._bytes + len(data) > self.max_bytes:
                _, old = self._items.popitem(last=False)
                self._bytes -= len(old.data)
            self._items[token] = StoredImage(data, MEDIA_TYPES[fmt], self._clock() + self.ttl_s)
            self._bytes += len(data)
        return token

    def get(self, token: str) -> StoredImage | None:
        """The image of a token that has not expired (or been dropped for room), else None."""
        with self._lock:
            self._expire(self._clock())
            return self._items.get(token)

    def _expire(self, now: float) -> None:
        while self._items:
            token, item = next(iter(self._items.items()))
            if item.expires_at > now:  # entries are in insertion order and share one ttl: the rest are younger
                break
            del self._items[token]
            self._bytes -= len(item.data)
