"""The `diffgentor serve` flags, in a module light enough to import while building the CLI parser."""

from __future__ import annotations

import argparse

from diffgentor.engine.config import (
    DEFAULT_BODY_IDLE_TIMEOUT_S,
    DEFAULT_FETCH_DEADLINE_S,
    DEFAULT_HEAD_TIMEOUT_S,
    DEFAULT_INFLIGHT_BYTES,
    DEFAULT_MAX_IMAGE_PIXELS,
    DEFAULT_MAX_PROMPT_CHARS,
    DEFAULT_MAX_QUEUED_COST_BYTES,
    DEFAULT_MAX_REQUEST_BYTES,
    DEFAULT_MAX_REQUEST_COST_BYTES,
    DEFAULT_MAX_UPLOAD_BYTES,
    MiB,
)


def _positive_int(text: str) -> int:
    n = int(text)
    if n < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {n}")
    return n


def _positive_float(text: str) -> float:
    x = float(text)
    if not x > 0 or x == float("inf"):
        raise argparse.ArgumentTypeError(f"must be a positive number, got {text}")
    return x


def add_serve_args(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    from diffgentor.engine.config import add_engine_args

    p.add_argument("model", help="checkpoint folder (HunyuanImage-3.0-Instruct layout) or Hugging Face model id "
                   "(tencent/HunyuanImage-3.0-Instruct-Distil: downloaded into the cache once; see --revision, "
                   "--download-dir, HF_HUB_OFFLINE)")
    p.add_argument("--host", default="127.0.0.1", help="bind address (default 127.0.0.1: loopback only)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--api-key", default=None, help="require `Authorization: Bearer KEY` on /v1/* (default: none)")
    p.add_argument("--served-model-name", nargs="+", default=None,
                   help="model name(s) clients may send (default: the checkpoint folder's name)")
    p.add_argument("--seed", type=int, default=None,
                   help="seed of every request that gives none (default: a random seed per request)")
    p.add_argument("--num-inference-steps", dest="default_num_inference_steps", type=int, default=None,
                   help="default diffusion steps (default: the checkpoint's generation config)")
    p.add_argument("--max-upload-bytes", type=int, default=DEFAULT_MAX_UPLOAD_BYTES, help="per image file")
    p.add_argument("--max-image-pixels", type=int, default=DEFAULT_MAX_IMAGE_PIXELS,
                   help="refuse larger images from their header (decompression bombs)")
    p.add_argument("--max-prompt-chars", type=int, default=DEFAULT_MAX_PROMPT_CHARS)
    g = p.add_argument_group("hardening (limits on what one client can make the server do or hold)")
    g.add_argument("--allowed-url-fetch", action="store_true", default=False,
                   help="fetch http(s) image URLs given in JSON edits (default: off; data: URLs always work). Only "
                   "public addresses are fetched, each redirect checked again, environment proxies ignored")
    g.add_argument("--allowed-url-hosts", nargs="+", default=None, metavar="HOST",
                   help="host names, addresses or CIDR networks that may be fetched although internal")
    g.add_argument("--url-fetch-timeout-s", type=_positive_float, default=DEFAULT_FETCH_DEADLINE_S,
                   help="whole-download deadline per image URL (a request's URLs together get twice this)")
    g.add_argument("--max-request-bytes", type=_positive_int, default=DEFAULT_MAX_REQUEST_BYTES,
                   help="a whole request body (JSON or multipart, chunked or not), counted as it arrives; 413 beyond")
    g.add_argument("--max-inflight-bytes", type=_positive_int, default=DEFAULT_INFLIGHT_BYTES,
                   help="request bodies and downloaded images all requests in flight may hold together; more is "
                   "answered 429 (default 512 MiB)")
    g.add_argument("--header-timeout-s", type=_positive_float, default=DEFAULT_HEAD_TIMEOUT_S,
                   help="close a connection whose request head is not complete this long after its first byte")
    g.add_argument("--max-connections", type=_positive_int, default=2048,
                   help="open client connections; lowered to fit the file-descriptor limit. A new connection past it "
                   "closes the oldest one that has not sent a complete request head (503 when none)")
    g.add_argument("--max-pending-connections", type=_positive_int, default=512,
                   help="connections without a complete request head (half-sent or idle); past it the oldest one of "
                   "the client holding the most is closed")
    g.add_argument("--body-timeout-s", type=_positive_float, default=DEFAULT_BODY_IDLE_TIMEOUT_S,
                   help="answer 408 when a request body stalls this long between chunks")
    g.add_argument("--max-request-cost-mib", type=_positive_int, default=DEFAULT_MAX_REQUEST_COST_BYTES // MiB,
                   help="the memory one request may cost (decoded and preprocessed images, encoder outputs, output "
                   "images; computed from its images' headers before any is decoded); more is answered 400")
    g.add_argument("--max-queued-cost-mib", type=_positive_int, default=DEFAULT_MAX_QUEUED_COST_BYTES // MiB,
                   help="the memory cost all queued and running requests may hold together; more is answered 429")
    p.add_argument("--allowed-origins", nargs="*", default=["*"], metavar="ORIGIN",
                   help="browser origins (scheme://host[:port]) that may call the API from their pages (CORS); "
                   "default `*`, any origin; with no value, no CORS headers (browsers then allow only this server's "
                   "own pages)")
    p.add_argument("--image-url-ttl-s", type=_positive_float, default=3600.0,
                   help="how long an image of a response_format=url answer stays at its URL")
    p.add_argument("--image-url-store-bytes", type=_positive_int, default=256 * MiB,
                   help="memory for the images of response_format=url answers; the oldest are dropped beyond it")
    p.add_argument("--drain-timeout-s", type=float, default=120.0,
                   help="on SIGTERM/SIGINT stop accepting and let in-flight requests finish for up to this long")
    p.add_argument("--data-parallel-size", type=_positive_int, default=None, metavar="N",
                   help="engine instances behind this server, requests balanced across them. With GPUs each runs on "
                   "its own slice of --tensor-parallel-size GPUs: VISIBLE // size of them, at most N when given; on "
                   "CPU N instances (default 1)")
    p.add_argument("--log-level", default="info")
    p.add_argument("--no-playground", dest="playground", action="store_false", default=True,
                   help="do not serve the playground page (a browser UI for the API) at /")
    add_engine_args(p)
    return p
