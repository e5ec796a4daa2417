"""`-S key=value` overrides applied to params.yaml the way `dvc exp run -S` computes them, written back by editing only
the lines whose values changed.

DVC's own writer (ruamel.yaml, as `dvc exp run -S` uses it) re-serialises the whole file: every `null` becomes an
empty value, block lists lose their indentation, long strings are folded onto two lines with a trailing space.
Here DVC computes the new values (its Hydra-syntax parser: the same overrides mean the same thing), and each
changed value is written in place of the old one, on its own line(s), comments and everything else kept. Only an
override that adds or removes a key (`+key=…`, `~key`) falls back to DVC's rewrite of the whole file, and says so.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import yaml


@dataclass(frozen=True)
class Change:
    """One value an override changed: its dotted key, and the value before and after."""

    key: str
    old: object
    new: object

    def __str__(self) -> str:
        return f"{self.key}: {_inline(self.old)} -> {_inline(self.new)}"


class _Structural(Exception):
    """A change that is not a value replaced by another (a key added or removed)."""


def _inline(value) -> str:
    """`value` as YAML on one line (flow style): `null`, `10`, `[200, 256]`, `'a: b'`."""
    text = yaml.safe_dump(value, default_flow_style=True, width=float("inf"), sort_keys=False)
    return text.removesuffix("\n...\n").rstrip("\n")


def changes(old: object, new: object, prefix: str = "") -> list[Change]:
    """The values that differ between two parsed params files, as key paths; raises _Structural when a mapping
    gained or lost a key."""
    if isinstance(old, dict) and isinstance(new, dict):
        if list(old) != list(new):
            raise _Structural(prefix or "(the file)")
        return [c for key in old for c in changes(old[key], new[key], f"{prefix}.{key}" if prefix else str(key))]
    if old == new and type(old) is type(new):
        return []
    return [Change(prefix, old, new)]


def _indent(line: str) -> int:
    return len(line) - len(line.lstrip(" "))


def _value_text(rest: str, value) -> str | None:
    """The leading part of `rest` (what follows `key: ` on its line) that is `value`'s text, without what follows it
    (a comment, the rest of a flow collection); None when the value does not end on this line."""
    candidates = [i for i, char in enumerate(rest) if char in ",]}" or char == "#" and i and rest[i - 1] in " \t"]
    for end in [*candidates, len(rest)]:
        text = rest[:end].rstrip()
        try:
            if text and yaml.safe_load(text) == value and type(yaml.safe_load(text)) is type(value):
                return text
        except yaml.YAMLError:
            continue
    return None


def _block(value, indent: int) -> list[str]:
    """A non-empty list or mapping in block style, each line indented by `indent` spaces."""
    text = yaml.safe_dump(value, default_flow_style=False, width=float("inf"), sort_keys=False)
    return [" " * indent + line for line in text.splitlines()]


def _edit(lines: list[str], node, path: list[str], old, new) -> None:
    """Replace, in `lines` (the file's, each with its newline), the value at `path` of the ruamel round-trip
    `node`."""
    *parents, key = path
    for part in parents:
        node = node[part]
    line_no, column = node.lc.value(key)
    key_line, _ = node.lc.key(key)
    key_indent = _indent(lines[key_line])
    # A block below the key (a flow-style one is on the key's line)
    if isinstance(old, (list, dict)) and old and line_no != key_line:
        end = line_no
        while end < len(lines):  # the block's lines: deeper than the key, or a `- ` item at the key's column
            text = lines[end]
            stripped = text.strip()
            if stripped and _indent(text) <= key_indent and not (
                    isinstance(old, list) and _indent(text) == key_indent and stripped.startswith("- ")):
                break
            end += 1
        while end > line_no and lines[end - 1].strip()[:1] in ("", "#"):  # blank and comment lines after it
            end -= 1                                                        # belong to what follows
        item_indent = _indent(lines[line_no])
        head = lines[key_line].rstrip("\n")
        if isinstance(new, (list, dict)) and new:
            lines[line_no:end] = [line + "\n" for line in _block(new, item_indent)]
        else:
            lines[line_no:end] = []
            lines[key_line] = f"{head.rstrip()} {_inline(new)}\n"
        return
    text = lines[line_no]
    rest = text[column:].rstrip("\n")
    found = _value_text(rest, old)
    if found is None:
        raise _Structural(".".join(path))  # a value over several lines: let DVC write it
    tail = rest[len(found):]
    in_flow = node.fa.flow_style() or isinstance(old, (list, dict))  # inside `{…}`, or a `[…]` value: stay inline
    if isinstance(new, (list, dict)) and new and not in_flow:
        lines[line_no:line_no + 1] = [text[:column].rstrip() + tail + "\n",
                                      *(line + "\n" for line in _block(new, key_indent + 2))]
    else:
        lines[line_no] = text[:column] + _inline(new) + tail + "\n"


def edit_in_place(original: str, new_data: dict) -> tuple[str, list[Change]] | None:
    """`original` (a params file's text) with the values that differ in `new_data` replaced on their own lines, and
    the changes; None when that cannot be done (a key added or removed, a value over several lines) or would not
    give `new_data` back."""
    from ruamel.yaml import YAML

    old_data = yaml.safe_load(original) or {}
    try:
        found = changes(old_data, new_data)
    except _Structural:
        return None
    if not found:
        return original, []
    tree = YAML(typ="rt").load(original)
    lines = original.splitlines(keepends=True)
    if lines and not lines[-1].endswith("\n"):
        lines[-1] += "\n"
    # Bottom up: an edit that adds or removes lines leaves the line numbers above it as ruamel read them.
    for change in sorted(found, key=lambda c: _position(tree, c.key.split(".")), reverse=True):
        try:
            _edit(lines, tree, change.key.split("."), change.old, change.new)
        except _Structural:
            return None
    edited = "".join(lines)
    try:
        if yaml.safe_load(edited) != new_data:
            return None
    except yaml.YAMLError:
        return None
    return edited, found


def _position(tree, path: list[str]) -> int:
    node = tree
    for part in path[:-1]:
        node = node[part]
    return node.lc.key(path[-1])[0]


def apply(path: Path, overrides: list[str]) -> tuple[list[Change], bool]:
    """Apply `overrides` to the params file `path` with DVC's override parser; returns the changes, and whether the
    file had to be rewritten whole by DVC's writer (formatting not kept) rather than edited line by line."""
    from dvc.utils.hydra import apply_overrides as dvc_apply_overrides

    original = path.read_text(encoding="utf-8")
    old_data = yaml.safe_load(original) or {}
    dvc_apply_overrides(path, list(overrides))  # DVC computes (and writes) the result
    new_data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    edited = edit_in_place(original, new_data)
    if edited is not None:
        path.write_text(edited[0], encoding="utf-8")
        return edited[1], False
    try:
        found = changes(old_data, new_data)
    except _Structural:
        found = [Change(key, old_data.get(key), new_data.get(key)) for key in sorted({*old_data, *new_data})
                 if old_data.get(key) != new_data.get(key)]
    return found, True
