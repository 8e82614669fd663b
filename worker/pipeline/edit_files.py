"""Edit phase `edit_files`: each file the edit plan names, changed by exact search/replace blocks.

A block's `search` must match the base file exactly once: exactly, or else with every run of whitespace
taken as any run of whitespace (models re-indent). Every block of a file is tried on the base text
before any is applied; one that does not match, or matches twice, is sent back to the model with the
reason (`ai.max_output_retries` times, by `ask`). After that the file is rewritten whole, and the
fallback is logged. New pages are written whole from the home page, which shows the site's look.

An answer that leaves part of the file out ("<!-- rest unchanged -->") or shrinks the file by more than
half without the plan saying so is taken for a lazy or truncated answer and re-asked.
"""

from __future__ import annotations

import asyncio
import itertools
import re
from collections.abc import Awaitable, Callable
from typing import Any

from worker.ai.base import Usage
from worker.errors import AIBadOutput
from worker.models import (
    MAX_FILE_BYTES,
    EditedFiles,
    EditPlan,
    FileEdit,
    FileRewrite,
    GeneratedFile,
    NewPage,
    page_file,
)
from worker.pipeline import Ask

#: What a model writes instead of the code it left out.
#: How many files of one edit are asked for at once.
EDIT_CONCURRENCY = 4
LAZY = re.compile(
    r"(?:rest|remainder) of (?:the )?(?:file|page|code|content|document|html|css)"
    r"|(?:existing|previous|unchanged|same as before|other) (?:code|content|sections?|styles?|rules?)(?: here)?"
    r"\s*(?:\.\.\.|…|-->|\*/|unchanged|remains?|goes here|omitted)"
    r"|<!--\s*(?:\.\.\.|…)\s*-->|/\*\s*(?:\.\.\.|…)\s*\*/",
    re.I,
)
#: A file may shrink to this fraction of its size only when the plan says the instruction removes content.
MIN_KEPT = 0.5

Notify = Callable[..., Awaitable[None]]


def _locate(text: str, search: str) -> tuple[int, int] | str:
    """The one span of `text` that `search` matches, or why it does not (no match, several)."""
    count = text.count(search)
    if count == 1:
        start = text.index(search)
        return start, start + len(search)
    if count > 1:
        return f"matches {count} places; include more surrounding lines so that it matches one"
    words = search.split()
    if not words:
        return "is only whitespace"
    pattern = re.compile(r"\s+".join(re.escape(w) for w in words))
    found = [m.span() for m in pattern.finditer(text)]
    if len(found) == 1:
        return found[0]
    if found:
        return f"matches {len(found)} places (ignoring whitespace); include more surrounding lines"
    return "matches nothing in the file; copy the lines to replace exactly as the file has them"


def apply_blocks(text: str, edit: FileEdit) -> str:
    """`text` with every block applied, or ValueError naming each block that does not apply (none is then)."""
    spans: list[tuple[int, int, str]] = []
    problems: list[str] = []
    for number, block in enumerate(edit.blocks, 1):
        where = _locate(text, block.search)
        if isinstance(where, str):
            first = block.search.strip().splitlines()[0][:80] if block.search.strip() else ""
            problems.append(f"block {number} (search starting {first!r}) {where}")
        else:
            spans.append((*where, block.replace))
    spans.sort()
    for (_, end, _), (start, _, _) in itertools.pairwise(spans):
        if start < end:
            problems.append("two blocks change overlapping text; merge them into one")
            break
    if problems:
        raise ValueError(f"{edit.path}: " + "; ".join(problems))
    out: list[str] = []
    at = 0
    for start, end, replace in spans:
        out += [text[at:start], replace]
        at = end
    out.append(text[at:])
    return "".join(out)


def check_complete(path: str, before: str, after: str, *, may_shrink: bool) -> None:
    """Refuse an answer that leaves code out (a marker, or a file cut by more than half without reason), or
    makes the file larger than a generated file may be (checked here, where the model is asked again, not when
    the phase builds its output)."""
    size = len(after.encode())
    if size > MAX_FILE_BYTES:
        raise ValueError(
            f"{path}: the file would be {size:,} bytes in UTF-8, larger than the limit of {MAX_FILE_BYTES:,} bytes; "
            "keep the file smaller"
        )
    marker = LAZY.search(after)
    if marker and not LAZY.search(before):
        raise ValueError(
            f"{path}: the answer leaves part of the file out ({marker.group(0)!r}); write every line, "
            "or use search/replace blocks for the parts that change"
        )
    if before and len(after) < len(before) * MIN_KEPT and not may_shrink:
        raise ValueError(
            f"{path}: the file shrank from {len(before):,} to {len(after):,} characters, which the instruction "
            "does not ask for: the answer looks truncated; write the whole file"
        )


def _same_path(path: str) -> Callable[[Any], None]:
    def check(answer: FileEdit | FileRewrite) -> None:
        if answer.path != path:
            raise ValueError(f"the answer is for {answer.path!r}; it must be for {path!r}")

    return check


async def edit_file(
    instruction: str, path: str, before: str, edit_plan: EditPlan, ask: Ask, notify: Notify
) -> tuple[str, Usage, bool]:
    """The file changed as the instruction says: (its text, the usage, whether it was rewritten whole)."""
    may_shrink = path in edit_plan.shrinks
    inputs = {"instruction": instruction, "summary": edit_plan.summary, "path": path, "content": before}
    result: dict[str, str] = {}

    def check_blocks(answer: FileEdit) -> None:
        _same_path(path)(answer)
        after = apply_blocks(before, answer)
        check_complete(path, before, after, may_shrink=may_shrink)
        result["text"] = after

    try:
        _, usage = await ask("editing", inputs, FileEdit, check=check_blocks)
        return result["text"], usage, False
    except AIBadOutput as exc:
        await notify(
            f"{path}: the search/replace blocks did not apply; rewriting the file whole ({exc.message[:300]})",
            level="warning",
            event="edit.fallback",
            path=path,
        )

    def check_rewrite(answer: FileRewrite) -> None:
        _same_path(path)(answer)
        check_complete(path, before, answer.content, may_shrink=may_shrink)

    rewrite, more = await ask("rewriting", {**inputs, "whole": True}, FileRewrite, check=check_rewrite)
    return rewrite.content, more, True


async def write_page(instruction: str, page: NewPage, template: str, ask: Ask) -> tuple[str, Usage]:
    """A new page, written whole in the look of `template` (the home page)."""
    path = page_file(page.slug)

    def check(answer: FileRewrite) -> None:
        _same_path(path)(answer)
        check_complete(path, template, answer.content, may_shrink=True)

    inputs = {"instruction": instruction, "path": path, "page": page.model_dump(mode="json"), "template": template}
    answer, usage = await ask("rewriting", inputs, FileRewrite, check=check)
    return answer.content, usage


async def make_edited_files(
    instruction: str, edit_plan: EditPlan, base: dict[str, str], ask: Ask, notify: Notify
) -> tuple[EditedFiles, Usage]:
    """Every file the plan changes or adds, in full. `base`: the text files of the base version by path.

    The files are asked for side by side, EDIT_CONCURRENCY at a time (each is its own model call, and the
    provider's limits hold across them), so an edit of every page takes about as long as one; the first
    file that fails cancels the others and fails the phase."""
    gate = asyncio.Semaphore(EDIT_CONCURRENCY)

    async def changed(path: str) -> tuple[str, Usage, bool]:
        async with gate:
            return await edit_file(instruction, path, base[path], edit_plan, ask, notify)

    async def added(page: NewPage) -> tuple[str, Usage]:
        async with gate:
            return await write_page(instruction, page, base.get(page_file("index"), ""), ask)

    try:
        async with asyncio.TaskGroup() as group:
            edits = [group.create_task(changed(path)) for path in edit_plan.change]
            pages = [group.create_task(added(page)) for page in edit_plan.add_pages]
    except BaseExceptionGroup as failed:  # the first file's failure, as the phase would raise it alone
        raise failed.exceptions[0] from None
    usage = Usage()
    files: list[GeneratedFile] = []
    fallbacks: list[str] = []
    for path, task in zip(edit_plan.change, edits, strict=True):
        text, used, whole = task.result()
        usage += used
        if whole:
            fallbacks.append(path)
        if text != base[path]:
            files.append(GeneratedFile(path=path, content=text))
    for page, page_task in zip(edit_plan.add_pages, pages, strict=True):
        text, used = page_task.result()
        usage += used
        files.append(GeneratedFile(path=page_file(page.slug), content=text))
    return EditedFiles(files=files, fallbacks=fallbacks), usage
