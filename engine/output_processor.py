"""Output processing, run in the frontend (the offline `Engine`, or the API server's output thread): the engine
core reports token ids and uint8 pixels (`EngineCoreEvent`); this turns them into text deltas (incremental
detokenisation), the request's final text, and PIL images (resized to the condition image's aspect ratio when
the request asks for it). The core's step never decodes text or builds an image, so neither holds up the next
step of every request. Encoding an image into a file is the caller's, once, in the format it needs: the API server
in the requested output_format (server/api.py), the batch CLI a PNG with its text chunks (server/batch.py).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, NamedTuple

from PIL import Image

from diffgentor.engine.detokenizer import IncrementalDetokenizer
from diffgentor.engine.input_processor import ProcessedRequest, ProcessorContext, aligns_output
from diffgentor.engine.request import EngineCoreEvent, EngineEvent, ImagePixels


class CondImageSize(NamedTuple):
    """What aligning the output reads of a condition image: its bucket and its size (`align_output_size`)."""

    ratio_index: int
    original_size: tuple[int, int]  # (width, height)


@dataclass
class _RequestOutputs:
    align_to: list[CondImageSize]  # the condition images, when the output is aligned to them
    ids: list[int] = field(default_factory=list)  # the text's ids: the prefix, then every generated id
    num_generated: int = 0
    detokenizer: IncrementalDetokenizer | None = None
    image: Any = None  # the final PIL image, once reported


@dataclass
class FinishedOutputs:
    """A finished request's outputs: its whole text (empty when it generated no token) and its final image."""

    text: str = ""
    image: Any = None


class OutputProcessor:
    """Per-request output state of the requests in flight, between `add_request` and `finish` / `abort`."""

    def __init__(self, ctx: ProcessorContext | None) -> None:
        self.ctx = ctx  # None until known (a client that starts its engine core later sets it)
        self.requests: dict[str, _RequestOutputs] = {}

    def add_request(self, p: ProcessedRequest) -> None:
        align = self.ctx is not None and aligns_output(self.ctx, p.request)
        sizes = [CondImageSize(x.vae_ratio_index, (int(x.original_size[0]), int(x.original_size[1])))
                 for x in p.images] if align else []
        self.requests[p.request.request_id] = _RequestOutputs(sizes)

    def abort(self, request_id: str) -> None:
        self.requests.pop(request_id, None)

    def process(self, ev: EngineCoreEvent) -> EngineEvent | None:
        """The event a core event becomes (None: nothing to report yet, e.g. ids that end inside a character, or a
        request no longer followed). Terminal events pass through; `finish` ends the request's state."""
        st = self.requests.get(ev.request_id)
        if ev.kind == "tokens":
            if st is None:
                return None
            if st.detokenizer is None:
                st.ids = list(ev.prefix_ids)
                st.detokenizer = IncrementalDetokenizer(self.ctx.tokenizer, ev.prefix_ids)
            st.ids += ev.token_ids
            st.num_generated += len(ev.token_ids)
            delta = st.detokenizer.push(ev.token_ids) if ev.token_ids else ""
            if ev.final:
                delta += st.detokenizer.finish()
            return EngineEvent(request_id=ev.request_id, kind="text", text=delta) if delta else None
        if ev.kind in ("partial_image", "image"):
            if st is None:
                return None
            img = self.image(ev.pixels, st.align_to)
            if ev.kind == "image":
                st.image = img
            return EngineEvent(request_id=ev.request_id, kind=ev.kind, image=img,
                               partial_image_index=ev.partial_image_index)
        return EngineEvent(request_id=ev.request_id, kind=ev.kind, finish_reason=ev.finish_reason, error=ev.error,
                           status=ev.status, param=ev.param)

    def finish(self, request_id: str) -> FinishedOutputs:
        """The request's whole text and final image; its state is dropped."""
        st = self.requests.pop(request_id, None)
        if st is None:
            return FinishedOutputs()
        text = self.ctx.tokenizer.decode(st.ids) if st.num_generated else ""
        return FinishedOutputs(text=text, image=st.image)

    def image(self, pixels: ImagePixels, align_to: list[CondImageSize]) -> Image.Image:
        pil = Image.fromarray(pixels.to_array())
        if align_to:
            pil = self.ctx.images.align_output_size(pil, align_to)
        return pil
