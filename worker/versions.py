"""What changed between two versions of a site: a unified diff per changed text file, the files added and
removed. Pure functions over file rows (path, content, sha256, bytes, media_type), shared by the API's
`/versions/{n}/diff` and `sitegen diff`."""

from __future__ import annotations

import difflib
from typing import Any

#: Media types whose files a diff shows line by line (others are compared by their sha256 alone).
_TEXT_TYPES = frozenset({"application/json", "application/javascript", "application/xml", "image/svg+xml"})


def is_text(media_type: str) -> bool:
    kind = media_type.split(";", 1)[0].strip().lower()
    return kind.startswith("text/") or kind in _TEXT_TYPES or kind.endswith(("+json", "+xml"))


def unified_diff(old: bytes, new: bytes, from_name: str, to_name: str) -> str | None:
    """The unified diff of two texts (3 lines of context), as `diff -u` writes it; None if either is not UTF-8."""
    try:
        a, b = old.decode(), new.decode()
    except UnicodeDecodeError:
        return None
    lines = difflib.unified_diff(
        a.splitlines(keepends=True), b.splitlines(keepends=True), fromfile=from_name, tofile=to_name
    )
    return "".join(line if line.endswith("\n") else f"{line}\n\\ No newline at end of file\n" for line in lines)


def _manifest_entry(f: dict[str, Any]) -> dict[str, Any]:
    return {"path": f["path"], "sha256": f["sha256"], "bytes": f["bytes"], "media_type": f["media_type"]}


def diff_versions(
    old: list[dict[str, Any]], new: list[dict[str, Any]], *, old_label: str, new_label: str
) -> dict[str, Any]:
    """What changed from the files `old` to the files `new` (rows with path, content, sha256, bytes,
    media_type): a unified diff per changed text file, and the files added and removed."""
    before, after = {f["path"]: f for f in old}, {f["path"]: f for f in new}
    changed = []
    for path in sorted(before.keys() & after.keys()):
        a, b = before[path], after[path]
        if a["sha256"] == b["sha256"]:
            continue
        text = is_text(a["media_type"]) and is_text(b["media_type"])
        diff = unified_diff(bytes(a["content"]), bytes(b["content"]), f"{old_label}/{path}", f"{new_label}/{path}")
        changed.append(
            {
                "path": path,
                "media_type": b["media_type"],
                "from_sha256": a["sha256"],
                "to_sha256": b["sha256"],
                "from_bytes": a["bytes"],
                "to_bytes": b["bytes"],
                "binary": not text or diff is None,
                "diff": diff if text else None,
            }
        )
    return {
        "changed": changed,
        "added": [_manifest_entry(after[p]) for p in sorted(after.keys() - before.keys())],
        "removed": [_manifest_entry(before[p]) for p in sorted(before.keys() - after.keys())],
        "unchanged": sum(1 for p in before.keys() & after.keys() if before[p]["sha256"] == after[p]["sha256"]),
    }
