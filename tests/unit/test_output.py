"""worker/output.py and the path rules of worker/models.py: nothing is ever written outside the order's directory."""

from __future__ import annotations

import stat
import threading
from pathlib import Path

import pytest
from pydantic import ValidationError

from worker import output
from worker.models import MAX_FILE_BYTES, MAX_FILES, GeneratedFile, OutputFile, SiteCode, check_relative_path
from worker.output import INLINE_WRITE_SETTING, SiteWriter, order_dir, site_is_complete, write_site

UNSAFE_PATHS = [
    "../x.html",
    "/etc/passwd",
    "a/../../b.html",
    "a\\b.html",
    "x\x00.html",
    "x\n.html",
    "file.exe",
    "..",
    "./x.html",
    ".hidden.html",
    "a//b.html",
    "a/b/c/d/e.html",
    "",
]


def tree(directory: Path) -> dict[str, bytes]:
    """Every file under a directory, by relative POSIX path."""
    return {p.relative_to(directory).as_posix(): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}


@pytest.fixture
def root(tmp_path: Path) -> Path:
    return tmp_path / "sites"


@pytest.fixture
def sibling(tmp_path: Path) -> Path:
    """A directory next to the output root that nothing may ever write into."""
    path = tmp_path / "sibling"
    path.mkdir()
    return path


SITE = [
    OutputFile("index.html", b"<h1>home</h1>"),
    OutputFile("about.html", "<h1>Pão</h1>".encode()),
    OutputFile("assets/css/style.css", b"body{}"),
    OutputFile("manifest.json", b"{}"),
]


# --------------------------------------------------------------------------- write_site


def test_write_site_writes_files_under_the_order_dir(root: Path) -> None:
    target = write_site(root, 12, SITE)
    assert target == root.resolve() / "12"
    assert target == order_dir(root, 12)
    assert tree(target) == {f.path: f.content for f in SITE}
    assert site_is_complete(root, 12)
    assert not site_is_complete(root, 13)


def test_written_directories_are_world_readable(root: Path) -> None:
    target = write_site(root, 3, SITE)
    for directory in (target, target / "assets", target / "assets" / "css"):
        assert stat.S_IMODE(directory.stat().st_mode) == 0o755


def test_write_site_replaces_the_previous_site_whole(root: Path) -> None:
    write_site(root, 5, [*SITE, OutputFile("old-page.html", b"old"), OutputFile("old/dir/x.css", b"x")])
    new = [OutputFile("index.html", b"<h1>new</h1>"), OutputFile("manifest.json", b'{"v": 2}')]
    target = write_site(root, 5, new)
    assert tree(target) == {"index.html": b"<h1>new</h1>", "manifest.json": b'{"v": 2}'}
    assert not (target / "old").exists()


def test_write_site_leaves_no_build_or_old_copies(root: Path) -> None:
    write_site(root, 9, SITE)
    write_site(root, 9, SITE[:1])
    assert sorted(p.name for p in root.iterdir()) == ["9"]


def test_write_site_does_not_touch_other_orders(root: Path) -> None:
    write_site(root, 1, SITE)
    write_site(root, 10, SITE[:2])
    write_site(root, 1, SITE[:1])
    assert tree(root / "10") == {f.path: f.content for f in SITE[:2]}
    assert tree(root / "1") == {"index.html": SITE[0].content}


def test_write_site_cleans_leftovers_of_a_crash(root: Path) -> None:
    root.mkdir()
    for name in (".4.build", ".4.old"):
        (root / name / "sub").mkdir(parents=True)
        (root / name / "sub" / "index.html").write_text("stale")
    other = root / ".44.build"  # another order's build in progress: not ours to remove
    other.mkdir(parents=True)
    write_site(root, 4, SITE)
    assert sorted(p.name for p in root.iterdir()) == [".44.build", "4"]
    assert tree(root / "4") == {f.path: f.content for f in SITE}


def test_write_site_with_an_unsafe_path_writes_nothing(root: Path, sibling: Path) -> None:
    files = [OutputFile("index.html", b"ok"), OutputFile("../sibling/evil.html", b"evil")]
    with pytest.raises(ValueError, match="must be relative"):
        write_site(root, 6, files)
    assert list(sibling.iterdir()) == []
    assert list(root.iterdir()) == []  # no site, no staging copy left behind
    assert not (root.parent / "evil.html").exists()


def test_rejected_rewrite_keeps_the_previous_site(root: Path, sibling: Path) -> None:
    write_site(root, 8, SITE)
    with pytest.raises(ValueError):
        write_site(root, 8, [OutputFile("index.html", b"new"), OutputFile("/etc/passwd", b"x")])
    assert tree(root / "8") == {f.path: f.content for f in SITE}
    assert sorted(p.name for p in root.iterdir()) == ["8"]
    assert list(sibling.iterdir()) == []


def test_file_and_folder_with_the_same_name_is_rejected_as_model_output() -> None:
    # Such a site could never be written, so it must fail validation (and be re-asked), not
    # reach the disk and fail there as a seemingly transient OSError.
    files = [{"path": "style.css", "content": "x"}, {"path": "style.css/x.html", "content": "y"}]
    with pytest.raises(ValidationError, match=r"style\.css are also used as folders"):
        SiteCode.model_validate({"files": files})


# --------------------------------------------------------------------------- model path rules


@pytest.mark.parametrize("path", UNSAFE_PATHS)
def test_generated_file_rejects_unsafe_paths(path: str) -> None:
    with pytest.raises(ValidationError) as caught:
        GeneratedFile(path=path, content="x")
    assert "path" in str(caught.value)


@pytest.mark.parametrize(
    ("path", "message"),
    [
        ("x\x00.html", "control or NUL"),
        ("x\n.html", "control or NUL"),
        ("../x.html", "must be relative"),
        ("a\\b.html", "must be relative"),
        ("file.exe", "not allowed"),
        ("a b.html", "may only use"),
    ],
)
def test_check_relative_path_says_what_is_wrong(path: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        check_relative_path(path)


@pytest.mark.parametrize(
    "path", ["index.html", "style.css", "assets/app.js", "img/logo.svg", "a/b/c/robots.txt", "site.webmanifest"]
)
def test_generated_file_accepts_safe_paths(path: str) -> None:
    assert GeneratedFile(path=path, content="x").path == path


def test_generated_file_size_limit_counts_bytes() -> None:
    assert len(GeneratedFile(path="big.txt", content="a" * MAX_FILE_BYTES).content) == MAX_FILE_BYTES
    with pytest.raises(ValidationError, match="larger than"):
        GeneratedFile(path="big.txt", content="a" * (MAX_FILE_BYTES + 1))
    with pytest.raises(ValidationError, match="larger than"):
        GeneratedFile(path="big.txt", content="é" * (MAX_FILE_BYTES // 2 + 1))  # 2 bytes each


def test_site_code_rejects_too_many_files() -> None:
    files = [GeneratedFile(path=f"p{i}.html", content="x") for i in range(MAX_FILES + 1)]
    with pytest.raises(ValidationError) as caught:
        SiteCode(files=files)
    assert "files" in str(caught.value)
    assert len(SiteCode(files=files[:MAX_FILES]).files) == MAX_FILES


@pytest.mark.parametrize("paths", [["index.html", "index.html"], ["Index.html", "index.HTML"]])
def test_site_code_rejects_duplicate_paths(paths: list[str]) -> None:
    with pytest.raises(ValidationError, match="unique"):
        SiteCode(files=[GeneratedFile(path=p, content="x") for p in paths])


def test_site_code_needs_a_file() -> None:
    with pytest.raises(ValidationError):
        SiteCode(files=[])


# --------------------------------------------------------------------------- SiteWriter: loop or thread

SMALL_SITE = [OutputFile("index.html", b"<!doctype html>"), OutputFile("manifest.json", b"{}")]


@pytest.fixture
def writing_threads(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """The thread of each write_site call the writer makes (the call itself is the real one)."""
    threads: list[int] = []

    def recording(root: Path, order_id: int, files: list[OutputFile]) -> Path:
        threads.append(threading.get_ident())
        return write_site(root, order_id, files)

    monkeypatch.setattr(output, "write_site", recording)
    return threads


async def test_a_quick_write_stays_on_the_event_loop(root: Path, writing_threads: list[int]) -> None:
    writer = SiteWriter(max_s=60)
    for order_id in (1, 2):
        assert await writer.write(root, order_id, SMALL_SITE) == root / str(order_id)
    assert writing_threads == [threading.get_ident()] * 2 and not writer.in_thread
    assert tree(root / "2") == {"index.html": b"<!doctype html>", "manifest.json": b"{}"}


async def test_a_slow_write_sends_the_next_ones_to_a_thread(
    root: Path, writing_threads: list[int], log_lines: list[str]
) -> None:
    writer = SiteWriter(max_s=1e-9)  # every write is over the limit
    await writer.write(root, 1, SMALL_SITE)
    assert writer.in_thread
    (warning,) = [line for line in log_lines if INLINE_WRITE_SETTING in line]
    assert "held the event loop" in warning and "in a thread for the next 300 s" in warning
    await writer.write(root, 2, SMALL_SITE)
    assert writing_threads[0] == threading.get_ident() and writing_threads[1] != threading.get_ident()
    assert tree(root / "2") == {"index.html": b"<!doctype html>", "manifest.json": b"{}"}


async def test_a_limit_of_0_writes_every_site_in_a_thread(root: Path, writing_threads: list[int]) -> None:
    writer = SiteWriter(max_s=0)
    await writer.write(root, 1, SMALL_SITE)
    assert writer.in_thread and writing_threads[0] != threading.get_ident()
    assert site_is_complete(root, 1)


async def test_a_failed_inline_write_raises_and_leaves_nothing(root: Path) -> None:
    with pytest.raises(ValueError):
        await SiteWriter(max_s=60).write(root, 3, [OutputFile("../escape.html", b"x")])
    assert not (root / "3").exists() and not (root.parent / "escape.html").exists()
