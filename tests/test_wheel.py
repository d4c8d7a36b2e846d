"""The built wheel (not the editable checkout) must import as diffgentor.engine etc."""

from __future__ import annotations

import site
import subprocess
import sys
import venv
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_wheel_installs_and_imports(tmp_path):
    dist = tmp_path / "dist"
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
         "-w", str(dist), str(REPO)],
        check=True,
    )
    wheels = list(dist.glob("hunyuanimage3_diffgentor-*.whl"))  # not PyPI's unrelated `diffgentor`
    assert len(wheels) == 1, wheels

    env_dir = tmp_path / "venv"
    venv.create(env_dir, with_pip=False)
    py = env_dir / "bin" / "python"
    purelib = subprocess.run(
        [str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        check=True, capture_output=True, text=True,
    ).stdout.strip()
    # Install the wheel itself; its heavy dependencies (torch, ...) come from the test venv through a
    # path entry, which does not activate that venv's editable finder for diffgentor.
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", purelib, str(wheels[0])],
        check=True,
    )
    (Path(purelib) / "deps.pth").write_text("\n".join(site.getsitepackages()) + "\n")
    code = (
        "import diffgentor, diffgentor.engine, diffgentor.kernels, diffgentor.server, diffgentor.bench;"
        "import diffgentor.engine.models.hunyuan_image_3.config as c;"
        "print(diffgentor.__file__)"
    )
    out = subprocess.run([str(py), "-c", code], check=True, capture_output=True, text=True, cwd=tmp_path)
    assert out.stdout.strip().startswith(purelib), out.stdout
    assert (Path(purelib) / "diffgentor" / "engine" / "models" / "hunyuan_image_3" / "config.py").is_file()
    # package data: the page at /
    assert (Path(purelib) / "diffgentor" / "server" / "http" / "playground.html").is_file()
    assert not (Path(purelib) / "diffgentor" / "tests").exists()
    assert not (Path(purelib) / "diffgentor" / "setup.py").exists()
    # every folder of the source tree with an __init__.py is in the wheel (packages are found, not listed)
    source = {p.parent.relative_to(REPO) for p in REPO.rglob("__init__.py")
              if not {".venv", "tests", "build", "dist"} & set(p.relative_to(REPO).parts)}
    assert Path("engine/tp") in source
    missing = [str(d) for d in sorted(source) if not (Path(purelib) / "diffgentor" / d / "__init__.py").is_file()]
    assert not missing, f"subpackages missing from the wheel: {missing}"
