"""The repository's own text stays readable on its own: comments, docstrings and docs cite only files inside the
repository (no issue numbers, no design documents that are not shipped)."""

from __future__ import annotations

import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
TEXT_SUFFIXES = {".py", ".md", ".html", ".toml", ".cfg", ".sh", ".txt"}
SKIP_DIRS = {".venv", ".git", "build", "dist", "__pycache__", "results", "fixtures"}
# what a reader of the checkout cannot open: tracker numbers and documents kept outside the repository
OUTSIDE = re.compile("|".join((
    r"\bissues?[- ]#?\d+",
    r"\bissue's\b",
    "\u00a7",  # section signs point into a document that is not here
    r"\bspec/",
    r"\bseed/",
    r"\bseed document",
    r"\bthe seed's\b",
    r"\bspec (section|\d)",
    r"\blibrary_fit\b",
)), re.IGNORECASE)


def repository_text_files() -> list[Path]:
    out = []
    for path in sorted(REPO.rglob("*")):
        rel = path.relative_to(REPO)
        if any(part in SKIP_DIRS or part.endswith(".egg-info") for part in rel.parts):
            continue
        if path.is_file() and path.suffix in TEXT_SUFFIXES and path != Path(__file__).resolve():
            out.append(path)
    return out


def test_text_cites_only_files_inside_the_repository():
    files = repository_text_files()
    assert len(files) > 100 and REPO / "engine" / "core.py" in files
    hits = [f"{p.relative_to(REPO)}:{n}: {line.strip()}" for p in files
            for n, line in enumerate(p.read_text(errors="replace").splitlines(), 1) if OUTSIDE.search(line)]
    assert not hits, "cite files inside the repository instead:\n" + "\n".join(hits)


def test_the_citation_pattern_catches_what_it_should():
    for bad in ("(issue 15)", "the issue-12 workload", "spec \u00a73.4", "see seed/hunyuan_image_3_backend.md",
                "the seed document's spelling", "spec section 2", "measured in spec/library_fit.md"):
        assert OUTSIDE.search(bad), bad
    for fine in ("the seed of a request", "a seed for each row", "find_spec('ray')", "the scheduler may issue",
                 "docs/decisions.md", "RequestSpec"):
        assert not OUTSIDE.search(fine), fine
