"""worker/output.py and the path rules of worker/models.py: nothing is ever written outside the order's directory."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from pydantic import ValidationError

from worker import output
from worker.models import MAX_FILE_BYTES, MAX_FILES, GeneratedFile, OutputFile, SiteCode, check_relative_path
from worker.output import INLINE_WRITE_SETTING, SiteWriter, clean_leftovers, order_dir, site_is_complete, write_site

ROOT = Path(__file__).resolve().parents[2]
os_rename = os.rename
#: The one-step swap is Linux's renameat2(RENAME_EXCHANGE); elsewhere write_site falls back to two renames.
needs_exchange = pytest.mark.skipif(output._renameat2 is None, reason="no renameat2 on this system")

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


# --------------------------------------------------------------------------- the swap: one step, never missing

READER = """
import os, sys
site, stop = sys.argv[1], sys.argv[2]
reads = missing = torn = 0
while not os.path.exists(stop):
    for name in ("index.html", "manifest.json"):
        try:
            fd = os.open(os.path.join(site, name), os.O_RDONLY)
        except FileNotFoundError:
            missing += 1
            continue
        data = os.read(fd, 1 << 16)
        os.close(fd)
        torn += not data.endswith(b"</html>" if name == "index.html" else b"}")
        reads += 1
        if reads == 1:
            print("reading", flush=True)
print(reads, missing, torn, flush=True)
"""


def version(n: int, writer: str = "") -> list[OutputFile]:
    """A complete site whose every file says which write it is from."""
    tag = f"{writer}{n}".encode()
    return [
        OutputFile("index.html", b"<!doctype html><h1>" + tag + b"</h1></html>"),
        OutputFile(f"page-{writer}{n % 3}.html", b"<h1>" + tag + b"</h1></html>"),
        OutputFile("assets/site.css", b"/* " + tag + b" */"),
        OutputFile("manifest.json", b'{"write": "' + tag + b'"}'),
    ]


@needs_exchange
def test_a_reader_never_finds_the_site_missing_while_it_is_rewritten(root: Path, tmp_path: Path) -> None:
    """Regression: issue 14 defect 12. The swap was two renames: in between, `<order_id>/` did not exist and a web
    server answered 404. A reader in another process reads index.html and manifest.json throughout 500 rewrites."""
    write_site(root, 21, version(0))
    stop = tmp_path / "stop"
    reader = subprocess.Popen(
        [sys.executable, "-c", READER, str(root / "21"), str(stop)], stdout=subprocess.PIPE, text=True
    )
    try:
        assert reader.stdout is not None and reader.stdout.readline() == "reading\n"
        for n in range(1, 501):
            write_site(root, 21, version(n))
    finally:
        stop.touch()
        out, _ = reader.communicate(timeout=60)
    reads, missing, torn = map(int, out.split())
    assert (missing, torn) == (0, 0), f"{missing} of {reads + missing} reads found no file, {torn} a partial one"
    assert reads > 100, "the reader ran alongside the rewrites"
    assert tree(root / "21") == {f.path: f.content for f in version(500)}
    assert sorted(p.name for p in root.iterdir()) == ["21"]


def test_two_writers_of_one_order_never_interfere(root: Path) -> None:
    """Regression: issue 14 defect 12. Both used the fixed `.<order>.build` folder, so one removed or swapped in the
    other's half-built site. Each write now builds apart; the site is always one write's complete set of files."""
    errors: list[BaseException] = []
    start = threading.Barrier(2)

    def rewrite(writer: str) -> None:
        start.wait()
        for n in range(300):
            try:
                write_site(root, 22, version(n, writer))
            except BaseException as exc:
                errors.append(exc)

    threads = [threading.Thread(target=rewrite, args=(w,)) for w in "ab"]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    assert tree(root / "22") in ({f.path: f.content for f in version(299, w)} for w in "ab")
    assert sorted(p.name for p in root.iterdir()) == ["22"]


def test_writes_in_other_processes_of_one_order_never_interfere(root: Path) -> None:
    """Regression: issue 14 defect 12. The same with two replicas (processes) sharing the output folder."""
    script = (
        "import sys; from pathlib import Path; from tests.unit.test_output import version; "
        "from worker.output import write_site\n"
        "for n in range(200): write_site(Path(sys.argv[1]), 23, version(n, sys.argv[2]))"
    )
    writers = [
        subprocess.Popen([sys.executable, "-c", script, str(root), w], cwd=ROOT, stderr=subprocess.PIPE, text=True)
        for w in "ab"
    ]
    failures = [w.communicate(timeout=120)[1] for w in writers if w.wait(timeout=120) != 0]
    assert failures == []
    assert tree(root / "23") in ({f.path: f.content for f in version(199, w)} for w in "ab")
    assert sorted(p.name for p in root.iterdir()) == ["23"]


#: File system calls whose audit events mark a step of a write: a crash can come before any of them.
STEPS = frozenset(
    {"os.mkdir", "open", "os.chmod", "os.rename", "ctypes.call_function", "shutil.rmtree", "os.remove", "os.rmdir"}
)


def crash_at(step: int, write: Callable[[], object]) -> bool:
    """Run `write` in a forked process killed (os._exit, no clean-up) just before its `step`-th file system call.

    True when the write was killed, False when it finished before that step.
    """
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        seen = 0

        def hook(event: str, args: tuple[object, ...]) -> None:
            nonlocal seen
            if event in STEPS:
                seen += 1
                if seen == step:
                    os._exit(9)

        sys.addaudithook(hook)
        try:
            write()
        finally:
            os._exit(0)
    _, status = os.waitpid(pid, 0)
    assert os.WIFEXITED(status)
    return os.WEXITSTATUS(status) == 9


def servable(root: Path, order_id: int) -> dict[str, bytes]:
    site = tree(root / str(order_id))
    assert site_is_complete(root, order_id)
    return site


@needs_exchange
def test_a_crash_at_any_step_of_a_rewrite_leaves_a_servable_site(root: Path) -> None:
    """Regression: issue 14 defect 12. A crash between the two renames left no `<order_id>/`, only `.old`. Killed
    before each file system call of a rewrite in turn, the write leaves the old or the new site, whole."""
    old, new = {f.path: f.content for f in version(1)}, {f.path: f.content for f in version(2)}
    step = 0
    while True:
        write_site(root, 24, version(1))
        step += 1
        killed = crash_at(step, lambda: write_site(root, 24, version(2)))
        assert servable(root, 24) in (old, new), f"killed before step {step}"
        clean_leftovers(root)
        assert sorted(p.name for p in root.iterdir()) == ["24"], "the dead writer's leftovers are cleaned"
        if not killed:
            break
    assert step > 5


def test_without_rename_exchange_a_crash_between_the_renames_is_repaired_at_startup(
    root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Regression: issue 14 defect 12. Where the file system refuses RENAME_EXCHANGE, the fallback's set-aside site
    is put back by the startup clean-up when a crash left the order without one."""
    monkeypatch.setattr(output, "_renameat2", None)
    old = {f.path: f.content for f in version(1)}
    write_site(root, 25, version(1))
    renames = 0

    def first_rename_only(event: str, args: tuple[object, ...]) -> None:
        nonlocal renames
        renames += event == "os.rename"
        if renames == 3:  # the new order's rename failed, the site went aside: die before the build goes in
            os._exit(9)

    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        sys.addaudithook(first_rename_only)
        try:
            write_site(root, 25, version(2))
        finally:
            os._exit(0)
    _, status = os.waitpid(pid, 0)
    assert os.WEXITSTATUS(status) == 9
    assert not (root / "25").exists(), "the fallback's window: the site is aside"

    assert clean_leftovers(root) == 2  # the set-aside site put back, the dead build removed
    assert servable(root, 25) == old
    assert sorted(p.name for p in root.iterdir()) == ["25"]
    write_site(root, 25, version(3))
    assert servable(root, 25) == {f.path: f.content for f in version(3)}


def test_leftovers_are_cleaned_at_startup_only_when_clearly_dead(root: Path) -> None:
    """Regression: issue 14 defect 12. Leftovers of crashed writes are removed at startup: a dead owner's at once,
    anyone's past the age bound; a build another replica may be writing right now is left alone."""
    finished = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead_pid = int(finished.stdout)
    owner = output._OWNER
    root.mkdir()
    names = {
        "dead_owner": f".31.build-{owner}-{dead_pid}-0",
        "old_elsewhere": ".32.build-abcdef01-77-3",
        "young_elsewhere": ".33.build-abcdef01-77-4",
        "legacy_build": ".34.build",
        "legacy_old": ".35.old",
        "set_aside": f".36.old-{owner}-{dead_pid}-1",
        "live_here": f".37.build-{owner}-{os.getpid()}-5",
    }
    for name in names.values():
        (root / name / "sub").mkdir(parents=True)
        (root / name / "sub" / "index.html").write_text("stale")
    (root / "36").mkdir()  # the set-aside's order has a site: the set-aside one is stale
    (root / "35-not-a-leftover").mkdir()
    (root / ".hidden").mkdir()
    long_ago = time.time() - output.LEFTOVER_MAX_AGE_S - 60
    for key in ("old_elsewhere", "legacy_build", "legacy_old"):
        os.utime(root / names[key], (long_ago, long_ago))

    assert clean_leftovers(root) == 5

    assert sorted(p.name for p in root.iterdir()) == sorted(
        [names["young_elsewhere"], names["live_here"], "35", "35-not-a-leftover", "36", ".hidden"]
    )
    assert tree(root / "35") == {"sub/index.html": b"stale"}, "a set-aside site with no site in its place is put back"
    assert clean_leftovers(root / "missing") == 0


@needs_exchange
def test_a_rewrite_swaps_in_one_step_where_supported(root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    write_site(root, 26, version(1))
    renames: list[tuple[object, ...]] = []
    monkeypatch.setattr(os, "rename", lambda *args: renames.append(args) or os_rename(*args))
    write_site(root, 26, version(2))
    assert len(renames) == 1, "only the rename that finds the site there; then one RENAME_EXCHANGE"
    assert tree(root / "26") == {f.path: f.content for f in version(2)}


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


@pytest.mark.parametrize("paths", [["index.html", "index.html"], ["Index.html", "index.html"]])
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
