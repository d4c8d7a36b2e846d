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


ARCHITECTURE = REPO / "docs" / "architecture.md"
LIFE = "## The life of one edit request"
PATH = re.compile(r"`((?:bench|docs|engine|kernels|server|tests)/[\w./]*)`")
ITEM = re.compile(r"^(\d+)\. `([\w/.]+\.py)`:(.*)$")
NAME = re.compile(r"`([A-Za-z_][\w]*(?:\.[A-Za-z_]\w*)?)`")


def _section(text: str, heading: str) -> str:
    start = text.index(heading)
    end = text.find("\n## ", start + len(heading))
    return text[start:] if end < 0 else text[start:end]


def life_of_an_edit_request(text: str) -> list[tuple[str, list[str]]]:
    """(file, the names its numbered item mentions) for each step of the walk-through, in order."""
    items: list[tuple[str, str]] = []
    for line in _section(text, LIFE).splitlines():
        m = ITEM.match(line)
        if m:
            items.append((m.group(2), m.group(3)))
        elif items and line.startswith("   "):  # the item continues
            items[-1] = (items[-1][0], items[-1][1] + " " + line.strip())
    return [(path, [n for n in NAME.findall(body) if "/" not in n]) for path, body in items]


def test_every_path_in_the_architecture_page_exists():
    text = ARCHITECTURE.read_text()
    paths = sorted(set(PATH.findall(text)))
    assert len(paths) > 20
    missing = [p for p in paths if not (REPO / p.rstrip("/")).exists()]
    assert not missing, f"docs/architecture.md names files that do not exist: {missing}"


def test_the_edit_request_is_followed_in_at_most_twelve_files_whose_names_exist():
    steps = life_of_an_edit_request(ARCHITECTURE.read_text())
    files = [path for path, _ in steps]
    assert 8 <= len(files) <= 12 and len(set(files)) == len(files), files
    stale = []
    for path, names in steps:
        source = (REPO / path).read_text()
        assert names, f"{path}: name the functions the request runs there"
        for name in names:
            owner, _, member = name.rpartition(".")
            if owner:  # a method of a class this file names: defined or called here
                found = re.search(rf"(\bdef |\.){member}\b", source) and re.search(rf"\b{owner}\b", source)
            else:  # defined or called here
                found = re.search(rf"\b{member}\b", source)
            if not found:
                stale.append(f"{path}: {name}")
    assert not stale, "docs/architecture.md's walk-through names what these files no longer hold:\n" + "\n".join(stale)


def test_the_walk_through_parser_reads_items_and_their_names():
    text = ("# t\n\n" + LIFE + ", HTTP to PNG\n\n1. `a/b.py`: `f` calls `C.m`\n   and `g` (see `x/y.py`).\n"
            "2. `c.py`: `h`.\n\n## next\n3. `d.py`: `i`\n")
    assert life_of_an_edit_request(text) == [("a/b.py", ["f", "C.m", "g"]), ("c.py", ["h"])]
