"""What a new user installs and runs first: the distribution's name and extras, the Makefile's torch index logic
(the CPU build, never PyPI's CUDA build, without asking an unreachable index where a local wheel resolves), a
`diffgentor --help` that loads no torch, and clear messages where a GPU tool runs on CPU."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

tomllib = pytest.importorskip("tomllib")  # Python 3.11+
REPO = Path(__file__).resolve().parents[1]
PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())


def test_distribution_name_is_not_the_unrelated_pypi_project():
    """PyPI's `diffgentor` is another project (0.1.2 > our 0.1.0): `pip install -U diffgentor` would replace this
    checkout. The import package and the command keep the name."""
    import diffgentor

    assert PYPROJECT["project"]["name"] == diffgentor.DISTRIBUTION != "diffgentor"
    assert PYPROJECT["project"]["scripts"] == {"diffgentor": "diffgentor.server.cli:main"}
    assert PYPROJECT["tool"]["setuptools"]["package-dir"] == {"diffgentor": "."}


def test_fast_moving_extras_have_upper_bounds():
    extras = PYPROJECT["project"]["optional-dependencies"]
    for extra in ("ray", "integration"):
        (ray,) = [r for r in extras[extra] if r.startswith("ray")]
        assert "<" in ray, ray


def test_cpu_constraint_pins_the_cpu_build():
    pins = [line for line in (REPO / "constraints-cpu.txt").read_text().splitlines() if line.startswith("torch==")]
    assert len(pins) == 1 and pins[0].endswith("+cpu"), pins  # PyPI has no +cpu build: never its CUDA wheel


def _make_install(tmp_path: Path, local_torch: bool, *make_vars: str) -> list[str]:
    """`make install` with a recording stand-in for the venv's python: the pip commands it would run."""
    venv = tmp_path / "venv"
    (venv / "bin").mkdir(parents=True)
    log = tmp_path / "calls.log"
    fake = venv / "bin" / "python"
    fake.write_text(f'#!/bin/sh\necho "$*" >> {log}\ncase "$*" in *--dry-run*) exit {0 if local_torch else 1};; '
                    "esac\nexit 0\n")
    fake.chmod(0o755)
    subprocess.run(["make", "-B", "-s", "install", f"VENV={venv}", *make_vars], cwd=REPO, check=True,
                   capture_output=True, text=True, env={k: v for k, v in os.environ.items() if k != "MAKEFLAGS"})
    return log.read_text().splitlines()


def _install_line(calls: list[str]) -> str:
    (line,) = [c for c in calls if c.startswith("-m pip install") and "-e .[dev]" in c]
    return line


def test_makefile_adds_the_cpu_index_only_where_the_cpu_wheel_does_not_resolve(tmp_path):
    """Here (and in CI) `torch==X+cpu` resolves from a local wheel: no index is added, so no unreachable host is
    asked. Elsewhere PyTorch's CPU index is added. TORCH_INDEX_URL overrides both ways."""
    local = _make_install(tmp_path / "local", local_torch=True)
    assert "--extra-index-url" not in _install_line(local) and "-c constraints-cpu.txt" in _install_line(local)
    assert any("--dry-run" in c and "torch==" in c and "+cpu" in c for c in local)
    assert "-m pip uninstall -q -y diffgentor" in local  # the old name, or the unrelated project, goes
    remote = _make_install(tmp_path / "remote", local_torch=False)
    assert "--extra-index-url https://download.pytorch.org/whl/cpu" in _install_line(remote)
    never = _make_install(tmp_path / "never", False, "TORCH_INDEX_URL=")
    assert "--extra-index-url" not in _install_line(never) and not any("--dry-run" in c for c in never)
    mirror = _make_install(tmp_path / "mirror", True, "TORCH_INDEX_URL=https://mirror.example/cpu")
    assert "--extra-index-url https://mirror.example/cpu" in _install_line(mirror)


def test_help_loads_no_torch():
    """`diffgentor --help` (and each command's --help but plan-memory's) stays fast: nothing imports torch."""
    code = (
        "import sys\n"
        "from diffgentor.server.cli import main\n"
        "for argv in (['--help'], ['serve', '--help'], ['edit', '--help'], ['t2i', '--help'],\n"
        "             ['bench', 'offline', '--help'], ['bench', 'serve', '--help'], ['bench', 'decode', '--help'],\n"
        "             ['make-tiny', '--help']):\n"
        "    try:\n"
        "        main(argv)\n"
        "    except SystemExit:\n"
        "        pass\n"
        "print('LOADED', sorted(m for m in ('torch', 'numpy', 'transformers') if m in sys.modules))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=REPO).stdout
    assert "plan-memory" in out and "LOADED []" in out, out[-500:]


def test_plan_memory_flags_load_with_the_command():
    from diffgentor.server.cli import build_parser

    args = build_parser(["plan-memory", "m", "--gpu", "h100"]).parse_args(["plan-memory", "m", "--gpu", "h100"])
    assert args.gpu == "h100" and callable(args.func)
    assert build_parser().parse_args(["plan-memory", "m", "--gpu", "h200"]).gpu == "h200"  # no argv: everything


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="checks the message a CPU-only torch gives")
def test_decode_bench_on_cpu_says_why(capsys):
    from diffgentor.bench.decode import main

    assert main(["--device", "cuda"]) == 2
    err = capsys.readouterr().err
    assert "CUDA" in err and "--device cpu" in err


README = (REPO / "README.md").read_text()


def test_dockerfile_runs_the_readme_gpu_install():
    """No Docker engine here: the Dockerfile is parsed. An official PyTorch CUDA base, and its install step is the
    script the README's GPU install runs."""
    dockerfile = pytest.importorskip("dockerfile")
    cmds = dockerfile.parse_file(str(REPO / "Dockerfile"))
    by = {}
    for c in cmds:
        by.setdefault(c.cmd.upper(), []).append(c.value)
    (arg,) = [v[0] for v in by["ARG"] if v[0].startswith("BASE_IMAGE=")]
    base = arg.split("=", 1)[1]
    assert base.startswith("pytorch/pytorch:") and "-cuda" in base and by["FROM"] == [("${BASE_IMAGE}",)]
    (run,) = by["RUN"]
    assert run == ("bash scripts/install_gpu.sh",)
    assert "bash scripts/install_gpu.sh" in README and base in README
    assert by["ENTRYPOINT"] == [("diffgentor",)]
    assert (REPO / "scripts" / "install_gpu.sh").is_file()


def test_gpu_install_script_refuses_a_cpu_torch(tmp_path):
    """The GPU install keeps the CUDA torch it finds; given a CPU-only torch (this machine) it says what to do and
    installs nothing."""
    import torch

    if torch.version.cuda:
        pytest.skip("this torch is a CUDA build")
    r = subprocess.run(["bash", str(REPO / "scripts" / "install_gpu.sh")], capture_output=True, text=True,
                       env={**os.environ, "PYTHON": sys.executable}, cwd=tmp_path)
    assert r.returncode == 1 and "no CUDA build of torch" in r.stderr and "download.pytorch.org/whl/cu" in r.stderr


def test_readme_names_every_metric():
    """Every metric the server exports, and every one the dashboard and alert rules use, by its full name."""
    import re

    from diffgentor.server.http.metrics import ServerMetrics

    exported = set(re.findall(r"^# TYPE diffgentor:(\w+) (\w+)", ServerMetrics("m").render().decode(), re.M))
    used = set()
    for f in [REPO / "examples" / "grafana" / "diffgentor.json", *(REPO / "examples" / "prometheus").iterdir()]:
        used |= {re.sub(r"_(bucket|sum|count)$", "", n) for n in re.findall(r"diffgentor:(\w+)", f.read_text())}
    names = {n for n, _ in exported if not n.endswith("_created")} | used  # (_created: client bookkeeping)
    assert len(names) > 20
    missing = sorted(n for n in names if f"`{n}`" not in README and f"`{n}{{" not in README)
    assert missing == [], missing


def test_readme_first_hour():
    """What a new GPU user needs is in the README (that it cites nothing outside the repository:
    tests/test_docs.py)."""
    for needed in ("source .venv/bin/activate", "tencent/HunyuanImage-3.0-Instruct-Distil",
                   "hf download tencent/HunyuanImage-3.0-Instruct", "166 GB", "--download-dir", "HF_HUB_OFFLINE",
                   "plan-memory", "docker build", "TORCH_INDEX_URL", "hunyuanimage3-diffgentor", "(#on-a-gpu)"):
        assert needed in README, needed
