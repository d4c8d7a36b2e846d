"""`diffgentor bench offline` end to end on the tiny Distil checkpoint and a 2-request workload (one text-to-image,
one edit), through the CLI: the JSON's counts, its phase split (a partition of the wall time that the engine's own
counters must explain) and its latency summaries."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from PIL import Image

from diffgentor.bench.offline import WorkloadError, load_workload, take, warmup_requests
from diffgentor.engine.testing.tiny_model import make_tiny
from diffgentor.server.cli import main as cli

REPO = Path(__file__).resolve().parents[1]
COND = REPO / "bench" / "workloads" / "mixed8" / "cond0.png"


def _workload(tmp_path: Path) -> Path:
    # a square crop maps to the 256x256 condition bucket: the edit path runs without the cost of 1024x768
    Image.open(COND).convert("RGB").crop((16, 0, 112, 96)).save(tmp_path / "cond.png")
    common = {"image_size": "256x256", "bot_task": "think_recaption", "max_new_tokens": 4, "num_inference_steps": 2}
    rows = [{"prompt": "a red cube on a table", "seed": 1, **common},
            {"prompt": "把天空变成紫色", "images": ["cond.png"], "seed": 2, "output_type": "latent", **common}]
    path = tmp_path / "w.jsonl"
    path.write_text("\n".join(json.dumps(r, ensure_ascii=False) for r in rows) + "\n", encoding="utf-8")
    return path


def test_bench_offline_cli_end_to_end(tmp_path):
    ckpt = make_tiny(tmp_path / "ckpt", distil=True)
    out = tmp_path / "result.json"
    rc = cli(["bench", "offline", "--preset", "tiny", "--model", str(ckpt), "--workload", str(_workload(tmp_path)),
              "--warmup", "0", "--save-result", str(out)])
    assert rc == 0
    d = json.loads(out.read_text())
    assert (d["num_requests"], d["num_t2i"], d["num_edit"], d["complete"]) == (2, 1, 1, True)
    assert d["git_commit"] and len(d["loadavg_before"]) == 3 and len(d["loadavg_after"]) == 3
    assert d["torch_threads"] >= 1 and d["cpu_model"]
    (run,) = d["runs"]
    assert run["errors"] == [] and run["num_images"] == 2
    assert run["think_tokens"] >= 2 and run["diffusion_steps"] == 4 and run["engine_steps"] > 0
    dur, phases = run["duration_s"], run["phase_time_s"]
    assert sum(phases.values()) == pytest.approx(dur, rel=1e-6)
    # the engine's counters explain the run: nothing counted twice, little left unexplained
    assert -0.02 * dur <= phases["other"] <= 0.5 * dur
    assert all(v >= 0 for k, v in phases.items() if k != "other")
    for k in ("prefill", "think", "diffusion", "vae_decode"):
        assert phases[k] > 0, k
    assert run["phase_tokens"]["diffuse"] > 0 and run["phase_tokens"]["decode"] > 0
    for kind in ("t2i", "edit"):
        lat = run["latency"][kind]
        assert lat["completed"] == 1
        for metric in ("first_token_s", "e2e_s"):
            s = lat[metric]
            assert s["count"] == 1 and 0 < s["p50"] <= s["p99"] <= s["max"]
        assert lat["first_token_s"]["max"] <= lat["e2e_s"]["max"]
    assert run["latency"]["all"]["e2e_s"]["count"] == 2
    assert d["summary"]["mns4"]["images_per_min"]["mean"] == pytest.approx(run["images_per_min"])
    # what the kernel did for the engine: counts next to the wall time, and which heap policy ran
    assert run["heap_reuse_bytes"] == 4 << 30
    assert run["cpu"]["user_s"] > 0 and run["cpu"]["minor_faults"] >= 0 and "children_system_s" in run["cpu"]
    assert run["cpu"]["voluntary_switches"] > 0  # the encode thread sleeps on its queue between images, at least
    assert run["cpu"]["involuntary_switches"] >= 0 and "children_voluntary_switches" in run["cpu"]
    assert d["summary"]["mns4"]["cpu"]["user_s"] == pytest.approx(run["cpu"]["user_s"])
    digests = {r["kind"]: r["image_sha256"] for r in run["requests"]}
    assert len(digests["t2i"]) == 16 and digests["edit"] is None  # the edit asks for latents: no image
    assert d["images_per_min"] == pytest.approx(120.0 / dur, rel=1e-6)


def test_workload_errors_name_the_line(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "ok"}\n\n{"prompt": "x", "colour": 1}\n')
    with pytest.raises(WorkloadError, match=r"bad.jsonl:3: unknown fields \['colour'\]"):
        load_workload(bad)
    bad.write_text('{"prompt": "x", "images": ["missing.png"]}\n')
    with pytest.raises(WorkloadError, match=r":1: cannot read image"):
        load_workload(bad)
    bad.write_text("[1]\n")
    with pytest.raises(WorkloadError, match=r":1: a request must be a JSON object"):
        load_workload(bad)


def test_checked_in_workload_and_helpers():
    reqs = load_workload(REPO / "bench" / "workloads" / "mixed_t2i_edit_8.jsonl")
    assert len(reqs) == 8 and sum(bool(r["images"]) for r in reqs) == 4
    assert any(not r["prompt"].isascii() for r in reqs) and any(r["prompt"].isascii() for r in reqs)
    for r in reqs:
        assert (r["image_size"], r["bot_task"], r["max_new_tokens"], r["num_inference_steps"]) == \
            ("256x256", "think_recaption", 32, 8)
    for png in sorted((REPO / "bench" / "workloads" / "mixed8").glob("*.png")):
        img = Image.open(png)
        assert img.size == (128, 96) and png.stat().st_size < 50_000
        assert len(img.convert("RGB").getcolors(maxcolors=1 << 16) or []) > 8  # a picture, not a flat fill
    cycled = take(reqs, 10)
    assert [r["request_id"] for r in cycled[-2:]] == ["w1.1", "w2.1"] and cycled[8]["prompt"] == reqs[0]["prompt"]
    warm = warmup_requests(reqs)
    assert [bool(r["images"]) for r in warm] == [False, True]
    assert warm[1]["images"][0] != reqs[1]["images"][0] and warm[1]["prompt"] != reqs[1]["prompt"]


def test_make_tiny_size_flags_are_checked(tmp_path, capsys):
    assert cli(["make-tiny", str(tmp_path / "a"), "--topk", "9"]) == 2
    assert "topk (9) must be <= experts (4)" in capsys.readouterr().err
    assert cli(["make-tiny", str(tmp_path / "b"), "--size", "small", "--heads", "6", "--kv-heads", "4"]) == 2
    assert "heads (6) must be a multiple of kv_heads (4)" in capsys.readouterr().err
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_preset_warmup_without_images(tmp_path):
    """The README's first benchmark (`bench offline --preset small --compare-max-num-seqs 1`, text-to-image presets
    without images) warmed up with KeyError 'images'; here on the tiny preset, one prompt."""
    from diffgentor.bench.offline import PRESETS, preset_requests

    (warm,) = warmup_requests(preset_requests(PRESETS["small"], 2))
    assert warm["images"] == [] and warm["prompt"].startswith("warm-up: ")
    out = tmp_path / "r.json"
    assert cli(["bench", "offline", "--preset", "tiny", "--num-prompts", "1", "--warmup", "1",
                "--compare-max-num-seqs", "1", "--max-num-seqs", "2", "--save-result", str(out)]) == 0
    d = json.loads(out.read_text())
    assert [r["max_num_seqs"] for r in d["runs"]] == [2, 1] and all(r["num_images"] == 1 for r in d["runs"])


@pytest.mark.slow
def test_bench_offline_compare_allocator_end_to_end(tmp_path):
    """Both heap policies, each in a fresh process: faults counted per side, images identical."""
    ckpt = make_tiny(tmp_path / "ckpt", distil=True)
    out = tmp_path / "ab.json"
    rc = cli(["bench", "offline", "--preset", "tiny", "--model", str(ckpt), "--workload", str(_workload(tmp_path)),
              "--warmup", "1", "--compare-allocator", "--save-result", str(out)])
    d = json.loads(out.read_text())
    assert rc == 0 and d["complete"] and d["identical_images"], d.get("ratio")
    assert d["heap_reuse_bytes"] == {"glibc_default": 0, "heap_reuse": 4 << 30}
    sides = d["runs"]
    assert [r["heap_reuse_bytes"] for r in sides["glibc_default"] + sides["heap_reuse"]] == [0, 4 << 30]
    assert d["ratio"]["cpu_minor_faults"] < 1.0 and d["ratio"]["images_per_min"] > 0
    assert d["cpu_bound"]["without_system_time"] > 1.0 and d["cpu_bound"]["cpu_s"] > 0


def test_allocator_cpu_bound_from_cpu_seconds():
    """The allocator A/B's counted bound (the last quiet mixed-workload run's CPU seconds): images/min can rise by the
    CPU seconds saved, and by (user + system) / user at most, whatever the heap policy."""
    from diffgentor.bench.offline import cpu_bound

    b = cpu_bound({"user_s": 35.78, "system_s": 7.35}, {"user_s": 36.65, "system_s": 0.60})
    assert b["cpu_s"] == pytest.approx(43.13 / 37.25) and b["without_system_time"] == pytest.approx(43.13 / 35.78)
    assert cpu_bound({"user_s": 0.0, "system_s": 0.0}, {"user_s": 0.0, "system_s": 0.0}) == {
        "cpu_s": None, "without_system_time": None}


def test_compare_async_encode_reports_both_settings(tmp_path):
    """Before (encodes inside the steps) vs after (beside them) in one run: both settings' runs, latency by kind and
    images/min side by side."""
    ckpt = make_tiny(tmp_path / "ckpt", distil=True)
    out = tmp_path / "result.json"
    assert cli(["bench", "offline", "--preset", "tiny", "--model", str(ckpt), "--workload", str(_workload(tmp_path)),
                "--warmup", "0", "--compare-async-encode", "--save-result", str(out)]) == 0
    d = json.loads(out.read_text())
    assert d["settings"] == ["mns4_inline", "mns4"] and d["complete"]
    assert [(r["max_num_seqs"], r["async_encode"]) for r in d["runs"]] == [(4, False), (4, True)]
    assert all(r["errors"] == [] and r["num_images"] == 2 for r in d["runs"])
    c = d["encode_comparison"]["mns4"]
    for key in ("t2i_e2e_mean_s", "edit_e2e_mean_s", "images_per_min"):
        assert c[key]["inline"] > 0 and c[key]["async"] > 0
        assert c[key]["ratio"] == pytest.approx(c[key]["async"] / c[key]["inline"])
    assert c["images_per_min"]["async"] == pytest.approx(d["summary"]["mns4"]["images_per_min"]["mean"])


def test_layouts_parse_and_the_image_step_time():
    """`--layouts` names (engine/parallel_layout.py) and the per-step image time: only steps that ran nothing but
    denoising steps count (a prefill or think token in the same step would be timed as image time)."""
    from diffgentor.bench.offline import Setting, image_step_time, parse_layout

    assert parse_layout("tp2xcfg2") == {"tensor_parallel_size": 2, "cfg_parallel_size": 2,
                                        "sequence_parallel_size": 1}
    assert parse_layout("CFG2") == {"tensor_parallel_size": 1, "cfg_parallel_size": 2, "sequence_parallel_size": 1}
    for bad, msg in (("tp2xpp2", "joined by 'x'"), ("cfg", "joined by 'x'"), ("cfg3", "must be 1 or 2")):
        with pytest.raises(ValueError, match=msg):
            parse_layout(bad)
    assert Setting(4, True, "cfg2").key == "mns4_cfg2" and Setting(4).key == "mns4"
    steps = [
        {"wall_s": 5.0, "tokens": {"prefill": 100, "decode": 0, "diffuse": 0}, "diffusion_steps": 0},
        {"wall_s": 3.0, "tokens": {"prefill": 0, "decode": 1, "diffuse": 514}, "diffusion_steps": 1},  # mixed
        {"wall_s": 2.0, "tokens": {"prefill": 0, "decode": 0, "diffuse": 1028}, "diffusion_steps": 2},
        {"wall_s": 1.0, "tokens": {"prefill": 0, "decode": 0, "diffuse": 514}, "diffusion_steps": 1},
        {"wall_s": 0.1, "tokens": {"prefill": 0, "decode": 0, "diffuse": 0}, "diffusion_steps": 1},  # Taylor step
    ]
    t = image_step_time(steps)
    assert t["steps"] == 3 and t["mean_s"] == pytest.approx(3.1 / 3)
    assert t["per_denoising_step_s"] == pytest.approx(3.1 / 4)
    assert image_step_time([]) == {"steps": 0.0, "mean_s": 0.0, "per_denoising_step_s": 0.0}


def test_bench_offline_takes_the_latency_first_settings(tmp_path, monkeypatch):
    """`--encode-defer-ms`, `--max-num-image-tokens` and `--max-step-ms` reach the engine and the result says so."""
    from diffgentor.engine.config import EngineConfig

    configs = []
    from_cli_and_env = EngineConfig.from_cli_and_env
    monkeypatch.setattr(EngineConfig, "from_cli_and_env", classmethod(
        lambda cls, *a, **kw: configs.append(from_cli_and_env(*a, **kw)) or configs[-1]))
    ckpt = make_tiny(tmp_path / "ckpt", distil=True)
    out = tmp_path / "result.json"
    rc = cli(["bench", "offline", "--preset", "tiny", "--model", str(ckpt), "--workload", str(_workload(tmp_path)),
              "--warmup", "0", "--encode-defer-ms", "5000", "--max-num-image-tokens", "1", "--max-step-ms", "500",
              "--no-async-decode", "--save-result", str(out)])
    assert rc == 0
    d = json.loads(out.read_text())
    assert d["scheduling"] == {"max_num_image_tokens": 1, "encode_defer_ms": 5000.0, "max_step_ms": 500.0}
    (run,) = d["runs"]
    assert run["errors"] == [] and run["num_images"] == 2
    sched = configs[-1].scheduler  # the engine the timed run used
    assert (sched.encode_defer_ms, sched.max_num_image_tokens, sched.max_step_ms, sched.async_decode) == \
        (5000.0, 1, 500.0, False)
