"""The encoder stage's bookkeeping: which condition images are encoded, what they cost, what to evict.

A condition image's encoder work (the VAE posterior and the SigLIP2 tokens) depends only on the image's content
and its bucket, not on the request, so it is done once and cached: the scheduler owns this manager (keys, sizes,
LRU order, pins) and tells the worker, through the `SchedulerOutput`, what to encode and what to drop; the worker
holds the tensors. Each request still draws its own posterior sample from its own seeded generator when it is
admitted, so sharing an encode never changes a seeded result.

An entry is pinned while a request that looked it up waits to be admitted, so it cannot be evicted between its
encode and its use; entries no waiting request needs are evicted least recently used first once the cache holds
more than its byte bound.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field

EncoderKey = tuple[str, int, tuple[int, ...], bool, tuple[int, ...]]
"""(content digest, bucket, VAE pixel shape, aligned, ViT pixel shape): see `encoder_key`."""


def encoder_key(digest: str, bucket: int, vae_shape: Sequence[int], align: bool,
                vit_shape: Sequence[int] = ()) -> EncoderKey:
    """Content digest + bucket: the same file cropped to the same bucket the same way (VAE pixels of `vae_shape`,
    ViT patches of `vit_shape`, () without a ViT) encodes the same."""
    return (digest, int(bucket), tuple(int(d) for d in vae_shape), bool(align), tuple(int(d) for d in vit_shape))


@dataclass
class EncoderCacheStats:
    hits: int = 0  # a request's image was already encoded (or being encoded this step for another request)
    misses: int = 0  # a request's image had to be encoded
    evictions: int = 0


@dataclass
class EncoderCacheManager:
    """Scheduler-side view of the encoder cache: keys in LRU order with their bytes, and pins."""

    capacity_bytes: int
    entries: OrderedDict[EncoderKey, int] = field(default_factory=OrderedDict)  # key -> bytes, oldest first
    pins: dict[EncoderKey, int] = field(default_factory=dict)
    stats: EncoderCacheStats = field(default_factory=EncoderCacheStats)
    pending_evictions: list[EncoderKey] = field(default_factory=list)  # for the worker, with the next plan
    num_bytes: int = 0  # sum of `entries`' bytes, kept as they change (read every step by the stats)

    def contains(self, key: EncoderKey) -> bool:
        return key in self.entries

    def touch(self, key: EncoderKey) -> None:
        if key in self.entries:
            self.entries.move_to_end(key)

    def pin(self, key: EncoderKey) -> None:
        self.pins[key] = self.pins.get(key, 0) + 1

    def unpin(self, key: EncoderKey) -> None:
        n = self.pins.get(key, 0) - 1
        if n > 0:
            self.pins[key] = n
        else:
            self.pins.pop(key, None)

    def insert(self, key: EncoderKey, nbytes: int) -> None:
        """Record an encode the worker finished, then evict unpinned entries (LRU) past the bound. Pinned entries
        may hold the cache over its bound for a step: the requests that need them are about to be admitted."""
        self.num_bytes += int(nbytes) - self.entries.get(key, 0)
        self.entries[key] = int(nbytes)
        self.entries.move_to_end(key)
        for old in list(self.entries):
            if self.num_bytes <= self.capacity_bytes:
                break
            if old == key or old in self.pins:
                continue
            self.num_bytes -= self.entries.pop(old)
            self.pending_evictions.append(old)
            self.stats.evictions += 1

    def take_evictions(self) -> list[EncoderKey]:
        out, self.pending_evictions = self.pending_evictions, []
        return out
