"""Models by Hugging Face id: `serve ID`, `edit/t2i --model_name ID` and `Engine.from_pretrained(ID)` resolve a repo id
through huggingface_hub's cache (`--download-dir`, `--revision`, HF_HUB_OFFLINE), here a cache prepared on disk with
the tiny model in the Hub's layout, offline (no network); a folder path works as before."""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest
from PIL import Image

from diffgentor.engine.config import EngineConfig, hf_offline
from diffgentor.engine.model_source import CheckpointNotFound, is_repo_id, resolve_checkpoint
from diffgentor.engine.testing.tiny_model import make_tiny

from helpers import start_server

REPO_ID = "tencent/HunyuanImage-3.0-Instruct-Distil"
COMMIT = "0123456789abcdef0123456789abcdef01234567"
OFFLINE = {"HF_HUB_OFFLINE": "1"}


def hf_cache(root: Path, repo_id: str = REPO_ID) -> Path:
    """A Hugging Face hub cache holding `repo_id` at COMMIT (refs/main -> snapshots/COMMIT), the tiny Distil model."""
    repo = root / ("models--" + repo_id.replace("/", "--"))
    make_tiny(repo / "snapshots" / COMMIT, distil=True)
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(COMMIT)
    return root


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    return hf_cache(tmp_path_factory.mktemp("hf"))


def test_resolve_ids_folders_and_errors(cache, tmp_path):
    snap = cache / ("models--" + REPO_ID.replace("/", "--")) / "snapshots" / COMMIT
    assert resolve_checkpoint(REPO_ID, download_dir=cache, offline=True) == snap
    assert resolve_checkpoint(REPO_ID, revision=COMMIT, download_dir=cache, offline=True) == snap
    assert resolve_checkpoint(str(snap)) == snap  # a folder is used as it is
    with pytest.raises(CheckpointNotFound, match="offline mode.*hf download tencent/HunyuanImage-3.0-Instruct"):
        resolve_checkpoint("tencent/HunyuanImage-3.0-Instruct", download_dir=cache, offline=True)
    with pytest.raises(CheckpointNotFound, match="not in the Hugging Face cache"):
        resolve_checkpoint(REPO_ID, revision="v9", download_dir=cache, offline=True)
    with pytest.raises(CheckpointNotFound, match="no such checkpoint folder"):
        resolve_checkpoint(str(tmp_path / "missing" / "deeper" / "path"))
    assert is_repo_id(REPO_ID) and not is_repo_id("./HunyuanImage-3-Instruct") and not is_repo_id(str(snap))


def test_engine_config_resolves_with_flags_and_offline_env(cache):
    assert hf_offline(OFFLINE) and not hf_offline({}) and not hf_offline({"HF_HUB_OFFLINE": "0"})
    c = EngineConfig.from_cli_and_env({"model": REPO_ID, "download_dir": str(cache), "revision": "main"}, OFFLINE)
    assert (c.model.hf_offline, c.model.revision, c.model.download_dir) == (True, "main", str(cache))
    assert Path(c.with_local_checkpoint().model.checkpoint).name == COMMIT


def test_offline_engine_by_id(cache):
    from diffgentor.engine.offline import Engine

    eng = Engine.from_pretrained(REPO_ID, environ=OFFLINE, download_dir=str(cache), num_kv_blocks=256,
                                 device="cpu", dtype="float32")
    (r,) = eng.generate([dict(prompt="a tower", seed=1, bot_task="image", num_inference_steps=1,
                              image_size="256x256")])
    assert r.error is None and r.image.size == (256, 256)


def test_batch_cli_by_id(cache, tmp_path, monkeypatch):
    from diffgentor.server.cli import main

    for k in ("DG_HUNYUAN_IMAGE_3_BOT_TASK",):
        monkeypatch.setenv(k, "image")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    base = ["t2i", "--prompt", "a tower", "--num_inference_steps", "1", "--no_progress", "--image_size", "256x256",
            "--num-kv-blocks", "256", "--download-dir", str(cache)]
    assert main([*base, "--model_name", REPO_ID, "--output_dir", str(tmp_path / "out")]) == 0
    assert Image.open(tmp_path / "out" / "000000.png").size == (256, 256)
    assert main([*base, "--model_name", "tencent/not-cached", "--output_dir", str(tmp_path / "x")]) == 2


# slow (CI runs it: make test-slow): ~14 s; resolving ids: test_offline_engine_by_id and test_batch_cli_by_id run by
#   default
@pytest.mark.slow
def test_serve_by_id(cache, tmp_path, monkeypatch):
    """`diffgentor serve ID`: the id is the served model name (`models.retrieve(ID)` works with its slash)."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    proc, base = start_server(REPO_ID, tmp_path / "server.log", "--download-dir", str(cache), "--device", "cpu",
                              "--dtype", "float32", "--log-level", "warning")
    try:
        assert [m["id"] for m in httpx.get(base + "/v1/models").json()["data"]] == [REPO_ID]
        card = httpx.get(f"{base}/v1/models/{REPO_ID}").json()
        assert card["id"] == REPO_ID and Path(card["root"]).name == COMMIT
        r = httpx.post(base + "/v1/images/generations", timeout=300, json={
            "prompt": "a tower", "size": "256x256", "model": REPO_ID, "num_inference_steps": 1, "bot_task": "image"})
        assert r.status_code == 200, r.text
    finally:
        proc.terminate()
        proc.wait(30)
