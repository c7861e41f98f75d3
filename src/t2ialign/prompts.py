"""Prompt files: free text, one prompt a line, or JSON lines with a ``prompt`` and any metadata.

Every stage that takes ``--prompts FILE`` reads it here. Two formats, told apart by the first
non-blank line:

- **JSON lines** (the first non-blank line starts with ``{``): every non-blank line is a JSON object
  with a non-empty string ``prompt``. Its other keys are the prompt's **metadata**: kept with the
  prompt (in a feedback project, in an image folder's manifest) and passed to reward functions as
  ``metadata``. Keys with a meaning here: ``group`` (a string; ``t2ialign eval`` reports per group),
  ``negatives`` (a list of prompts that an image of this prompt does *not* show: the reward model's
  auxiliary loss ranks the true prompt above them), and the shapes world's ``spec``, ``task`` and
  ``split``.
- **Plain text**: every non-blank line is one prompt (surrounding whitespace removed).

Blank lines are skipped in both formats. Anything else is an error naming the file and the line: a
binary file, text that is not UTF-8, a line that is not a JSON object in a JSON-lines file (or a
JSON object in a plain-text file), an empty or missing ``prompt``, malformed ``group`` /
``negatives``, and one prompt given twice with different metadata.

**Spec, task and split** are derived only where the embedded shapes world's grammar reads the prompt
(``t2ialign.world.grammar``); every other prompt is free text with ``spec``, ``task`` and ``split``
set to None (a ``task`` or ``split`` given in the file is kept). The stages that need a spec (the
ShapesEval checker and its rule rewards, ``world render``, the embedded shapes generator) say so;
pass ``require_spec=True`` to make every prompt of a file need one.

How long a prompt may be depends on the text encoder that reads it; see
:meth:`t2ialign.backends.diffusers_backend.DiffusersBackend.overlong_prompts`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from t2ialign.world.grammar import PromptError, parse
from t2ialign.world.spec import Spec, SpecError

WORLD_KEYS = ("spec", "task", "split")  # the shapes world's fields: not metadata
RESERVED = ("prompt", *WORLD_KEYS)
JSON_SUFFIXES = (".jsonl", ".json", ".ndjson")


class PromptFileError(ValueError):
    """A prompt file (or manifest) that cannot be read; the message names the file and the line."""


@dataclass
class PromptFile:
    """The rows of a prompt file, each with the line it came from."""

    path: Path
    format: str  # "jsonl" or "text"
    rows: list[dict] = field(default_factory=list)
    lines: list[int] = field(default_factory=list)

    def free_text(self) -> list[int]:
        """Indices of the rows without a spec (outside the shapes world's grammar)."""
        return [i for i, r in enumerate(self.rows) if r.get("spec") is None]

    def where(self, i: int) -> str:
        """``path:line`` of row ``i``."""
        return f"{self.path}:{self.lines[i]}"


def metadata_of(row: dict) -> dict:
    """A prompt row's metadata: every key but ``prompt`` and the shapes world's ``spec``, ``task``
    and ``split``."""
    return {k: v for k, v in row.items() if k not in RESERVED}


def check_metadata(meta: dict, prompt: str) -> None:
    """Raise ValueError when the metadata keys with a meaning (``group``, ``negatives``) are
    malformed."""
    if "group" in meta and not (isinstance(meta["group"], str) and meta["group"].strip()):
        raise ValueError(f"'group' must be a non-empty string, got {meta['group']!r}")
    if "negatives" in meta:
        neg = meta["negatives"]
        if not isinstance(neg, list) or not all(isinstance(n, str) and n.strip() for n in neg):
            raise ValueError(f"'negatives' must be a list of non-empty strings, got {neg!r:.120}")
        if prompt in neg:
            raise ValueError(f"'negatives' of {prompt!r} holds the prompt itself")


def describe(row: dict, require_spec: bool = False) -> dict:
    """Fill in ``spec``, ``task`` and ``split`` of a prompt row: from its ``spec`` when given (which
    must be valid), else from the grammar when it reads the prompt, else None. With
    ``require_spec``, a prompt outside the grammar raises :class:`PromptError`."""
    from t2ialign.world.suites import split_of

    prompt = row["prompt"]
    if row.get("spec") is not None:
        spec = Spec.from_dict(row["spec"])
    else:
        try:
            spec = parse(prompt)
        except PromptError:
            if require_spec:
                raise
            spec = None
    if spec is None:
        row["spec"] = None
        row.setdefault("task", None)
        row.setdefault("split", None)
        return row
    row["spec"] = spec.to_dict()
    row["task"] = row.get("task") or spec.task
    row["split"] = row.get("split") or split_of(spec)
    return row


def _lines(path: Path) -> list[str]:
    if not path.exists():
        raise PromptFileError(f"{path}: no such file")
    if path.is_dir():
        raise PromptFileError(f"{path}: a folder, not a prompt file")
    data = path.read_bytes()
    if b"\x00" in data:
        line = data[: data.index(b"\x00")].count(b"\n") + 1
        raise PromptFileError(
            f"{path}:{line}: binary data (a NUL byte): a prompt file is UTF-8 text, one prompt a line, "
            "or JSON lines with a 'prompt' field"
        )
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = data[: e.start].count(b"\n") + 1
        raise PromptFileError(f"{path}:{line}: not UTF-8 text ({e.reason})") from None
    return [line.removesuffix("\r") for line in text.split("\n")]  # lines as editors number them


def _json_row(path: Path, n: int, line: str, require: tuple[str, ...]) -> dict:
    try:
        row = json.loads(line)
    except json.JSONDecodeError as e:
        raise PromptFileError(f"{path}:{n}: not valid JSON ({e.msg})") from None
    if not isinstance(row, dict):
        raise PromptFileError(f"{path}:{n}: expected a JSON object, got {type(row).__name__}")
    missing = [k for k in require if k not in row]
    if missing:
        raise PromptFileError(f"{path}:{n}: missing field(s) {', '.join(missing)}")
    return row


def _check_row(path: Path, n: int, row: dict, require_spec: bool) -> dict:
    prompt = row.get("prompt")
    if not isinstance(prompt, str):
        raise PromptFileError(f"{path}:{n}: 'prompt' must be a string, got {type(prompt).__name__}")
    if not prompt.strip():
        raise PromptFileError(f"{path}:{n}: empty prompt")
    try:
        check_metadata(metadata_of(row), prompt)
        return describe(row, require_spec=require_spec)
    except (PromptError, SpecError, ValueError) as e:
        raise PromptFileError(f"{path}:{n}: {e}") from None


def read_jsonl_rows(path: str | Path, require: tuple[str, ...], require_spec: bool = False) -> PromptFile:
    """Read a JSON-lines file whose every row has a prompt and the ``require`` fields (a manifest)."""
    path = Path(path)
    out = PromptFile(path, "jsonl")
    for n, line in enumerate(_lines(path), start=1):
        if not line.strip():
            continue
        row = _json_row(path, n, line, require)
        out.rows.append(_check_row(path, n, row, require_spec))
        out.lines.append(n)
    return out


def read_prompt_file(path: str | Path, require_spec: bool = False) -> PromptFile:
    """Read a prompt file in either format (see the module docstring)."""
    path = Path(path)
    lines = _lines(path)
    first = next((line.strip() for line in lines if line.strip()), None)
    if first is None:
        raise PromptFileError(f"{path}: no prompts (the file is empty)")
    is_json = first.startswith("{")
    if not is_json and path.suffix.lower() in JSON_SUFFIXES:
        n = next(i for i, line in enumerate(lines, start=1) if line.strip())
        raise PromptFileError(
            f"{path}:{n}: expected a JSON object with a 'prompt' (the file is {path.suffix}); "
            "for one prompt a line, name the file .txt"
        )
    out = PromptFile(path, "jsonl" if is_json else "text")
    seen: dict[str, tuple[int, dict]] = {}
    for n, line in enumerate(lines, start=1):
        text = line.strip()
        if not text:
            continue
        if is_json:
            row = _json_row(path, n, line, ("prompt",))
        else:
            if text.startswith("{"):
                try:
                    json.loads(text)
                except json.JSONDecodeError:
                    pass
                else:
                    raise PromptFileError(
                        f"{path}:{n}: a JSON line in a plain-text prompt file (its first prompt, "
                        "a plain line, made it one prompt a line): write every line as JSON or none"
                    )
            row = {"prompt": text}
        row = _check_row(path, n, row, require_spec)
        meta = metadata_of(row)
        if row["prompt"] in seen and seen[row["prompt"]][1] != meta:
            raise PromptFileError(
                f"{path}:{n}: the prompt {row['prompt']!r} of line {seen[row['prompt']][0]} again, "
                "with other metadata"
            )
        seen.setdefault(row["prompt"], (n, meta))
        out.rows.append(row)
        out.lines.append(n)
    return out


def read_prompts(path: str | Path, require_spec: bool = False) -> list[dict]:
    """The rows of a prompt file (see the module docstring): dicts with ``prompt``, ``spec``,
    ``task``, ``split`` (None outside the shapes grammar) and the metadata keys."""
    return read_prompt_file(path, require_spec=require_spec).rows


def not_in_grammar(prompt: str) -> str:
    """Why the shapes grammar does not read ``prompt`` (the parser's message)."""
    try:
        parse(prompt)
    except PromptError as e:
        return str(e)
    return "it does"


def needs_spec_error(what: str, prompt: str, where: str = "") -> ValueError:
    """The error of a stage that needs prompts of the shapes grammar, given free text."""
    reason = not_in_grammar(prompt).split("; known words")[0]
    at = f"{where}: " if where else ""
    return ValueError(
        f"{at}{what} needs prompts of the embedded shapes world's grammar, and {prompt!r} is free text "
        f"({reason})"
    )
