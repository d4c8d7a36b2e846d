"""Where a checkpoint comes from: a folder as given, or a Hugging Face repo id (`tencent/HunyuanImage-3.0-Instruct`)
resolved through huggingface_hub's cache (downloaded once, then reused; `offline` reads only the cache)."""

from __future__ import annotations

import re
from pathlib import Path

# owner/name as the Hub spells repo ids (letters, digits, `-`, `_`, `.`); a path that exists always wins
REPO_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9][A-Za-z0-9_.-]*$")


class CheckpointNotFound(FileNotFoundError):
    """The model is neither a folder nor a repo id that the cache (or the Hub) has; the message says what to do."""


def is_repo_id(model: str) -> bool:
    return bool(REPO_ID_RE.match(model)) and not Path(model).expanduser().exists()


def resolve_checkpoint(model: str | Path, revision: str | None = None, download_dir: str | Path | None = None,
                       offline: bool = False) -> Path:
    """The local checkpoint folder of `model`: a folder as given; a repo id as its snapshot in the Hugging Face cache
    (`download_dir`, else huggingface_hub's default), downloaded first unless `offline`."""
    path = Path(model).expanduser()
    if path.is_dir():
        return path
    name = str(model)
    if not is_repo_id(name):
        raise CheckpointNotFound(f"{name}: no such checkpoint folder (and not a Hugging Face repo id like "
                                 "tencent/HunyuanImage-3.0-Instruct-Distil)")
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    where = f" in {download_dir}" if download_dir else ""
    try:
        return Path(snapshot_download(name, revision=revision, cache_dir=download_dir, local_files_only=offline))
    except LocalEntryNotFoundError:
        if offline:
            raise CheckpointNotFound(
                f"{name}{f'@{revision}' if revision else ''} is not in the Hugging Face cache{where} and offline mode "
                f"is on (HF_HUB_OFFLINE): download it first, e.g. `hf download {name}"
                f"{f' --revision {revision}' if revision else ''}"
                f"{f' --cache-dir {download_dir}' if download_dir else ''}`") from None
        raise CheckpointNotFound(f"{name}: could not be downloaded from the Hugging Face Hub (no network?) and is "
                                 f"not in the cache{where}") from None
    except HfHubHTTPError as e:
        raise CheckpointNotFound(f"{name}: the Hugging Face Hub refused it ({e}); check the repo id, the revision "
                                 "and, for gated repos, HF_TOKEN") from None
