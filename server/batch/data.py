"""Batch-CLI input and output: CSV / parquet rows, image references (paths, URLs, embedded bytes), results CSV.

Kept free of torch and the engine so it can be read and tested on its own.

Input rows (`load_edit_rows`):
* **CSV** (``csv.DictReader``): the images come from the ``input_images`` column or, when that cell is empty or
  the column absent, ``image_url`` (the spelling of existing diffgentor datasets). A cell is a JSON list
  (``["a.png", "b.png"]``), a comma-separated list (``a.png,b.png``) or one path / URL; relative paths resolve
  against the CSV's folder; an empty cell means no input image (text-to-image through ``edit``). The instruction
  column is ``--instruction_key`` (default ``instruction``); an optional ``index`` column names the outputs (else
  the row number, from 0).
* **Parquet** (a file, or a folder whose ``*.parquet`` files are read in name order; pyarrow, imported lazily):
  the same columns, where an image may be embedded (``{"bytes": ..., "path": ...}`` structs as written by
  Hugging Face ``datasets``, raw binary, or lists of either) or a path / URL string.
* **URLs** (``http://`` / ``https://``) are downloaded (`url_fetch`: a deadline for the whole download and a size
  cap counted while streaming; internal addresses are allowed, it is the user's own data) into the image cache
  folder, named by the URL's hash, written atomically, and reused by later rows and runs.
* Column names must be unique (a CSV with two ``index`` columns is refused: one would silently win).

Every problem with one row (missing file, unreadable image, more than 3 images, empty instruction, failed
download) becomes that row's error; the other rows go on.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import os
import stat
import tempfile
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from diffgentor.engine.config import DEFAULT_MAX_IMAGE_BYTES

MAX_INPUT_IMAGES = 3
IMAGE_COLUMNS = ("input_images", "image_url")
DEFAULT_DOWNLOAD_TIMEOUT_S = 30.0  # the whole download, not one read
MAX_DOWNLOAD_BYTES = 64 << 20  # one image URL; the download stops once it is passed
MAX_IMAGE_BYTES = DEFAULT_MAX_IMAGE_BYTES  # one local or embedded image file: the server's upload cap
RESULT_COLUMNS = ("output_image", "instruction_enhanced", "error")


class InputError(ValueError):
    """The input file as a whole cannot be used (missing, unreadable, bad or duplicate index)."""


class RowError(ValueError):
    """One row cannot be used; the message is recorded in that row's ``error`` column."""


@dataclass
class EditRow:
    """One input row. ``images`` holds references (str path / URL) or embedded bytes, resolved by `resolve_images`."""

    index: int
    prompt: str
    images: list[str | bytes] = field(default_factory=list)
    columns: dict[str, str] = field(default_factory=dict)
    """The row's input columns as text (embedded images summarised), copied into the results CSV."""
    error: str | None = None
    """Set at load time when the row is already known to be bad (e.g. an unparsable image cell)."""


# ---------------------------------------------------------------------------------------------------- filters
def parse_filter_rows(spec: str | None, n: int) -> list[int]:
    """Positions (0-based, in file order) selected by ``--filter_rows``: ``0:100``, ``100:``, ``:10``, ``0,5,10``,
    or a mix (``0:3,7``). Out-of-range positions are ignored. ``None`` / empty selects every row."""
    if spec is None or not spec.strip():
        return list(range(n))
    picked: list[int] = []
    seen: set[int] = set()
    for part in spec.split(","):
        part = part.strip()
        if not part:
            continue
        try:
            if ":" in part:
                a, b = part.split(":", 1)
                rng = range(*slice(int(a) if a.strip() else None, int(b) if b.strip() else None).indices(n))
            else:
                k = int(part)
                rng = range(k, k + 1) if 0 <= k < n else range(0)
        except ValueError:
            raise InputError(f"--filter_rows {spec!r}: {part!r} is not a position or a start:end range") from None
        for k in rng:
            if k not in seen:
                seen.add(k)
                picked.append(k)
    return picked


# ---------------------------------------------------------------------------------------------------- image cells
def split_image_cell(value: Any) -> list[str | bytes]:
    """One image cell -> a list of references. JSON list, comma-separated list, one path/URL, or embedded bytes."""
    if value is None:
        return []
    if isinstance(value, (bytes, bytearray)):
        return [bytes(value)]
    if isinstance(value, Mapping):  # HF datasets Image struct {"bytes": ..., "path": ...}
        if value.get("bytes"):
            return [bytes(value["bytes"])]
        return [str(value["path"])] if value.get("path") else []
    if isinstance(value, (list, tuple)) or (hasattr(value, "tolist") and not isinstance(value, str)):
        items = value.tolist() if hasattr(value, "tolist") else value
        out: list[str | bytes] = []
        for item in items:
            out.extend(split_image_cell(item))
        return out
    s = str(value).strip()
    if not s:
        return []
    if s.startswith("["):
        try:
            parsed = json.loads(s)
        except json.JSONDecodeError as e:
            raise RowError(f"image cell is not a valid JSON list: {e.msg}") from None
        if not isinstance(parsed, list):
            raise RowError("image cell JSON must be a list of paths or URLs")
        return [str(x).strip() for x in parsed if str(x).strip()]
    return [p.strip() for p in s.split(",") if p.strip()]


def _is_url(ref: str) -> bool:
    return ref.startswith(("http://", "https://"))


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


_FILE_MODE = 0o666 & ~_umask()


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write to a temporary file in the same folder, fsync, then ``os.replace``: readers never see a partial file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, _FILE_MODE)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise


def remove_stale_temp_files(folder: Path) -> int:
    """Delete temporary files left by a killed run (``.NAME.XXXX.tmp``); returns how many."""
    n = 0
    folder = Path(folder)
    if not folder.is_dir():
        return 0
    for p in folder.glob(".*.tmp"):
        try:
            p.unlink()
            n += 1
        except OSError:
            pass
    return n


def download(url: str, cache_dir: Path, timeout: float = DEFAULT_DOWNLOAD_TIMEOUT_S,
             max_bytes: int = MAX_DOWNLOAD_BYTES, resolver=None) -> bytes:
    """Fetch ``url`` (or reuse its cached copy) into ``cache_dir`` within ``timeout`` seconds in all and
    ``max_bytes``; RowError on any failure (also when the cache cannot be written)."""
    from diffgentor.server.url_fetch import FetchError, FetchPolicy, fetch_sync

    cache_dir = Path(cache_dir)
    suffix = Path(url.split("?", 1)[0]).suffix[:8] or ".img"
    cached = cache_dir / (hashlib.sha256(url.encode()).hexdigest()[:32] + suffix)
    if cached.is_file():
        try:
            return cached.read_bytes()
        except OSError:
            pass  # download it again
    policy = FetchPolicy(max_bytes=max_bytes, deadline_s=timeout, allow_private=True, concurrency=1)
    try:
        data = fetch_sync(url, policy, resolver)
    except FetchError as e:
        why = e.message if e.detail == e.message else f"{e.message} ({e.detail})"
        raise RowError(f"download of {url} failed: {why}") from None
    try:
        atomic_write_bytes(cached, data)
    except OSError as e:
        raise RowError(f"could not write the downloaded image to {cached}: {e.strerror or e}") from None
    return data


def duplicate_names(names: Iterable[Any]) -> list[str]:
    """Column names that appear more than once, in order of their first repeat."""
    seen: set[str] = set()
    dups: list[str] = []
    for n in names:
        n = str(n)
        if n in seen and n not in dups:
            dups.append(n)
        seen.add(n)
    return dups


def _refuse_duplicates(path: Path, names: Iterable[Any]) -> None:
    dups = duplicate_names(names)
    if dups:
        raise InputError(f"{path}: the column name(s) {', '.join(repr(d) for d in dups)} appear more than once; "
                         "rename them (only one of each could be used)")


def check_image(data: bytes, what: str) -> None:
    """RowError unless ``data`` is a readable image (decoded fully, so truncated files are caught here)."""
    from PIL import Image

    try:
        with Image.open(io.BytesIO(data)) as im:
            im.load()
    except Exception as e:
        detail = "unknown image format" if type(e).__name__ == "UnidentifiedImageError" else f"{type(e).__name__}: {e}"
        raise RowError(f"{what} is not a readable image ({detail})") from None


def read_image_file(p: Path, max_bytes: int = MAX_IMAGE_BYTES) -> bytes:
    """A local image file's bytes; RowError for anything else: missing, not a regular file (a device, a FIFO that
    would block, a folder), over ``max_bytes`` (the server's upload cap), or any OS error (a name too long)."""
    try:
        st = p.stat()
        if not stat.S_ISREG(st.st_mode):
            raise RowError(f"input image {_short(p)} is not a regular file")
        if st.st_size > max_bytes:
            raise RowError(f"input image {_short(p)} is {st.st_size} bytes; the limit is {max_bytes}")
        with open(p, "rb") as f:
            data = f.read(max_bytes + 1)  # the file may have grown since
    except FileNotFoundError:
        raise RowError(f"input image not found: {_short(p)}") from None
    except OSError as e:
        raise RowError(f"input image {_short(p)} could not be read: {e.strerror or e}") from None
    if len(data) > max_bytes:
        raise RowError(f"input image {_short(p)} is larger than {max_bytes} bytes")
    return data


def _short(p: Path) -> str:
    text = str(p)
    return text if len(text) <= 300 else text[:150] + "..." + text[-100:]


def resolve_images(
    refs: Sequence[str | bytes], base_dir: Path, cache_dir: Path, timeout: float = DEFAULT_DOWNLOAD_TIMEOUT_S
) -> list[bytes]:
    """References -> encoded image files (bytes), each checked to decode. RowError for the first bad one."""
    if len(refs) > MAX_INPUT_IMAGES:
        raise RowError(f"{len(refs)} input images; at most {MAX_INPUT_IMAGES} are supported")
    out: list[bytes] = []
    for i, ref in enumerate(refs):
        if isinstance(ref, bytes):
            data, what = ref, f"embedded image {i}"
        elif _is_url(ref):
            data, what = download(ref, cache_dir, timeout), ref
        else:
            p = Path(ref).expanduser()
            if not p.is_absolute():
                p = Path(base_dir) / p
            data, what = read_image_file(p), str(p)
        if len(data) > MAX_IMAGE_BYTES:
            raise RowError(f"{what} is larger than {MAX_IMAGE_BYTES} bytes")
        check_image(data, what)
        out.append(data)
    return out


# ---------------------------------------------------------------------------------------------------- loading
def _as_text(v: Any) -> str:
    if v is None:
        return ""
    if isinstance(v, float) and v != v:  # NaN from parquet nulls
        return ""
    return str(v)


def _summarise_cell(v: Any) -> str:
    """A cell for the results CSV: embedded images become ``<N embedded image(s)>``; other values as text."""
    try:
        refs = split_image_cell(v) if not isinstance(v, str) else None
    except RowError:
        refs = None
    if refs is not None and any(isinstance(r, bytes) for r in refs):
        n = len(refs)
        return f"<{n} embedded image{'s' if n != 1 else ''}>"
    if isinstance(v, (list, tuple)):
        return json.dumps([_as_text(x) for x in v])
    return _as_text(v)


MAX_INDEX = 10**15 - 1  # output names are the index, zero-padded: a longer one is no file name


def _parse_index(raw: Any, position: int) -> int:
    """A row's ``index`` (empty: its position). RowError when it is not a usable output name: not an integer,
    negative, infinite or absurdly large (``1e300`` would be a 301-digit file name)."""
    s = _as_text(raw).strip()
    if not s:
        return position
    try:
        f = float(s)
        idx = int(f)
        if f != idx:
            raise ValueError
    except (ValueError, OverflowError):
        raise RowError(f"index {s[:40]!r} is not an integer") from None
    if not 0 <= idx <= MAX_INDEX:
        raise RowError(f"index {s[:40]!r} is not in 0..{MAX_INDEX}")
    return idx


def _rows_from_records(records: Iterable[Mapping[str, Any]], instruction_key: str) -> list[EditRow]:
    rows: list[EditRow] = []
    seen: dict[int, int] = {}
    for pos, rec in enumerate(records):
        try:
            idx, bad_index = _parse_index(rec.get("index"), pos), None
        except RowError as e:  # that row's error, under a key no valid index has
            idx, bad_index = -(pos + 1), f"row {pos}: {e}"
        if idx in seen:
            raise InputError(f"rows {seen[idx]} and {pos} share index {idx}; output names would collide")
        seen[idx] = pos
        columns = {str(k): _summarise_cell(v) for k, v in rec.items() if k is not None}
        row = EditRow(index=idx, prompt=_as_text(rec.get(instruction_key)).strip(), columns=columns)
        cell = None
        for col in IMAGE_COLUMNS:
            v = rec.get(col)
            if v is not None and not (isinstance(v, str) and not v.strip()) and not (isinstance(v, float) and v != v):
                cell = v
                break
        try:
            row.images = split_image_cell(cell)
        except RowError as e:
            row.error = str(e)
        row.error = bad_index or row.error
        rows.append(row)
    return rows


def _csv_records(f, path: Path) -> tuple[list[dict[str, Any]], list[str]]:
    """Every record of a CSV, strictly: a quoted field that is never closed would swallow every row after it (the
    lenient reader returns them as one cell), so it is an InputError naming the line the broken row starts on."""
    reader = csv.DictReader(f, strict=True)
    records: list[dict[str, Any]] = []
    start = 1
    try:
        for rec in reader:
            records.append(rec)
            start = reader.line_num + 1
    except csv.Error as e:
        raise InputError(f"{path}: line {start}: {e} (a quoted field that is never closed?)") from None
    return records, list(reader.fieldnames or [])


def _parquet_files(path: Path) -> list[Path]:
    if path.is_dir():
        files = sorted(p for p in path.rglob("*.parquet") if p.is_file())
        if not files:
            raise InputError(f"no .parquet files in {path}")
        return files
    return [path]


def _parquet_records(path: Path) -> Iterable[dict[str, Any]]:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise InputError("reading parquet needs pyarrow: pip install pyarrow") from None
    for f in _parquet_files(path):
        try:
            table = pq.read_table(f)
        except Exception as e:
            raise InputError(f"cannot read parquet file {f}: {e}") from None
        _refuse_duplicates(f, table.column_names)
        yield from table.to_pylist()


def is_parquet(path: Path) -> bool:
    path = Path(path)
    return path.suffix.lower() == ".parquet" or path.is_dir()


def load_edit_rows(input_path: str | Path, instruction_key: str = "instruction") -> tuple[list[EditRow], list[str]]:
    """Read every row of a CSV or parquet input; returns (rows, input column names in order)."""
    path = Path(input_path)
    if not path.exists():
        raise InputError(f"input not found: {path}")
    if is_parquet(path):
        records = list(_parquet_records(path))
        columns: list[str] = []
        for r in records:
            for k in r:
                if k not in columns:
                    columns.append(k)
    else:
        try:
            with open(path, newline="", encoding="utf-8-sig") as f:
                records, columns = _csv_records(f, path)
        except (OSError, UnicodeDecodeError) as e:
            raise InputError(f"cannot read CSV {path}: {e}") from None
        _refuse_duplicates(path, columns)
    if records and instruction_key not in columns:
        raise InputError(
            f"{path} has no {instruction_key!r} column (columns: {', '.join(columns)}); set --instruction_key"
        )
    return _rows_from_records(records, instruction_key), columns


def load_prompts(prompt: Sequence[str] | None, prompts_file: str | Path | None) -> tuple[list[EditRow], list[str]]:
    """t2i prompts: ``--prompt`` (repeatable) and/or ``--prompts_file`` (JSONL, JSON list, CSV with a ``prompt``
    column, or TXT one prompt a line). JSON/JSONL entries are strings or objects with ``prompt`` (and optional
    ``index``)."""
    records: list[dict[str, Any]] = [{"prompt": p} for p in (prompt or [])]
    if prompts_file:
        path = Path(prompts_file)
        if not path.is_file():
            raise InputError(f"prompts file not found: {path}")
        text = path.read_text(encoding="utf-8-sig")
        suffix = path.suffix.lower()

        def obj(x: Any) -> dict[str, Any]:
            return dict(x) if isinstance(x, Mapping) else {"prompt": _as_text(x)}

        if suffix == ".jsonl":
            for n, line in enumerate(text.splitlines(), 1):
                if line.strip():
                    try:
                        records.append(obj(json.loads(line)))
                    except json.JSONDecodeError as e:
                        raise InputError(f"{path}:{n}: invalid JSON: {e.msg}") from None
        elif suffix == ".json":
            try:
                data = json.loads(text)
            except json.JSONDecodeError as e:
                raise InputError(f"{path}: invalid JSON: {e.msg}") from None
            if not isinstance(data, list):
                raise InputError(f"{path}: expected a JSON list of prompts")
            records.extend(obj(x) for x in data)
        elif suffix == ".csv":
            rows, names = _csv_records(io.StringIO(text), path)
            _refuse_duplicates(path, names)
            if "prompt" not in names:
                raise InputError(f"{path} has no 'prompt' column")
            records.extend(rows)
        else:
            records.extend({"prompt": line.strip()} for line in text.splitlines() if line.strip())
    if not records:
        raise InputError("no prompts: give --prompt or --prompts_file")
    columns: list[str] = []
    for r in records:
        for k in r:
            if k not in columns:
                columns.append(k)
    return _rows_from_records(records, "prompt"), columns


# ---------------------------------------------------------------------------------------------------- results
def result_key(rec: Mapping[str, Any]) -> tuple[int, int] | None:
    """(index, image_num) of a results-CSV record; None when the index is missing or not an integer."""
    try:
        idx = int(float(rec.get("index", "")))
        sub = _as_text(rec.get("image_num", "")).strip()
        return idx, int(float(sub)) if sub else 0
    except (TypeError, ValueError):
        return None


def read_results_csv(path: Path) -> dict[tuple[int, int], dict[str, str]]:
    """An earlier results CSV, keyed by (index, image_num) (rows without a usable index are dropped)."""
    path = Path(path)
    if not path.is_file():
        return {}
    out: dict[tuple[int, int], dict[str, str]] = {}
    try:
        with open(path, newline="", encoding="utf-8") as f:
            for rec in csv.DictReader(f):
                key = result_key(rec)
                if key is not None:
                    out[key] = {k: v for k, v in rec.items() if k is not None}
    except (OSError, csv.Error, UnicodeDecodeError):
        return {}
    return out


def write_results_csv(
    path: Path, rows: Mapping[tuple[int, int], Mapping[str, Any]], input_columns: Sequence[str],
    with_image_num: bool = False,
) -> None:
    """Write (atomically) ``index`` [, ``image_num``], the input columns, then output_image, instruction_enhanced,
    error; sorted by key. Columns seen only in some rows (an earlier run's input) follow the input columns."""
    head = ["index", "image_num"] if with_image_num else ["index"]
    cols = head + [c for c in input_columns if c not in head]
    for r in rows.values():
        for k in r:
            if k not in cols and k not in RESULT_COLUMNS and k != "image_num":
                cols.append(k)
    cols += list(RESULT_COLUMNS)
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=cols, extrasaction="ignore", lineterminator="\n")
    w.writeheader()
    for key in sorted(rows):
        rec = {c: "" for c in cols}
        rec.update({k: _as_text(v) for k, v in rows[key].items()})
        rec["index"] = str(key[0])
        if with_image_num:
            rec["image_num"] = str(key[1])
        w.writerow(rec)
    atomic_write_bytes(Path(path), buf.getvalue().encode("utf-8"))
