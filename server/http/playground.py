"""The playground page that `diffgentor serve` answers at ``/`` (off with ``--no-playground``): one static HTML file,
``playground.html`` beside this module (inline CSS and JS, no build step, no external assets), that calls the
server's own OpenAI endpoints with ``stream=true`` and shows the think/recaption text as it is decoded, the
previews, then the image, or the server's error message."""

from __future__ import annotations

from functools import lru_cache
from importlib.resources import files

# the page may load nothing from elsewhere: its own API (fetch), inline style and script, and data:/blob: images
CONTENT_SECURITY_POLICY = ("default-src 'none'; connect-src 'self'; img-src 'self' data: blob:; "
                           "style-src 'unsafe-inline'; script-src 'unsafe-inline'; form-action 'none'; "
                           "base-uri 'none'; frame-ancestors 'none'")


@lru_cache(maxsize=1)
def page_html() -> str:
    """The page (package data of ``diffgentor.server.http``; read once)."""
    return files("diffgentor.server.http").joinpath("playground.html").read_text(encoding="utf-8")
