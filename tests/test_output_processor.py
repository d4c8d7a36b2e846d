"""Output processing runs in the frontend (engine/output_processor.py): the engine core's step reports token ids
and uint8 pixels, never text or an encoded image; the offline `Engine` and the API server's client detokenise,
align and encode. For the same core outputs they give exactly the bytes the engine core gave when it did that work
itself: the reference below is that code (the core's image = PIL from the pixels, aligned to the condition images,
saved as PNG; its text = the decode of the prefix and every generated id; the API re-opened that PNG to encode
jpeg / webp)."""

from __future__ import annotations

import ast
import io
from pathlib import Path

import pytest
from PIL import Image

from diffgentor.engine.config import EngineConfig, ModelConfig
from diffgentor.engine.core_proc import CoreOutputs, FinishedInfo
from diffgentor.engine.input_processor import process_request, unpack_image
from diffgentor.engine.models.hunyuan_image_3.tokenizer import HunyuanTokenizer
from diffgentor.engine.offline import Engine
from diffgentor.engine.request_state import state_from_processed
from diffgentor.engine.testing.tiny_model import make_tiny
from diffgentor.server.batch import data as D
from diffgentor.server.batch import rows as B
from diffgentor.server.http.api import _encode_output, _raise_for
from diffgentor.server.http.engine_client import EngineClient
from diffgentor.server.http.openai_schemas import OpenAIError

from helpers import REPO_ROOT, random_png

BASE = dict(num_inference_steps=2, max_new_tokens=8)
REQUESTS = [
    dict(request_id="t2i", prompt="a red cube", bot_task="image", image_size="256x256", seed=5, **BASE),
    dict(request_id="edit", prompt="make it blue", images=[random_png(130, 200, 3)], bot_task="think_recaption",
         seed=6, infer_align_image_size=True, **BASE),  # an odd aspect ratio: the output is resized to it
    dict(request_id="prev", prompt="a ball", bot_task="recaption", seed=7, partial_images=2, **BASE),
]


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    ckpt = make_tiny(tmp_path_factory.mktemp("ckpt") / "tiny.Distil-3.0", distil=True)
    eng = Engine.from_pretrained(ckpt, environ={}, device="cpu", dtype="float32", num_kv_blocks=512)
    yield eng
    eng.close()


def _png(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def test_the_core_step_neither_encodes_nor_detokenises(engine, monkeypatch):
    """Counted: every PIL encode (`Image.save`), PIL image built from pixels and tokenizer decode, inside and
    outside `EngineCore.step`. The step had one PNG encode per image and preview and decoded every text delta."""
    core = engine.core
    inside = {"save": 0, "fromarray": 0, "decode": 0}
    outside = dict(inside)
    in_step = [False]

    def counted(name, fn):
        def wrapper(*a, **kw):
            (inside if in_step[0] else outside)[name] += 1
            return fn(*a, **kw)
        return wrapper

    step = core.step

    def stepping():
        in_step[0] = True
        try:
            return step()
        finally:
            in_step[0] = False

    monkeypatch.setattr(core, "step", stepping)
    monkeypatch.setattr(Image.Image, "save", counted("save", Image.Image.save))
    monkeypatch.setattr(Image, "fromarray", counted("fromarray", Image.fromarray))
    monkeypatch.setattr(HunyuanTokenizer, "decode", counted("decode", HunyuanTokenizer.decode))
    results = engine.generate([dict(r, request_id=f"count-{r['request_id']}") for r in REQUESTS])
    assert all(r.error is None and r.image is not None for r in results), [r.error for r in results]
    assert results[1].text and results[2].text  # think / recaption text was decoded, in the frontend
    assert inside == {"save": 0, "fromarray": 0, "decode": 0}, inside
    assert outside["fromarray"] == 5 and outside["decode"] > 0, outside  # 3 images + 2 previews
    assert outside["save"] == 0  # the offline results are images; nothing asked for a file


def test_no_image_library_in_the_engine_core():
    for name in ("engine/core.py", "engine/core_proc.py"):
        tree = ast.parse((REPO_ROOT / name).read_text())
        mods = {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
        mods |= {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}
        assert not {m for m in mods if m.split(".")[0] == "PIL"}, name


def _reference_encode(png: bytes, fmt: str, compression: int | None) -> bytes:
    """How the API encoded the engine core's PNG into the requested format."""
    if fmt == "png":
        return png
    img = Image.open(io.BytesIO(png)).convert("RGB")
    buf = io.BytesIO()
    img.save(buf, format="JPEG" if fmt == "jpeg" else "WEBP", quality=100 if compression is None else compression)
    return buf.getvalue()


def test_frontends_give_the_bytes_the_core_gave(engine, tmp_path):
    core, ctx = engine.core, engine.core.ctx
    processed = {r["request_id"]: process_request(ctx, engine.make_request(dict(r, request_id=f"b-{r['request_id']}")))
                 for r in REQUESTS}
    client = EngineClient(EngineConfig(model=ModelConfig(device="cpu")), ctx=ctx)  # the API server's output processing
    for p in processed.values():
        engine.outputs.add_request(p)
        client.outputs.add_request(p)
        core.add_processed(p)
    steps = []
    while core.has_unfinished_requests():
        steps.append(core.step())

    # the reference: what the engine core made of these outputs itself
    ref_images: dict[str, list[bytes]] = {}
    ref_ids: dict[str, list[int]] = {}
    for out in steps:
        for ev in out.events:
            p = processed[ev.request_id.removeprefix("b-")]
            if ev.kind in ("partial_image", "image"):
                pil = Image.fromarray(ev.pixels.to_array())
                state = state_from_processed(ctx, p)
                if state.align_image_size and state.vae_images:
                    pil = ctx.images.align_output_size(pil, [unpack_image(x)[0] for x in p.images])
                ref_images.setdefault(ev.request_id, []).append(_png(pil))
    for out in steps:
        for rid, res in out.finished.items():
            start = state_from_processed(ctx, processed[rid.removeprefix("b-")]).machine.start_id
            ref_ids[rid] = ([start] if start is not None else []) + list(res.generated_ids)
    ref_text = {rid: ctx.tokenizer.decode(ids) if len(ids) > 1 else "" for rid, ids in ref_ids.items()}
    assert ref_text["b-edit"] and ref_text["b-prev"]
    assert Image.open(io.BytesIO(ref_images["b-edit"][-1])).size != (256, 256)  # aligned to the condition image

    # the offline frontend
    offline_images: dict[str, list[bytes]] = {}
    offline_text: dict[str, str] = {}
    for out in steps:
        for ev in engine.process_outputs(out):
            if ev.kind in ("partial_image", "image"):
                offline_images.setdefault(ev.request_id, []).append(_png(ev.image))
            elif ev.kind == "text":
                offline_text[ev.request_id] = offline_text.get(ev.request_id, "") + ev.text
    results = {rid: engine.results.pop(rid) for rid in ref_text}
    assert offline_images == ref_images
    assert {rid: r.text for rid, r in results.items()} == ref_text
    assert {rid: t for rid, t in offline_text.items()} == {rid: t for rid, t in ref_text.items() if t}

    # the API server's client and its encoder, in every output format
    served_images: dict[str, list] = {}
    served_text: dict[str, str] = {}
    for out in steps:
        msg = CoreOutputs(events=[e for e in out.events if e.kind in ("tokens", "partial_image", "image")],
                          finished=[FinishedInfo(request_id=rid, finish_reason=str(r.finish_reason.value))
                                    for rid, r in out.finished.items()])
        routed = client.process_outputs(msg)
        for ev in routed.events:
            if ev.kind in ("partial_image", "image"):
                served_images.setdefault(ev.request_id, []).append(ev.image)
        served_text.update({info.request_id: info.text for info in routed.finished})
    assert served_text == ref_text
    for rid, images in served_images.items():
        for fmt, comp in (("png", None), ("jpeg", 80), ("webp", None)):
            assert [_encode_output(im, fmt, comp) for im in images] == \
                [_reference_encode(png, fmt, comp) for png in ref_images[rid]], (rid, fmt)

    # the batch CLI's file: its PNG with text chunks, from the offline result
    for rid, res in results.items():
        task = B.Task(D.EditRow(index=0, prompt="p"), 0, tmp_path / f"{rid}.png", seed=1)
        B.save_png(task.out_path, res.image, task, res.text)
        B.save_png(tmp_path / "ref.png", Image.open(io.BytesIO(ref_images[rid][-1])), task, ref_text[rid])
        assert Path(task.out_path).read_bytes() == (tmp_path / "ref.png").read_bytes(), rid


def test_a_refusal_in_the_engine_core_names_its_field(engine):
    """The core's own refusals (here: too many previews, checked where the request becomes engine state) carry the
    field from `RequestError.param` to the HTTP error, through the event and `FinishedInfo`."""
    events = list(engine.stream([dict(request_id="pp", prompt="x", bot_task="image", partial_images=5)]))
    (err,) = [e for e in events if e.kind == "error"]
    assert (err.status, err.param) == (400, "partial_images"), err
    info = FinishedInfo(request_id="pp", finish_reason="error", status=err.status, error=err.error, param=err.param)
    with pytest.raises(OpenAIError) as e:
        _raise_for(info)
    assert (e.value.status, e.value.param) == (400, "partial_images")
