"""`diffgentor edit` / `t2i`: input parsing, resume, results CSV, retries, batching (fake engine, fast), and the
acceptance on the tiny model (8-row CSV, rerun, --no_resume, a killed run, the documented example commands)."""

from __future__ import annotations

import csv
import functools
import http.server
import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
from PIL import Image

from diffgentor.server.batch import data as D
from diffgentor.server.cli import main

REPO_ROOT = Path(__file__).resolve().parents[1]
FAST_ENV = {"DG_HUNYUAN_IMAGE_3_MAX_NEW_TOKENS": "6"}


# ---------------------------------------------------------------------------------------------------- helpers
def _img(path: Path, size=(64, 48), color=(200, 40, 40)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, color).save(path)
    return path


def _write_csv(path: Path, rows: list[dict], fields: list[str] | None = None) -> Path:
    fields = fields or list(dict.fromkeys(k for r in rows for k in r))
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fields)
        w.writeheader()
        w.writerows(rows)
    return path


def _read_csv(path: Path) -> dict[int, dict[str, str]]:
    with open(path, newline="") as f:
        return {int(r["index"]): r for r in csv.DictReader(f)}


def _pngs(folder: Path) -> list[str]:
    return sorted(p.name for p in Path(folder).glob("*.png"))


def _cli_env(**extra) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("DG_HUNYUAN_IMAGE_3_")}
    env.update(FAST_ENV)
    env.update(extra)
    return env


@pytest.fixture(scope="module")
def tiny_distil(tmp_path_factory) -> Path:
    from diffgentor.engine.testing.tiny_model import make_tiny

    # a folder name with dots, like the official one: it must just work
    return make_tiny(tmp_path_factory.mktemp("ckpt") / "tiny-HunyuanImage-3.0-Instruct-Distil", distil=True)


@pytest.fixture
def http_root(tmp_path):
    """A loopback HTTP server over a folder; yields (folder, base URL)."""
    root = tmp_path / "www"
    root.mkdir()

    class Quiet(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *a):
            pass

    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Quiet, directory=str(root)))
    th = threading.Thread(target=srv.serve_forever, daemon=True)
    th.start()
    try:
        yield root, f"http://127.0.0.1:{srv.server_address[1]}"
    finally:
        srv.shutdown()
        srv.server_close()


@pytest.fixture
def clean_env(monkeypatch):
    for k in list(os.environ):
        if k.startswith("DG_HUNYUAN_IMAGE_3_"):
            monkeypatch.delenv(k)
    for k, v in FAST_ENV.items():
        monkeypatch.setenv(k, v)


class FakeEngine:
    """Stands in for `Engine`: records every generate() call; rows whose prompt is in `fail` fail N times."""

    def __init__(self, fail: dict[str, int] | None = None) -> None:
        self.calls: list[list[dict]] = []
        self.fail = dict(fail or {})

    def generate(self, reqs):
        self.calls.append(list(reqs))
        out = []
        for r in reqs:
            if self.fail.get(r["prompt"], 0) > 0:
                self.fail[r["prompt"]] -= 1
                out.append(SimpleNamespace(image=None, text="", error="boom", finish_reason="error"))
            else:
                img = Image.new("RGB", (32, 32), (len(r["images"]) * 60, r["seed"] % 256, 0))
                out.append(SimpleNamespace(image=img, text=f"<think>{r['prompt']}</think>", error=None,
                                           finish_reason="image"))
        return out

    def close(self) -> None:
        pass


@pytest.fixture
def fake(monkeypatch, clean_env, tmp_path):
    from diffgentor.engine import offline

    engine = FakeEngine()
    monkeypatch.setattr(offline.Engine, "from_config", classmethod(lambda cls, config: engine))
    (tmp_path / "model").mkdir()
    return engine


def _edit(tmp_path, csv_path, *extra) -> int:
    return main(["edit", "--model_name", str(tmp_path / "model"), "--input", str(csv_path), "--output_dir",
                 str(tmp_path / "out"), "--no_progress", *map(str, extra)])


# ---------------------------------------------------------------------------------------------------- data
def test_image_cells_and_filters():
    assert D.split_image_cell('["a.png", "b.png"]') == ["a.png", "b.png"]
    assert D.split_image_cell("a.png, b.png") == ["a.png", "b.png"]
    assert D.split_image_cell("http://x/y.png") == ["http://x/y.png"]
    assert D.split_image_cell("") == [] and D.split_image_cell(None) == []
    assert D.split_image_cell({"bytes": b"abc", "path": "p.png"}) == [b"abc"]
    assert D.split_image_cell([{"bytes": b"a"}, b"b"]) == [b"a", b"b"]
    with pytest.raises(D.RowError):
        D.split_image_cell("[not json")
    assert D.parse_filter_rows("0:3", 10) == [0, 1, 2]
    assert D.parse_filter_rows("8:", 10) == [8, 9]
    assert D.parse_filter_rows("0,5,10,5", 8) == [0, 5]
    assert D.parse_filter_rows(":2,7", 10) == [0, 1, 7]
    assert D.parse_filter_rows(None, 3) == [0, 1, 2]
    with pytest.raises(D.InputError):
        D.parse_filter_rows("a:b", 3)


def test_download_cache_and_timeout(http_root, tmp_path):
    root, base = http_root
    _img(root / "c.png")
    cache = tmp_path / "cache"
    data = D.download(f"{base}/c.png", cache)
    assert Image.open(cache / next(p.name for p in cache.iterdir())).size == (64, 48)
    (root / "c.png").unlink()  # the cached copy is reused
    assert D.download(f"{base}/c.png", cache) == data
    with pytest.raises(D.RowError, match="download of .* failed"):
        D.download(f"{base}/missing.png", cache, timeout=5)


def test_bad_input_file_errors(tmp_path, fake, capsys):
    p = _write_csv(tmp_path / "d.csv", [{"index": "1", "instruction": "a"}, {"index": "1", "instruction": "b"}])
    assert _edit(tmp_path, p) == 2
    assert "share index 1" in capsys.readouterr().err
    p = _write_csv(tmp_path / "e.csv", [{"prompt": "a"}])
    assert _edit(tmp_path, p) == 2
    assert "no 'instruction' column" in capsys.readouterr().err
    assert _edit(tmp_path, tmp_path / "nope.csv") == 2
    assert "input not found" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------------- fake engine
def test_bad_rows_batching_resume_and_merge(tmp_path, fake, capsys):
    _img(tmp_path / "imgs" / "a.png")
    (tmp_path / "imgs" / "bad.png").write_bytes(b"not an image")
    rows = [
        {"index": "10", "input_images": "imgs/a.png", "instruction": "one"},
        {"index": "11", "image_url": "imgs/a.png,imgs/a.png", "instruction": "two"},
        {"index": "12", "instruction": "none"},
        {"index": "13", "input_images": "imgs/bad.png", "instruction": "unreadable"},
        {"index": "14", "input_images": json.dumps(["imgs/a.png"] * 4), "instruction": "four"},
        {"index": "15", "input_images": "imgs/a.png", "instruction": "  "},
        {"index": "16", "input_images": "imgs/missing.png", "instruction": "missing"},
        {"index": "17", "input_images": "[broken", "instruction": "badjson"},
        {"index": "18", "instruction": "last"},
    ]
    p = _write_csv(tmp_path / "data.csv", rows, ["index", "input_images", "image_url", "instruction"])
    assert _edit(tmp_path, p, "--batch_size", 2, "--seed", 5) == 1
    err = capsys.readouterr().err
    assert "4 generated, 0 skipped (already done), 5 failed of 9 row(s)" in err
    out = tmp_path / "out"
    assert _pngs(out) == ["000010.png", "000011.png", "000012.png", "000018.png"]
    # batches of 2 rows; bad rows never reach the engine, the batch goes on
    assert [len(c) for c in fake.calls] == [2, 1, 1]
    assert [len(r["images"]) for c in fake.calls for r in c] == [1, 2, 0, 0]
    assert all(r["seed"] == 5 for c in fake.calls for r in c)
    res = _read_csv(out / "results.csv")
    assert list(next(iter(res.values())))[:4] == ["index", "input_images", "image_url", "instruction"]
    assert list(next(iter(res.values())))[-3:] == ["output_image", "instruction_enhanced", "error"]
    assert res[10]["instruction_enhanced"] == "<think>one</think>" and res[10]["error"] == ""
    assert res[10]["output_image"].endswith("000010.png")
    assert "not a readable image" in res[13]["error"]
    assert "4 input images; at most 3" in res[14]["error"]
    assert res[15]["error"] == "empty instruction"
    assert "not found" in res[16]["error"] and "JSON" in res[17]["error"]

    # rerun: the 4 images are skipped, the bad rows are tried again and still fail
    mtimes = {n: (out / n).stat().st_mtime_ns for n in _pngs(out)}
    fake.calls.clear()
    assert _edit(tmp_path, p) == 1
    assert "4 already done (skipped)" in capsys.readouterr().err
    assert fake.calls == []
    assert {n: (out / n).stat().st_mtime_ns for n in _pngs(out)} == mtimes
    assert len(_read_csv(out / "results.csv")) == 9

    # a run over a subset keeps the other rows of the results CSV
    assert _edit(tmp_path, p, "--filter_rows", "0:2", "--no_resume") == 0
    assert [len(c) for c in fake.calls] == [2]
    res2 = _read_csv(out / "results.csv")
    assert set(res2) == set(res) and res2[18]["output_image"].endswith("000018.png")

    # --no_resume regenerates every image
    fake.calls.clear()
    assert _edit(tmp_path, p, "--no_resume") == 1
    assert sum(len(c) for c in fake.calls) == 4

    # a results CSV lost (run killed between image and CSV): rebuilt from the images' own text chunks
    (out / "results.csv").unlink()
    (out / ".000012.png.x1y2.tmp").write_bytes(b"partial")  # left by a killed write
    fake.calls.clear()
    assert _edit(tmp_path, p, "--filter_rows", "0:3") == 0
    assert fake.calls == []
    res3 = _read_csv(out / "results.csv")
    assert res3[11]["instruction_enhanced"] == "<think>two</think>" and res3[11]["error"] == ""
    assert not list(out.glob(".*.tmp"))


def test_retries(tmp_path, fake, capsys):
    p = _write_csv(tmp_path / "d.csv", [{"instruction": "flaky"}, {"instruction": "dead"}, {"instruction": "ok"}])
    fake.fail.update(flaky=2, dead=99)
    assert _edit(tmp_path, p, "--max_retries", 2) == 1
    res = _read_csv(tmp_path / "out" / "results.csv")
    assert res[0]["error"] == "" and res[1]["error"] == "boom" and res[2]["error"] == ""
    assert [len(c) for c in fake.calls] == [3, 2, 2]  # only failed rows are retried, still batched
    assert "1 failed" in capsys.readouterr().err


def test_parquet_embedded_images(tmp_path, fake):
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    import io

    buf = io.BytesIO()
    Image.new("RGB", (40, 40), "blue").save(buf, format="PNG")
    png = buf.getvalue()
    folder = tmp_path / "pq"
    folder.mkdir()
    t1 = pa.table({"index": [3, 4], "instruction": ["a", "b"],
                   "input_images": [[{"bytes": png, "path": "x.png"}], [{"bytes": png, "path": None}] * 2]})
    t2 = pa.table({"index": [5], "instruction": ["c"], "input_images": [[{"bytes": b"junk", "path": None}]]})
    pq.write_table(t1, folder / "data-00000.parquet")
    pq.write_table(t2, folder / "data-00001.parquet")
    assert _edit(tmp_path, folder) == 1
    assert _pngs(tmp_path / "out") == ["000003.png", "000004.png"]
    res = _read_csv(tmp_path / "out" / "results.csv")
    assert res[4]["input_images"] == "<2 embedded images>"
    assert "embedded image 0 is not a readable image" in res[5]["error"]
    # a single parquet file works too
    shutil.rmtree(tmp_path / "out")
    assert _edit(tmp_path, folder / "data-00000.parquet") == 0


def test_t2i_prompts(tmp_path, fake, capsys):
    pf = tmp_path / "p.jsonl"
    pf.write_text('{"prompt": "a cat", "index": 7}\n"a dog"\n')
    rc = main(["t2i", "--model_name", str(tmp_path / "model"), "--prompts_file", str(pf), "--output_dir",
               str(tmp_path / "out"), "--num_images_per_prompt", "2", "--height", "256", "--width", "512",
               "--no_progress"])
    assert rc == 0
    assert _pngs(tmp_path / "out") == ["000001_00.png", "000001_01.png", "000007_00.png", "000007_01.png"]
    reqs = [r for c in fake.calls for r in c]
    assert {r["image_size"] for r in reqs} == {"256x512"} and sorted(r["seed"] for r in reqs) == [42, 42, 43, 43]
    with open(tmp_path / "out" / "results.csv") as f:
        recs = list(csv.DictReader(f))
    assert [(r["index"], r["image_num"]) for r in recs] == [("1", "0"), ("1", "1"), ("7", "0"), ("7", "1")]
    assert main(["t2i", "--model_name", str(tmp_path / "model"), "--prompt", "x", "--height", "256"]) == 2
    assert "--height and --width go together" in capsys.readouterr().err


def test_flag_and_env_errors(tmp_path, fake, capsys, monkeypatch):
    p = _write_csv(tmp_path / "d.csv", [{"instruction": "x"}])
    assert _edit(tmp_path, p, "--backend", "diffusers") == 2
    assert "only backend is hunyuan_image_3" in capsys.readouterr().err
    assert main(["edit", "--model_name", str(tmp_path / "nope"), "--input", str(p)]) == 2
    assert "no such checkpoint folder" in capsys.readouterr().err
    monkeypatch.setenv("DG_HUNYUAN_IMAGE_3_BOT_TASK", "draw")
    assert _edit(tmp_path, p) == 2
    err = capsys.readouterr().err
    assert "DG_HUNYUAN_IMAGE_3_BOT_TASK" in err and "think_recaption" in err
    assert fake.calls == []
    monkeypatch.setenv("DG_HUNYUAN_IMAGE_3_BOT_TASK", "image")
    assert _edit(tmp_path, p, "--model_type", "hunyuan_image_3") == 0


def test_child_instance_failure_is_reported(tmp_path, fake, capsys, monkeypatch):
    p = _write_csv(tmp_path / "d.csv", [{"instruction": "a"}, {"instruction": "b"}])
    crash = tmp_path / "crash.sh"
    crash.write_text("#!/bin/sh\necho dying >&2\nexit 3\n")
    crash.chmod(0o755)
    monkeypatch.setattr(sys, "executable", str(crash))
    assert _edit(tmp_path, p, "--num_instances", 2) == 1
    err = capsys.readouterr().err
    assert "instance 0 on CPU failed with exit code 3" in err and "dying" in err
    res = _read_csv(tmp_path / "out" / "results.csv")
    assert "instance 1 (CPU) exited with code 3" in res[1]["error"]
    assert not (tmp_path / "out" / ".instances").exists()


# ---------------------------------------------------------------------------------------------------- tiny model
def test_acceptance_tiny_model(tmp_path, tiny_distil, http_root, clean_env, capsys):
    """8 rows (0-3 images, both column names, relative/absolute paths, a loopback URL, 2 bad rows) -> 6 images,
    results with instruction_enhanced and errors, exit 1; a rerun skips the 6; --no_resume regenerates."""
    www, base = http_root
    _img(www / "remote.png", (48, 64), (10, 200, 10))
    a = _img(tmp_path / "data" / "imgs" / "a.png")
    _img(tmp_path / "data" / "imgs" / "b.png", (64, 64), (10, 10, 200))
    rows = [
        {"index": "0", "input_images": json.dumps(["imgs/a.png"]), "instruction": "make the sky purple"},
        {"index": "1", "image_url": "imgs/a.png,imgs/b.png", "instruction": "put the cube of image 1 in image 2"},
        {"index": "2", "input_images": json.dumps(["imgs/a.png", "imgs/b.png", f"{base}/remote.png"]),
         "instruction": "combine all three"},
        {"index": "3", "instruction": "a red cube on a table"},
        {"index": "4", "image_url": f"{base}/remote.png", "instruction": "turn it into a watercolor"},
        {"index": "5", "input_images": str(a), "instruction": "add a moon"},
        {"index": "6", "input_images": "imgs/missing.png", "instruction": "missing file"},
        {"index": "7", "input_images": "imgs/a.png,imgs/a.png,imgs/b.png,imgs/b.png", "instruction": "four"},
    ]
    p = _write_csv(tmp_path / "data" / "data.csv", rows, ["index", "input_images", "image_url", "instruction"])
    out = tmp_path / "out"
    args = ["edit", "--backend", "hunyuan_image_3", "--model_name", str(tiny_distil), "--input", str(p),
            "--output_dir", str(out), "--num_inference_steps", "1", "--seed", "7", "--batch_size", "8"]
    assert main(args) == 1
    err = capsys.readouterr().err
    assert "6 generated, 0 skipped (already done), 2 failed of 8 row(s)" in err
    assert _pngs(out) == [f"{i:06d}.png" for i in range(6)]
    res = _read_csv(out / "results.csv")
    assert len(res) == 8
    for i in range(6):
        assert res[i]["error"] == "" and res[i]["output_image"] == str(out / f"{i:06d}.png")
        assert "<think>" in res[i]["instruction_enhanced"] or "<recaption>" in res[i]["instruction_enhanced"]
        Image.open(out / f"{i:06d}.png").load()
    assert "not found" in res[6]["error"] and "4 input images" in res[7]["error"]
    assert res[4]["image_url"] == f"{base}/remote.png"
    assert list((out / ".image_cache").iterdir())  # the URL went through the cache folder

    mtimes = {n: (out / n).stat().st_mtime_ns for n in _pngs(out)}
    assert main(args) == 1  # only the 2 bad rows are tried again
    assert "6 already done (skipped), 2 to generate" in capsys.readouterr().err
    assert {n: (out / n).stat().st_mtime_ns for n in _pngs(out)} == mtimes
    assert len(_read_csv(out / "results.csv")) == 8

    assert main([*args, "--no_resume", "--filter_rows", "3"]) == 0  # (all rows: the fake-engine test)
    assert (out / "000003.png").stat().st_mtime_ns != mtimes["000003.png"]
    assert len(_read_csv(out / "results.csv")) == 8


def test_killed_run_loses_nothing(tmp_path, tiny_distil, clean_env):
    p = _write_csv(tmp_path / "d.csv", [{"instruction": f"a red cube number {i}"} for i in range(4)])
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "diffgentor.server.cli", "edit", "--model_name", str(tiny_distil), "--input",
           str(p), "--output_dir", str(out), "--num_inference_steps", "1", "--batch_size", "1", "--image_size",
           "256x256", "--no_progress"]
    proc = subprocess.Popen(cmd, env=_cli_env(DG_HUNYUAN_IMAGE_3_BOT_TASK="image"), start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    while not _pngs(out) and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    done = _pngs(out)
    assert 1 <= len(done) < 4, proc.stderr.read().decode()[-2000:]
    for n in done:  # no partial image under a final name
        Image.open(out / n).load()
    assert main(["edit", "--model_name", str(tiny_distil), "--input", str(p), "--output_dir", str(out),
                 "--num_inference_steps", "1", "--image_size", "256x256", "--no_progress"]) == 0
    assert _pngs(out) == [f"{i:06d}.png" for i in range(4)]
    res = _read_csv(out / "results.csv")
    assert len(res) == 4 and all(r["error"] == "" and r["output_image"] for r in res.values())
    assert not list(out.glob(".*.tmp"))


# slow (CI runs it: make test-slow): ~11 s; instance planning and child failures:
#   test_child_instance_failure_is_reported runs by default
@pytest.mark.slow
def test_two_cpu_instances(tmp_path, tiny_distil):
    p = _write_csv(tmp_path / "d.csv", [{"index": str(10 + i), "instruction": f"a cube {i}"} for i in range(3)])
    out = tmp_path / "out"
    r = subprocess.run(
        [sys.executable, "-m", "diffgentor.server.cli", "edit", "--backend", "hunyuan_image_3", "--model_name",
         str(tiny_distil), "--input", str(p), "--output_dir", str(out), "--num_inference_steps", "1",
         "--image_size", "256x256", "--num_instances", "2", "--log_dir", str(tmp_path / "logs")],
        env=_cli_env(DG_HUNYUAN_IMAGE_3_BOT_TASK="image"), capture_output=True, text=True, timeout=300,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    assert "2 instances: 0 on CPU (2 rows" in r.stderr and "1 on CPU (1 rows" in r.stderr
    assert _pngs(out) == ["000010.png", "000011.png", "000012.png"]
    res = _read_csv(out / "results.csv")
    assert sorted(res) == [10, 11, 12] and all(v["error"] == "" for v in res.values())
    assert (tmp_path / "logs" / "instance0.log").is_file() and (tmp_path / "logs" / "instance1.log").is_file()
    assert not (out / ".instances").exists()


SEED_EXAMPLES = [
    # Basic Usage
    """diffgentor edit --backend hunyuan_image_3 \\
    --model_name ./HunyuanImage-3-Instruct-Distil \\
    --input data.csv \\
    --output_dir ./output \\
    --num_inference_steps 8""",
    # Basic Editing (Distilled Model)
    """diffgentor edit --backend hunyuan_image_3 \\
    --model_name ./HunyuanImage-3-Instruct-Distil \\
    --input data.csv \\
    --num_inference_steps 8""",
    # With FlashInfer Acceleration
    """DG_HUNYUAN_IMAGE_3_MOE_IMPL=flashinfer \\
diffgentor edit --backend hunyuan_image_3 \\
    --model_name ./HunyuanImage-3-Instruct-Distil \\
    --input data.csv \\
    --num_inference_steps 8""",
    # Direct Image Generation (No CoT)
    """DG_HUNYUAN_IMAGE_3_BOT_TASK=image \\
diffgentor edit --backend hunyuan_image_3 \\
    --model_name ./HunyuanImage-3-Instruct-Distil \\
    --input data.csv""",
    # Single Instance on All GPUs
    """CUDA_VISIBLE_DEVICES=0,1,2,3,4,5,6,7 \\
diffgentor edit --backend hunyuan_image_3 \\
    --model_name ./HunyuanImage-3-Instruct-Distil \\
    --input data.csv""",
    # Multiple Instances (Tensor Parallelism)
    """CUDA_VISIBLE_DEVICES=0,1,2,3,4,5,6,7 \\
DG_HUNYUAN_IMAGE_3_GPUS_PER_MODEL=4 \\
diffgentor edit --backend hunyuan_image_3 \\
    --model_name ./HunyuanImage-3-Instruct-Distil \\
    --model_type hunyuan_image_3 \\
    --input data.csv""",
    # 4 Instances on 8 GPUs
    """CUDA_VISIBLE_DEVICES=0,1,2,3,4,5,6,7 \\
DG_HUNYUAN_IMAGE_3_GPUS_PER_MODEL=2 \\
diffgentor edit --backend hunyuan_image_3 \\
    --model_name ./HunyuanImage-3-Instruct-Distil \\
    --model_type hunyuan_image_3 \\
    --input data.csv""",
]
FULL_MODEL_EXAMPLE = """diffgentor edit --backend hunyuan_image_3 \\
    --model_name ./HunyuanImage-3-Instruct \\
    --input data.csv \\
    --num_inference_steps 50"""


def _run_example(text: str, monkeypatch) -> int:
    words = shlex.split(text.replace("\\\n", " "))
    env = {}
    while "=" in words[0]:
        k, v = words.pop(0).split("=", 1)
        env[k] = v
    assert words[0] == "diffgentor"
    with monkeypatch.context() as m:
        for k, v in env.items():
            m.setenv(k, v)
        return main(words[1:])


def _example_dir(tmp_path, tiny_distil) -> Path:
    os.symlink(tiny_distil, tmp_path / "HunyuanImage-3-Instruct-Distil")
    # one row without input images keeps these CPU runs short; input images are covered by the acceptance test
    _write_csv(tmp_path / "data.csv", [{"image_url": "", "instruction": "a blue cube"}])
    return tmp_path


def _check_examples(examples, tmp_path, tiny_distil, monkeypatch, capsys):
    monkeypatch.chdir(_example_dir(tmp_path, tiny_distil))
    for text in examples:
        shutil.rmtree("output", ignore_errors=True)
        assert _run_example(text, monkeypatch) == 0, text
        assert _pngs(Path("output")) == ["000000.png"], text
        err = capsys.readouterr().err
        if "MOE_IMPL=flashinfer" in text:
            assert "DG_HUNYUAN_IMAGE_3_MOE_IMPL=flashinfer" in err and "using eager" in err
        if "BOT_TASK=image" in text:
            assert "<think>" not in _read_csv(Path("output/results.csv"))[0]["instruction_enhanced"]  # no CoT


def test_seed_examples_flashinfer_and_no_cot(tmp_path, tiny_distil, clean_env, monkeypatch, capsys):
    """Two of the documented commands (`SEED_EXAMPLES`) word for word, in a folder holding the tiny checkpoint
    under their folder name: MOE_IMPL=flashinfer on a CPU falls back to eager with a warning; BOT_TASK=image skips
    the CoT."""
    _check_examples(SEED_EXAMPLES[2:4], tmp_path, tiny_distil, monkeypatch, capsys)


@pytest.mark.slow
def test_seed_examples_verbatim(tmp_path, tiny_distil, clean_env, monkeypatch, capsys):
    """Every documented edit command (`SEED_EXAMPLES`), word for word (the multi-GPU ones run as CPU instances here)."""
    _check_examples(SEED_EXAMPLES, tmp_path, tiny_distil, monkeypatch, capsys)


@pytest.mark.slow
def test_seed_full_model_example(tmp_path, clean_env, monkeypatch):
    from diffgentor.engine.testing.tiny_model import make_tiny

    make_tiny(tmp_path / "HunyuanImage-3-Instruct")
    _write_csv(tmp_path / "data.csv", [{"image_url": "", "instruction": "a blue cube"}])
    monkeypatch.chdir(tmp_path)
    assert _run_example(FULL_MODEL_EXAMPLE, monkeypatch) == 0
    assert _pngs(Path("output")) == ["000000.png"]


def test_t2i_tiny_model(tmp_path, tiny_distil, clean_env):
    rc = main(["t2i", "--model_name", str(tiny_distil), "--prompt", "a red cube", "--output_dir",
               str(tmp_path / "out"), "--num_inference_steps", "1", "--height", "256", "--width", "256"])
    assert rc == 0
    assert Image.open(tmp_path / "out" / "000000.png").size == (256, 256)
    assert "<think>" in _read_csv(tmp_path / "out" / "results.csv")[0]["instruction_enhanced"]


def test_model_load_failure_and_lazy_load(tmp_path, clean_env, capsys):
    (tmp_path / "model").mkdir()  # not a checkpoint
    bad = _write_csv(tmp_path / "bad.csv", [{"input_images": "missing.png", "instruction": "x"}])
    assert _edit(tmp_path, bad) == 1  # only bad rows: the model is never loaded
    assert "could not load" not in capsys.readouterr().err
    good = _write_csv(tmp_path / "good.csv", [{"instruction": "x"}])
    assert _edit(tmp_path, good) == 2
    assert "could not load the model" in capsys.readouterr().err
