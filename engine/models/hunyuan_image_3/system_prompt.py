"""System prompts read from the checkpoint's `system_prompt.py` with `ast`, never executed
(docs/decisions.md: System prompts).

The official checkpoints ship the prompt texts as Python string constants; copying them into our code
would fork them from the checkpoint, and importing the file would run third-party code. So the file is
parsed and only assignments built from string literals (and lists / tuples / dicts of them, names of
earlier such constants, and `+` of strings) are evaluated; anything else is ignored.

Selection (`use_system_prompt`) follows the official `get_system_prompt` plus the caller's `.strip()`:
"None"/None -> no prompt, "en_unified", "en_vanilla", "en_recaption", "en_think_recaption" -> the stored
text, "custom" -> the caller's text, "dynamic" -> by bot_task: "think" -> en_think_recaption,
"recaption" -> en_recaption, "image" -> en_vanilla with newlines stripped, anything else (including the
default "think_recaption") -> the caller's custom text, usually none. That last case is an official quirk
we keep on purpose. The chosen text is stripped of surrounding whitespace; "" means no system segment.
"""

from __future__ import annotations

import ast
from pathlib import Path
from typing import Any

SYSTEM_PROMPT_FILE = "system_prompt.py"
STORED_KINDS = ("en_unified", "en_vanilla", "en_recaption", "en_think_recaption")
ALL_KINDS = ("None", "dynamic", "custom") + STORED_KINDS


class SystemPromptError(ValueError):
    """A system prompt that cannot be resolved for this checkpoint."""


class _Unsupported(Exception):
    pass


def _literal(node: ast.AST, names: dict[str, Any]) -> Any:
    """Value of a constant expression made of strings, containers of them and known names."""
    if isinstance(node, ast.Constant) and isinstance(node.value, (str, int, float, bool, type(None))):
        return node.value
    if isinstance(node, ast.Name) and node.id in names:
        return names[node.id]
    if isinstance(node, (ast.List, ast.Tuple)):
        items = [_literal(e, names) for e in node.elts]
        return items if isinstance(node, ast.List) else tuple(items)
    if isinstance(node, ast.Dict):
        if any(k is None for k in node.keys):
            raise _Unsupported
        return {_literal(k, names): _literal(v, names) for k, v in zip(node.keys, node.values)}
    if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Add):
        left, right = _literal(node.left, names), _literal(node.right, names)
        if isinstance(left, str) and isinstance(right, str):
            return left + right
    raise _Unsupported


def read_constants(path: str | Path) -> dict[str, Any]:
    """Module-level constant assignments of a Python file, evaluated without executing it."""
    tree = ast.parse(Path(path).read_text(encoding="utf-8"), filename=str(path))
    names: dict[str, Any] = {}
    for stmt in tree.body:
        if isinstance(stmt, ast.Assign):
            targets, value = stmt.targets, stmt.value
        elif isinstance(stmt, ast.AnnAssign) and stmt.value is not None:
            targets, value = [stmt.target], stmt.value
        else:
            continue
        try:
            result = _literal(value, names)
        except _Unsupported:
            continue
        for t in targets:
            if isinstance(t, ast.Name):
                names[t.id] = result
    return names


class SystemPrompts:
    """The stored prompt texts of one checkpoint (possibly none) and the official selection rule."""

    def __init__(self, stored: dict[str, str], source: str | None = None) -> None:
        self.stored = dict(stored)
        self.source = source

    @classmethod
    def from_pretrained(cls, ckpt_dir: str | Path) -> SystemPrompts:
        """Read `system_prompt.py` of a checkpoint folder; a folder without it stores no prompt."""
        path = Path(ckpt_dir) / SYSTEM_PROMPT_FILE
        if not path.is_file():
            return cls({}, None)
        return cls.from_file(path)

    @classmethod
    def from_file(cls, path: str | Path) -> SystemPrompts:
        consts = read_constants(path)
        stored: dict[str, str] = {}
        unified = consts.get("unified_system_prompt_en")
        if isinstance(unified, str):
            stored["en_unified"] = unified
        table = consts.get("t2i_system_prompts")
        for kind in ("en_vanilla", "en_recaption", "en_think_recaption"):
            text = None
            if isinstance(table, dict) and kind in table:
                entry = table[kind]
                # the official table maps each kind to a list whose first item is the text
                text = entry[0] if isinstance(entry, (list, tuple)) and entry else entry
            if not isinstance(text, str):
                text = consts.get(f"t2i_system_prompt_{kind}")
            if isinstance(text, str):
                stored[kind] = text
        return cls(stored, str(path))

    def stored_text(self, kind: str) -> str:
        if kind not in self.stored:
            where = self.source or "this checkpoint (it has no system_prompt.py)"
            have = ", ".join(sorted(self.stored)) or "none"
            raise SystemPromptError(
                f"system prompt {kind!r} is not available from {where}; stored: {have}; "
                f"'None' and 'custom' always work"
            )
        return self.stored[kind]

    def select_raw(
        self, use_system_prompt: str | None, bot_task: str, custom: str | None = None
    ) -> str | None:
        """The official selection before the final strip (None = no prompt)."""
        kind = "None" if use_system_prompt is None else str(use_system_prompt)
        if kind == "None":
            return None
        if kind in STORED_KINDS:
            return self.stored_text(kind)
        if kind == "dynamic":
            if bot_task == "think":
                return self.stored_text("en_think_recaption")
            if bot_task == "recaption":
                return self.stored_text("en_recaption")
            if bot_task == "image":
                return self.stored_text("en_vanilla").strip("\n")
            return custom  # includes think_recaption: an official quirk
        if kind == "custom":
            return custom
        raise SystemPromptError(f"unknown use_system_prompt {kind!r}; expected one of {', '.join(ALL_KINDS)}")

    def resolve(self, use_system_prompt: str | None, bot_task: str, custom: str | None = None) -> str:
        """System text that enters the sequence ("" = no system segment)."""
        raw = self.select_raw(use_system_prompt, bot_task, custom)
        return raw.strip() if raw is not None else ""


def resolve_system_prompt(
    ckpt_dir: str | Path, use_system_prompt: str | None, bot_task: str, custom: str | None = None
) -> str:
    """One-shot helper: read the checkpoint's prompts and resolve a selection."""
    return SystemPrompts.from_pretrained(ckpt_dir).resolve(use_system_prompt, bot_task, custom)


def choose_system_prompt(
    prompts: SystemPrompts | None, kind: str | None, bot_task: str, custom: str | None, kind_given: bool
) -> str:
    """The system prompt text of a request (stripped; "" for none).

    Custom text wins when the kind is "custom" or when text is given without an explicit kind. A checkpoint
    without system_prompt.py supports only no prompt and custom text (docs/decisions.md: System prompts).
    """
    if kind == "custom" or (custom is not None and not kind_given):
        return (custom or "").strip()
    if prompts is None:
        if kind in (None, "None", "none", ""):
            return ""
        raise SystemPromptError(f"use_system_prompt {kind!r} needs the checkpoint's system_prompt.py")
    return prompts.resolve(kind, bot_task, custom=custom)
