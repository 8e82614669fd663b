"""The state machine of a generation: claim the order, run the phases not yet committed, finish or hand back.

This is the only place that decides what a failure means for the job: a retryable one hands
the generation back (its committed phases kept) and asks arq to try again later through
`RetryLater`; any other one, or a retryable one on the last try, fails the generation with
its error stored.
"""

from __future__ import annotations

import asyncio
import json
import random
import time
import uuid
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass, field
from datetime import datetime
from functools import cached_property, partial
from pathlib import Path
from typing import Any, TypeVar

from arq import ArqRedis
from loguru import logger
from pydantic import BaseModel, ValidationError

from worker.ai.base import AIRouter, Task, Usage
from worker.ai.parsing import ask_model
from worker.errors import (
    AIRateLimited,
    AttemptsExhausted,
    BriefInvalid,
    BudgetWaitExceeded,
    ClaimLost,
    EditFailed,
    EditInvalid,
    InputError,
    JobArgumentsInvalid,
    OrderBusy,
    OrderNotFound,
    TokenBudgetExceeded,
    describe,
    is_infrastructure,
    is_retryable,
    message_of,
)
from worker.metrics import Metrics
from worker.models import (
    Brief,
    EditedFiles,
    EditPlan,
    Manifest,
    SiteCode,
    SiteContent,
    SitePlan,
    edit_request_problem,
)
from worker.ordering import jobs_ahead
from worker.output import SiteWriter, site_is_complete
from worker.pipeline import M
from worker.pipeline.assemble import Publishable, assemble_site
from worker.pipeline.code import make_code
from worker.pipeline.content import make_content
from worker.pipeline.edit_assemble import assemble_edit
from worker.pipeline.edit_files import make_edited_files
from worker.pipeline.edit_plan import EDITABLE_SUFFIXES, make_edit_plan
from worker.pipeline.plan import make_plan
from worker.progress import ProgressLog
from worker.settings import Settings
from worker.store import PHASES, Claim, LiveSite, NewVersion, Store

T = TypeVar("T")


class RetryLater(Exception):
    """Try the job again after `defer_s` seconds (the job shell turns this into arq's Retry)."""

    def __init__(self, defer_s: float, cause: BaseException) -> None:
        super().__init__(f"retry in {defer_s:.1f}s after {type(cause).__name__}: {message_of(cause)}")
        self.defer_s = defer_s
        self.cause = cause


class ShuttingDown(Exception):
    """The replica was asked to stop: hand the generation back between two phases."""


class CancelRequested(Exception):
    """`sitegen cancel` asked this generation to stop: end it `cancelled`, keeping its committed phases."""


@dataclass
class Runtime:
    """Everything a job uses, created once in the worker's on_startup on its event loop."""

    settings: Settings
    store: Store
    progress: ProgressLog
    ai: AIRouter
    redis: ArqRedis | None = None
    heartbeat: Heartbeat = field(default_factory=lambda: Heartbeat())
    #: Set on SIGTERM/SIGINT: running generations stop at their next phase boundary.
    draining: asyncio.Event = field(default_factory=asyncio.Event)
    #: Prometheus metrics of this replica (its own registry; served only when `metrics.port` is set).
    metrics: Metrics = field(default_factory=Metrics)

    @cached_property
    def output_root(self) -> Path:
        """`output.dir`, absolute: resolved once, not for every site written."""
        return self.settings.output.dir.resolve()

    @cached_property
    def writer(self) -> SiteWriter:
        return SiteWriter(self.settings.output.inline_write_max_ms / 1000)


def backoff_s(settings: Settings, job_try: int, *, provider_asked_s: float | None = None) -> float:
    """Exponential backoff with jitter, so a crowd of failed jobs does not come back at once; at least what
    a provider asked for (its Retry-After, or the wait for its budget), up to `ai.max_retry_defer_s`."""
    w = settings.worker
    base: float = min(w.retry_backoff_max_s, w.retry_backoff_s * 2.0 ** min(max(job_try - 1, 0), 30))
    defer = base * random.uniform(0.5, 1.0)
    if provider_asked_s:
        defer = max(defer, min(provider_asked_s, settings.ai.max_retry_defer_s))
    return defer


def validate_job_args(
    order_id: Any, brief: Any, regenerate: Any, unknown: dict[str, Any], extra_args: tuple[Any, ...]
) -> int:
    """Check the job's arguments as JSON gives them; the message names the argument to fix."""
    if extra_args:
        raise JobArgumentsInvalid(
            "generate_site takes (order_id, brief=None, regenerate=False); "
            f"got {len(extra_args)} extra positional argument(s)"
        )
    if unknown:
        raise JobArgumentsInvalid(
            f"unknown job argument(s): {', '.join(sorted(map(str, unknown)))} (expected order_id, brief, regenerate)"
        )
    if isinstance(order_id, bool) or not isinstance(order_id, int) or order_id <= 0:
        raise JobArgumentsInvalid(f"order_id must be a positive integer, got {order_id!r:.100}")
    if brief is not None and not isinstance(brief, dict):
        raise JobArgumentsInvalid(f"brief must be a JSON object or null, got {type(brief).__name__}")
    if not isinstance(regenerate, bool):
        raise JobArgumentsInvalid(f"regenerate must be true or false, got {regenerate!r:.100}")
    return order_id


def validate_brief(raw: dict[str, Any], max_bytes: int) -> Brief:
    size = len(json.dumps(raw, ensure_ascii=False).encode())
    if size > max_bytes:
        largest = max(raw, key=lambda k: len(json.dumps(raw[k], ensure_ascii=False)), default="?")
        raise BriefInvalid(
            f"brief is {size:,} bytes, over the limit of {max_bytes:,} (setting limits.max_brief_bytes); "
            f"largest field: brief.{largest}",
            field=f"brief.{largest}",
        )
    with_nul = _nul_fields(raw, "brief")
    if with_nul:  # PostgreSQL cannot store it, and no business writes one on purpose
        raise BriefInvalid(
            f"invalid brief: a NUL character (\\u0000) is not allowed; found in {', '.join(with_nul[:10])}",
            fields=with_nul[:10],
        )
    try:
        return Brief.model_validate(raw)
    except ValidationError as exc:
        problems = [
            f"brief.{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in exc.errors(include_url=False)[:10]
        ]
        raise BriefInvalid(
            "invalid brief: " + "; ".join(problems), fields=[p.split(":")[0] for p in problems]
        ) from None


def _nul_fields(value: Any, path: str) -> list[str]:
    """The paths (`brief.contact.address`, `brief.services.2`) of the keys and strings holding a NUL character."""
    if isinstance(value, str):
        return [path] if "\x00" in value else []
    found: list[str] = []
    if isinstance(value, dict):
        for key, item in value.items():
            name = str(key)
            if "\x00" in name:  # the key itself: named with its NUL written out
                found.append(f"{path}.{name.replace(chr(0), '<NUL>')}")
            else:
                found += _nul_fields(item, f"{path}.{name}")
    elif isinstance(value, list):
        for index, item in enumerate(value):
            found += _nul_fields(item, f"{path}.{index}")
    return found


def _usage_summary(by_phase: dict[str, Usage]) -> dict[str, Any]:
    total = sum(by_phase.values(), Usage())
    return {**total.as_dict(), "by_phase": {phase: u.as_dict() for phase, u in by_phase.items()}}


class GenerationRun:
    """One claimed generation being carried through its remaining phases."""

    def __init__(self, rt: Runtime, order_id: int, claim: Claim, *, job_try: int) -> None:
        self.rt = rt
        self.order_id = order_id
        self.claim = claim
        self.job_try = job_try
        self.outputs: dict[str, Any] = dict(claim.checkpoints)
        #: Phase outputs made (and validated and checked) by this run, so they are not validated again.
        self.made: dict[str, BaseModel] = {}
        #: What the code phase's check made of the code it accepted, for the assemble phase.
        self.ready: list[Publishable] = []
        self.usage = {phase: Usage.from_dict(u) for phase, u in claim.usage.items()}
        self.phase: str | None = None
        #: Whether `sitegen cancel` asked this generation to stop: read by the claim and by every
        #: phase commit, in the same statement, so checking it before a phase costs no query.
        self.cancel_requested = claim.cancel_requested
        #: The job's phases: a generation's, an edit's or a rollback's (store.PHASES_OF).
        self.phases = claim.phases
        #: What the progress log calls this run: "generation", "edit" or "rollback".
        self.what = claim.job
        #: An edit's or rollback's base: the version live when it started, with its files (read once).
        self._base: LiveSite | None = None
        #: Whether this run wrote its site to disk (the files of a version not committed yet).
        self.wrote_disk = False
        #: The version this run made, once committed.
        self.version: int | None = claim.version

    @property
    def finished(self) -> bool:
        """Whether the last phase's commit held: a cancel that lands after it has nothing to hand back."""
        return self.phases[-1] in self.outputs

    def event(self, name: str) -> str:
        """A lifecycle event's kind for this run: `phase.done` is `edit.phase.done` for an edit, and
        `generation.succeeded` is `edit.succeeded`."""
        if self.what == "generation":
            return name
        return f"{self.what}.{name.removeprefix('generation.')}"

    async def log(self, message: str, **kwargs: Any) -> None:
        kwargs.setdefault("phase", self.phase)
        await self.rt.progress.log(self.order_id, message, generation_id=self.claim.generation_id, **kwargs)

    async def ask(
        self, task: Task, inputs: dict[str, Any], schema: type[M], *, check: Callable[[M], None] | None = None
    ) -> tuple[M, Usage]:
        return await ask_model(
            self.rt.ai,
            task,
            inputs,
            schema,
            check=check,
            max_retries=self.rt.settings.ai.max_output_retries,
            notify=self._model_notice,
            before_call=partial(self.rt.heartbeat.check, self.claim),
        )

    async def _model_notice(self, message: str, **kwargs: Any) -> None:
        """A model call's progress. A retry is announced only while this replica may still hold the run
        (`Heartbeat.check_held`): a call that failed because the replica was stalled past its lease (its read
        timed out meanwhile) stops here, before its first row. Other notices (a wait for a provider's budget,
        a re-ask) are written as they come: on a loaded replica a beat can be late without the claim being
        lost, and stopping a run on every late beat would leave it to the sweeper."""
        if kwargs.get("event") == "model.retry":
            self.rt.heartbeat.check_held(self.claim, self.rt.settings.worker.lease_s)
        await self.log(message, **kwargs)

    def result(self, status: str) -> dict[str, Any]:
        manifest = self.outputs.get("assemble") or self.outputs.get("publish") or {}
        result = {
            "order_id": self.order_id,
            "generation_id": self.claim.generation_id,
            "status": status,
            "output_dir": str(self.rt.output_root / str(self.order_id)) if manifest else None,
            "pages": manifest.get("pages", []),
            "usage": _usage_summary(self.usage),
        }
        if self.what != "generation":
            result.update(kind=self.what, version=self.version)
        return result

    async def run(self) -> dict[str, Any]:
        brief = Brief.model_validate(self.claim.brief) if self.what == "generation" else None
        for phase in self.phases:
            if phase in self.outputs:
                continue
            self.phase = phase
            if self.cancel_requested:
                raise CancelRequested(f"cancelled before phase {phase}")
            if self.rt.draining.is_set():
                raise ShuttingDown(f"stopping before phase {phase}")
            started = time.monotonic()
            await self.log(f"phase {phase} started", event=self.event("phase.started"))
            with (
                self.rt.metrics.phase(phase),
                logger.contextualize(generation_id=self.claim.generation_id, phase=phase),
            ):
                output, usage = await self._run_phase(phase, brief, started)
            self.outputs[phase] = output
            await self._log_done(phase, started, usage)
        self.phase = None
        await self._log_succeeded()
        return self.result("succeeded")

    async def _log_succeeded(self) -> None:
        output_dir = self.result("succeeded")["output_dir"]
        extra = {"version": self.version} if self.version is not None else {}
        what = f"{self.what} succeeded"
        if self.what != "generation" and self.version is not None:
            what += f": version {self.version} is live"
        await self.log(what, event=self.event("generation.succeeded"), output_dir=output_dir, **extra)

    async def _run_phase(self, phase: str, brief: Brief | None, started: float) -> tuple[Any, Usage]:
        output: BaseModel
        if phase == "assemble" and self.what == "edit":
            return await self._assemble_edit(started), Usage()
        if phase == "publish":
            return await self._publish(started), Usage()
        if phase == "edit_plan":
            base = await self._base_site()
            output, usage = await make_edit_plan(
                self.request["instruction"],
                self._base_plan(base),
                {f.path: len(f.content) for f in base.files},
                self.request.get("pages"),
                self.ask,
            )
            if output.refuse:
                raise EditFailed(f"the model cannot carry out this edit: {output.refuse}", phase=phase)
            known = {p.slug for p in self._base_plan(base).pages} | {p.slug for p in output.add_pages}
            if unknown := [slug for slug in self.request.get("pages") or [] if slug not in known]:
                raise EditInvalid(
                    f"pages: the site has no page {', '.join(map(repr, unknown))} and the edit adds none of that "
                    f"name (its pages: {', '.join(sorted(known))})",
                    field="pages",
                )
        elif phase == "edit_files":
            base = await self._base_site()
            output, usage = await make_edited_files(
                self.request["instruction"],
                self._output("edit_plan", EditPlan),
                {f.path: f.content.decode() for f in base.files if f.path.endswith(EDITABLE_SUFFIXES)},
                self.ask,
                self.log,
            )
            if output.fallbacks:
                await self.log(
                    f"rewritten whole after their search/replace blocks failed: {', '.join(output.fallbacks)}",
                    level="warning",
                    event="edit.fallback",
                    paths=output.fallbacks,
                )
        elif brief is None:
            raise AssertionError(f"phase {phase} of a {self.what} has no brief")
        elif phase == "plan":
            output, usage = await make_plan(brief, self.ask)
        elif phase == "content":
            output, usage = await make_content(brief, self._plan(), self.ask)
        elif phase == "code":
            output, usage = await make_code(
                brief,
                self._plan(),
                self._output("content", SiteContent),
                self.ask,
                self.rt.settings.output.allowed_embed_hosts,
                self.ready,
            )
        else:
            return await self._assemble(started), Usage()
        self.made[phase] = output
        self.usage[phase] = usage
        dumped = output.model_dump(mode="json")
        self.cancel_requested = await self._durably(
            self.rt.store.commit_phase(
                self.claim,
                phase,
                dumped,
                usage=usage.as_dict(),
                total_usage=_usage_summary(self.usage),
                duration_ms=round((time.monotonic() - started) * 1000),
            ),
            phase,
            dumped,
            usage,
            started,
        )
        self._check_budget()
        return dumped, usage

    async def _durably(
        self, write: Awaitable[T], phase: str, dumped: dict[str, Any], usage: Usage, started: float
    ) -> T:
        """Await the phase's commit; one that a cancel lands on while PostgreSQL's answer is on its way is waited for.

        The commit may be durable already when the job is cancelled (the end of a shutdown's grace period, an
        abort). If it held, the phase's "done" row (and for the last phase, the generation's success) is
        written before the cancel goes on: the log never says that a committed phase did not end (issue 21
        soak, seed 621816: order 1084 resumed after a code phase whose end was never logged), and a finished
        generation is not handed back. The wait is bounded by the commit's own timeouts.
        """
        pending = asyncio.ensure_future(write)
        try:
            return await asyncio.shield(pending)
        except asyncio.CancelledError:
            await asyncio.wait([pending])
            if not pending.cancelled() and pending.exception() is None:
                self.outputs[phase] = dumped
                await self._log_done(phase, started, usage)
                if self.finished:
                    self.phase = None
                    await self._log_succeeded()
            raise

    async def _log_done(self, phase: str, started: float, usage: Usage) -> None:
        await self.log(
            f"phase {phase} done",
            event=self.event("phase.done"),
            duration_ms=round((time.monotonic() - started) * 1000),
            **usage.as_dict(),
        )

    def _check_budget(self) -> None:
        """Stop after a phase that took the generation over its token budget (its output is kept)."""
        budget = self.rt.settings.ai.max_tokens_per_generation
        used = sum(self.usage.values(), Usage()).tokens
        if budget and used > budget:
            raise TokenBudgetExceeded(
                f"the generation used {used:,} tokens, over its budget of {budget:,} "
                "(setting ai.max_tokens_per_generation)",
                used=used,
                budget=budget,
            )

    async def _assemble(self, started: float) -> dict[str, Any]:
        manifest, files = assemble_site(
            self.order_id,
            self.claim.generation_id,
            self._plan(),
            self._output("code", SiteCode),
            allowed_hosts=frozenset(self.rt.settings.output.allowed_embed_hosts),
            # Code made in this run was checked and sanitized by the code phase; a checkpoint is done here.
            publishable=self.ready[-1] if self.ready else None,
        )
        self.ready.clear()
        for warning in manifest.warnings:  # embeds removed from the pages, logged before the files are written
            await self.log(warning, level="warning", event="site.warning")
        # Disk first, then the commit: a crash in between leaves a site that the retry rewrites,
        # never a generation marked done without its files.
        target = await self.rt.writer.write(self.rt.output_root, self.order_id, files)
        self.wrote_disk = True
        self.usage["assemble"] = Usage()
        dumped = manifest.model_dump(mode="json")
        version = NewVersion("generation", files, plan=self.outputs["plan"], quality=manifest.quality)
        self.version = await self._durably(
            self.rt.store.finish_generation(
                self.claim,
                dumped,
                files,
                usage=Usage().as_dict(),
                total_usage=_usage_summary(self.usage),
                duration_ms=round((time.monotonic() - started) * 1000),
                output_dir=str(target),
                version=version,
            ),
            "assemble",
            dumped,
            Usage(),
            started,
        )
        return dumped

    @property
    def request(self) -> dict[str, Any]:
        return self.claim.request

    async def _base_site(self) -> LiveSite:
        """The version the edit or rollback started from: live when it started, and still live (an order's
        edits and rollbacks run one at a time)."""
        if self._base is None:
            base = await self.rt.store.live_site(self.order_id)
            expected = self.request.get("live_version")
            if base is None or (expected is not None and base.number != expected):
                raise EditFailed(
                    f"version {expected} of order {self.order_id} is no longer live "
                    f"(live: {base.number if base else 'none'}); the {self.what} was not applied",
                    phase=self.phase,
                )
            self._base = base
        return self._base

    def _base_plan(self, base: LiveSite) -> SitePlan:
        if base.plan is None:
            raise EditFailed(
                f"version {base.number} of order {self.order_id} has no stored site plan to edit against "
                "(regenerate the site to edit it)",
                phase=self.phase,
            )
        return SitePlan.model_validate(base.plan)

    async def _assemble_edit(self, started: float) -> dict[str, Any]:
        base = await self._base_site()
        edit = self._output("edit_plan", EditPlan)
        manifest, files, plan, changed = assemble_edit(
            self.order_id,
            self.claim.generation_id,
            {f.path: f.content for f in base.files},
            self._base_plan(base),
            edit,
            self._output("edit_files", EditedFiles),
            allowed_hosts=self.rt.settings.output.allowed_embed_hosts,
        )
        for warning in manifest.warnings:
            await self.log(warning, level="warning", event="site.warning")
        await self.log(
            f"changed {len(changed)} file(s) of version {base.number}: {', '.join(changed) or 'none'}",
            event="edit.changed",
            paths=changed,
        )
        version = NewVersion(
            "edit",
            files,
            plan=plan.model_dump(mode="json"),
            quality=manifest.quality,
            instruction=self.request["instruction"],
        )
        return await self._finish_version("assemble", manifest.model_dump(mode="json"), version, started)

    async def _publish(self, started: float) -> dict[str, Any]:
        """A rollback: the files of version `request.version`, published again as a new version."""
        number = int(self.request["version"])
        files = await self.rt.store.version_files(self.order_id, number)
        if not files:
            raise EditInvalid(f"order {self.order_id} has no version {number} (version)", field="version")
        old = next((f for f in files if f.path == "manifest.json"), None)
        pages = Manifest.model_validate_json(old.content).pages if old is not None else []
        checkpoint = {"rolled_back_to": number, "files": len(files), "pages": pages}
        version = NewVersion(
            "rollback",
            files,
            plan=await self.rt.store.version_plan(self.order_id, number),
            quality={},
            rolled_back_to=number,
        )
        return await self._finish_version("publish", checkpoint, version, started)

    async def _finish_version(
        self, phase: str, checkpoint: dict[str, Any], version: NewVersion, started: float
    ) -> dict[str, Any]:
        """Disk first, then the commit (as a generation's assemble): the site on disk is swapped whole, and a
        run that does not commit puts the live version back (see `restore_live`)."""
        target = await self.rt.writer.write(self.rt.output_root, self.order_id, version.files)
        self.wrote_disk = True
        self.usage[phase] = Usage()
        self.version = await self._durably(
            self.rt.store.finish_run(
                self.claim,
                phase,
                checkpoint,
                version,
                usage=Usage().as_dict(),
                total_usage=_usage_summary(self.usage),
                duration_ms=round((time.monotonic() - started) * 1000),
                output_dir=str(target),
            ),
            phase,
            checkpoint,
            Usage(),
            started,
        )
        return checkpoint

    async def restore_live(self) -> None:
        """Put the live version back on disk after this run wrote a version it did not commit."""
        if not self.wrote_disk or self.finished:
            return
        try:
            live = await self.rt.store.live_site(self.order_id)
            if live is not None:
                await self.rt.writer.write(self.rt.output_root, self.order_id, live.files)
                await self.log(
                    f"version {live.number} put back on disk: the {self.what} was not committed",
                    level="warning",
                    event="site.restored",
                )
        except Exception as exc:
            logger.opt(exception=exc).error(
                "order {}: could not put its live version back on disk: {}", self.order_id, message_of(exc)
            )

    def _plan(self) -> SitePlan:
        return self._output("plan", SitePlan)

    def _output(self, phase: str, model: type[M]) -> M:
        """A phase's output as its model: the one this run made, else its checkpoint, validated."""
        made = self.made.get(phase)
        return made if isinstance(made, model) else model.model_validate(self.outputs[phase])


class Heartbeat:
    """One heartbeat for every generation this replica runs: per beat, one UPDATE for all claims and one
    Redis round trip for all in-progress markers, so its cost does not grow with each job.

    The two renewals run in tasks of their own, each bounded by a timeout shorter than the lease, so
    neither store can hold up the other: Redis being away does not let the PostgreSQL leases lapse (a
    live replica would lose its claims), and a hung PostgreSQL call does not let the in-progress keys
    expire (another replica would start the same job). A claim PostgreSQL no longer confirms is marked
    lost; its generation stops at its next model call (`check`).
    """

    def __init__(self) -> None:
        self.running: dict[uuid.UUID, tuple[Claim, str | None]] = {}
        self.lost: set[uuid.UUID] = set()
        #: When PostgreSQL last extended each claim's lease, as far as this replica knows (monotonic; the
        #: start of the beat that did, or the claim itself).
        self.confirmed: dict[uuid.UUID, float] = {}

    def track(self, claim: Claim, job_id: str | None) -> None:
        assert claim.token is not None
        self.running[claim.token] = (claim, job_id)
        self.confirmed[claim.token] = time.monotonic()

    def forget(self, claim: Claim) -> None:
        if claim.token is not None:
            self.running.pop(claim.token, None)
            self.lost.discard(claim.token)
            self.confirmed.pop(claim.token, None)

    def check_held(self, claim: Claim, lease_s: float) -> None:
        """`check`, and raise ClaimLost too if no beat has confirmed the claim for longer than its lease: the
        replica was stalled (SIGSTOP, a frozen VM) or cut off from PostgreSQL, so another replica may run the
        generation now. For what a run writes about itself as it goes (a model call's retry), which the
        replica that owns it now would otherwise find beside its own rows."""
        self.check(claim)
        assert claim.token is not None
        age = time.monotonic() - self.confirmed.get(claim.token, time.monotonic())
        if age > lease_s:
            raise ClaimLost(
                f"generation {claim.generation_id}: its lease was last confirmed {age:.1f} s ago, longer than its "
                f"lease (worker.lease_s = {lease_s:g}): another replica may run it now"
            )

    def check(self, claim: Claim) -> None:
        """Raise ClaimLost if the heartbeat found this claim taken over (before a model call is made for it)."""
        if claim.token in self.lost:
            raise ClaimLost(
                f"generation {claim.generation_id} was taken over by another replica (its lease lapsed); "
                "stopped before the next model call"
            )

    async def run(self, rt: Runtime) -> None:
        """Renew the PostgreSQL leases and the cluster slots' leases in Redis every lease_s/4, independently."""
        every_s = rt.settings.worker.lease_s / 4
        async with asyncio.TaskGroup() as beats:
            beats.create_task(self._every(every_s, "PostgreSQL leases", self.renew_leases, rt))
            if rt.redis is not None:
                beats.create_task(self._every(every_s, "Redis slot leases", self.renew_markers, rt))

    async def _every(
        self, every_s: float, what: str, renew: Callable[[Runtime], Coroutine[Any, Any, None]], rt: Runtime
    ) -> None:
        # A renewal runs in a task of its own, awaited for `every_s` at most: one that hangs is reported in time
        # and no second one starts until it ends. Cancelling it would not end it sooner: asyncpg then waits for
        # its cancel request to reach PostgreSQL (up to `database.command_timeout_s`, as the query itself), and
        # an `asyncio.timeout` around it would wait that long too (issue 21 defect 3: a partition).
        pending: asyncio.Task[None] | None = None
        try:
            while True:
                await asyncio.sleep(every_s)
                if not self.running:
                    continue
                if pending is not None and pending.done():
                    pending.exception()  # a renewal given up on, ended since: reported already
                    pending = None
                pending = pending or asyncio.create_task(renew(rt), name=f"heartbeat: {what}")
                done, _ = await asyncio.wait({pending}, timeout=every_s)
                if not done:
                    why = f"no answer within {every_s:.1f}s"
                else:
                    exc, pending = pending.exception(), None
                    if exc is None:
                        continue
                    why = message_of(exc)  # each commit is fenced by its claim anyway; the next beat tries again
                logger.warning("heartbeat: could not renew the {} of {} generations: {}", what, len(self.running), why)
        finally:
            if pending is not None and not pending.done():
                pending.cancel()

    async def beat(self, rt: Runtime) -> None:
        """Both renewals once, independently (tests call this; the heartbeat task runs each on its own)."""
        await asyncio.gather(self.renew_leases(rt), self.renew_markers(rt), return_exceptions=True)

    async def renew_leases(self, rt: Runtime) -> None:
        running = dict(self.running)
        started = time.monotonic()
        held = await rt.store.heartbeat(list(running))
        for token in held:
            if token in self.confirmed:
                self.confirmed[token] = started
        for token in running.keys() - held:
            if token in self.running and token not in self.lost:
                self.lost.add(token)
                logger.warning("generation {}: claim taken over by another replica", running[token][0].generation_id)

    async def renew_markers(self, rt: Runtime) -> None:
        """Extend the leases of the cluster slots held for model calls (one pipeline). The jobs' own leases in
        Redis (in-progress keys, places in the queue) are renewed by `worker.polling`, from claim to end."""
        if rt.redis is None:
            return
        limits = rt.ai.limits
        if limits is not None and limits.held:
            async with rt.redis.pipeline(transaction=False) as pipe:
                await limits.renew(pipe)
                await pipe.execute()


async def run_generation(
    rt: Runtime,
    order_id: int,
    brief: dict[str, Any] | None,
    regenerate: bool,
    *,
    job_id: str | None,
    job_try: int,
    enqueued_at: datetime | None = None,
) -> dict[str, Any]:
    """Run (or resume, or skip) the generation of an order; see DESIGN.md for the contract.

    `enqueued_at` is when the job was first enqueued (arq keeps it across retries): a job enqueued
    before the order's generation was cancelled ends `cancelled` without work.
    """
    settings = rt.settings
    log = partial(rt.progress.log, order_id)
    try:
        valid = validate_brief(brief, settings.limits.max_brief_bytes) if brief is not None else None
        claim_args: dict[str, Any] = dict(
            regenerate=regenerate, job_id=job_id, enqueued_at=enqueued_at, max_attempts=settings.worker.max_attempts
        )
        stored_brief = valid.model_dump(mode="json") if valid else None
        try:
            claim = await rt.store.claim_generation(order_id, stored_brief, **claim_args)
        except OrderBusy as busy:
            # Held in this replica's own name: if no run of this process holds it, its run ended without
            # PostgreSQL taking the hand-back (a restart). Proven dead, it is taken over now, not in a lease.
            if busy.replica_id != settings.worker.replica or busy.generation_id is None:
                raise
            if not await rt.store.lapse_own_claim(busy.generation_id, rt.heartbeat.running.keys()):
                raise
            logger.info("order {}: took back generation {}, left claimed by this replica", order_id, busy.generation_id)
            claim = await rt.store.claim_generation(order_id, stored_brief, **claim_args)
    except InputError as exc:
        await _fail_before_start(rt, order_id, exc, job_id=job_id)
        raise
    except OrderBusy as exc:
        await log(f"waiting: {exc}", level="info", event="job.waiting")
        raise RetryLater(exc.retry_after_s + 1, exc) from exc
    except AttemptsExhausted as exc:  # the claim stored the failure on the generation
        logger.error("order {}: {}", order_id, exc)
        await log(
            f"generation failed: {exc}",
            level="error",
            event="generation.failed",
            generation_id=exc.details["generation_id"],
        )
        raise
    except Exception as exc:
        logger.opt(exception=exc).warning("order {}: could not claim a generation", order_id)
        await log(f"could not start: {type(exc).__name__}: {message_of(exc)}", level="warning", event="job.not_started")
        if is_infrastructure(exc):
            raise RetryLater(backoff_s(settings, job_try), exc) from exc
        if is_retryable(exc):
            tries = await _counted_attempts(rt, order_id, job_try)
            if tries < settings.worker.max_tries:
                raise RetryLater(backoff_s(settings, tries), exc) from exc
        raise

    run = GenerationRun(rt, order_id, claim, job_try=job_try)
    if claim.kind in ("cancelled", "ended"):
        return await _skipped(run)
    remaining = [p for p in PHASES if p not in claim.checkpoints]
    if claim.kind == "resumed" and not remaining:
        # Every phase committed means finished (the last commit stored the files): never run again.
        await _store_quietly(rt.store.settle_assembled(claim))
        return await _already_done(rt, run)
    if claim.kind == "done":
        return await _already_done(rt, run)
    for warning in claim.warnings:
        await run.log(warning, level="warning", event="claim.warning")
    return await _carry(run, job_id, job_try)


async def _skipped(run: GenerationRun) -> dict[str, Any]:
    claim = run.claim
    if claim.kind == "cancelled":
        await run.log(
            f"{run.what} was cancelled before this job could run: nothing to do", level="warning", event="job.skipped"
        )
        return run.result("cancelled")
    # This job outlived its run in Redis (its end could not be recorded), or was sent again.
    await run.log(
        f"{run.what} {claim.generation_id} already ended {claim.status}: this job has nothing left to do",
        level="warning" if claim.status != "succeeded" else "info",
        event="job.skipped",
    )
    return run.result(str(claim.status))


async def _carry(run: GenerationRun, job_id: str | None, job_try: int) -> dict[str, Any]:
    """Run a claimed generation, edit or rollback through its remaining phases, and decide what its end means."""
    rt, claim, order_id, settings = run.rt, run.claim, run.order_id, run.rt.settings
    remaining = [p for p in run.phases if p not in claim.checkpoints]
    if claim.kind == "resumed":
        await run.log(
            f"{run.what} resumed at phase {remaining[0]} (attempt {claim.attempt})",
            event=run.event("generation.resumed"),
            attempt=claim.attempt,
        )
    else:
        await run.log(
            f"{run.what} started (attempt {claim.attempt})"
            + (f": {_request_summary(run)}" if run.what != "generation" else ""),
            event=run.event("generation.started"),
            attempt=claim.attempt,
        )

    # The generation's own attempts decide its last try, not arq's count of this job's runs: a job that
    # waited for another replica's live claim, or was handed back by a draining replica, used no try.
    final_try = claim.counted_attempts >= settings.worker.max_tries
    rt.heartbeat.track(claim, job_id)
    try:
        return await run.run()
    except ShuttingDown:
        await _hand_back(run, f"replica {settings.worker.replica} is shutting down", spare=True)
        raise RetryLater(0.0, ShuttingDown("handed back for another replica")) from None
    except CancelRequested:
        await _cancel(run)
        return run.result("cancelled")
    except asyncio.CancelledError:
        # An abort from `sitegen cancel`, a shutdown past its grace period, or arq's job timeout.
        await asyncio.shield(_interrupted(run))
        raise
    except ClaimLost as exc:
        await run.log(f"stopped: {exc}", level="warning", event=run.event("generation.superseded"))
        return run.result("superseded")
    except BudgetWaitExceeded as exc:  # waiting for a provider's budget is not a failure: on any try
        logger.bind(generation_id=claim.generation_id, phase=run.phase).info("order {}: {}", order_id, exc)
        # Its backoff follows the generation's counted attempts, which budget waits do not raise: arq's count
        # of the job's runs grows with every wait, and would defer it minutes when the budget frees in seconds.
        defer = backoff_s(settings, claim.counted_attempts, provider_asked_s=exc.retry_after_s)
        released = await _store_quietly(
            rt.store.release_generation(claim, describe(exc, phase=run.phase), retry_in_s=defer, spare=True)
        )
        if released is not True:
            _not_handed_back(run, released, f"{exc.provider}'s budget")
            raise RetryLater(defer, exc) from exc
        await run.log(
            f"phase {run.phase} handed back after waiting for {exc.provider}'s budget; "
            f"will retry in {defer:.1f}s: {exc}",
            level="info",
            event="retry.scheduled",
            provider=exc.provider,
            budget=exc.budget,
            retry_in_s=round(defer, 1),
        )
        raise RetryLater(defer, exc) from exc
    except Exception as exc:
        error = describe(exc, phase=run.phase)
        logger.opt(exception=exc).bind(generation_id=claim.generation_id, phase=run.phase).error(
            "order {} generation {} phase {} failed", order_id, claim.generation_id, run.phase
        )
        # PostgreSQL or Redis out of reach is never the generation's fault: hand it back on any try, and spare
        # the attempt (backing off by the job's runs, which grow for as long as the outage lasts).
        infrastructure = is_infrastructure(exc)
        if infrastructure or (is_retryable(exc) and not final_try):
            asked = exc.retry_after_s if isinstance(exc, AIRateLimited) else None
            defer = backoff_s(settings, job_try if infrastructure else claim.counted_attempts, provider_asked_s=asked)
            released = await _store_quietly(
                rt.store.release_generation(claim, error, retry_in_s=defer, spare=infrastructure)
            )
            if released is not True:
                _not_handed_back(run, released, f"{error['type']}: {error['message']}")
                raise RetryLater(defer, exc) from exc
            await run.log(
                f"phase {run.phase} failed, will retry in {defer:.1f}s: {error['type']}: {error['message']}",
                level="warning",
                event="retry.scheduled",
                error=_short(error),
            )
            raise RetryLater(defer, exc) from exc
        await _store_quietly(rt.store.fail_generation(claim, error))
        await run.log(
            f"{run.what} failed: {error['type']}: {error['message']}"
            + (" (the live version is unchanged)" if run.what != "generation" else ""),
            level="error",
            event=run.event("generation.failed"),
            error=_short(error),
        )
        raise
    finally:
        rt.heartbeat.forget(claim)
        if run.what != "generation":
            await asyncio.shield(run.restore_live())


async def _counted_attempts(rt: Runtime, order_id: int, job_try: int) -> int:
    """The order's latest generation's counted attempts; arq's count of the job's runs if PostgreSQL cannot say."""
    try:
        return await rt.store.counted_attempts(order_id)
    except Exception as exc:
        logger.warning("order {}: could not read its attempts ({}); using the job's runs", order_id, message_of(exc))
        return job_try


def _short(error: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in error.items() if k != "traceback"}


async def _store_quietly(write: Any) -> Any:
    """Store a failure; if PostgreSQL cannot take it now, say so (the claim's lease ends it anyway). What the
    write returned, or None if it failed."""
    try:
        return await write
    except Exception as exc:
        logger.opt(exception=exc).error("could not store the generation's failure: {}", message_of(exc))
        return None


def _not_handed_back(run: GenerationRun, released: bool | None, why: str) -> None:
    """A hand-back PostgreSQL did not take: the claim was no longer this run's (`released` False: another
    replica took the run over) or PostgreSQL was out of reach (None: the lease lapses and another try takes
    it). Said in this replica's log only: the run's progress log belongs to whoever holds it now, and a row
    announcing a retry this replica will not make would stand among the new owner's (the chaos soak's
    single-owner check caught one, written once PostgreSQL was back)."""
    logger.bind(generation_id=run.claim.generation_id, phase=run.phase).warning(
        "order {}: phase {} stopped ({}); not handed back: {}",
        run.order_id,
        run.phase,
        why,
        "the claim was taken over" if released is False else "PostgreSQL did not take it",
    )


async def _cancel(run: GenerationRun) -> None:
    committed = [p for p in run.phases if p in run.outputs]
    await _store_quietly(run.rt.store.cancel_generation(run.claim, "cancelled on request", run.phase))
    await run.log(
        f"{run.what} cancelled at phase {run.phase}; committed phases kept: {', '.join(committed) or 'none'}",
        level="warning",
        event=run.event("generation.cancelled"),
    )


async def _interrupted(run: GenerationRun) -> None:
    if run.finished:  # its success is committed and logged; the job's next run finds it done
        return
    try:
        cancel = await run.rt.store.cancel_requested(run.claim)
    except Exception:
        cancel = False
    if cancel:
        await _cancel(run)
    else:
        # A shutdown past its grace period is not the generation's fault; an abort or arq's timeout is.
        await _hand_back(
            run, "interrupted (worker shutting down, job aborted or timed out)", spare=run.rt.draining.is_set()
        )


async def _hand_back(run: GenerationRun, reason: str, *, spare: bool) -> None:
    """Give the generation back for a later try; `spare`: not its fault (its attempt does not count)."""
    await _store_quietly(
        run.rt.store.release_generation(
            run.claim, {"type": "Interrupted", "message": reason, "phase": run.phase}, spare=spare
        )
    )
    await run.log(f"handed back at phase {run.phase}: {reason}", level="warning", event="handed_back")


async def _fail_before_start(rt: Runtime, order_id: int, exc: InputError, *, job_id: str | None) -> None:
    error = describe(exc)
    logger.opt(exception=exc).error("order {}: job rejected", order_id)
    generation_id = None
    if not isinstance(exc, OrderNotFound):
        try:
            generation_id = await rt.store.record_failed_start(order_id, error, job_id=job_id)
        except Exception as store_exc:
            logger.opt(exception=store_exc).error("could not store the rejected job's error")
    await rt.progress.log(
        order_id,
        f"job rejected: {error['message']}",
        generation_id=generation_id,
        level="error",
        event="job.rejected",
        error=_short(error),
    )


async def _already_done(rt: Runtime, run: GenerationRun) -> dict[str, Any]:
    """A re-sent job for a finished order: no new work; restore the files on disk if they went missing."""
    root = rt.output_root
    if not site_is_complete(root, run.order_id):
        files = await rt.store.load_files(run.claim.generation_id)
        await rt.writer.write(root, run.order_id, files)
        await run.log("site restored on disk from the stored files", level="warning", event="site.restored")
    Manifest.model_validate(run.outputs["assemble"])
    await run.log(
        "already generated: nothing to do (enqueue with regenerate=true for a new site)",
        event="generation.already_done",
    )
    return run.result("succeeded")


def _request_summary(run: GenerationRun) -> str:
    request = run.request
    if run.what == "rollback":
        return f"back to version {request.get('version')} (live: {request.get('live_version')})"
    return f"{request.get('instruction', '')[:200]!r} on version {request.get('live_version')}"


def validate_edit_args(
    kind: str, order_id: Any, args: dict[str, Any], unknown: dict[str, Any], extra_args: tuple[Any, ...]
) -> tuple[int, dict[str, Any]]:
    """Check an edit_site or rollback_site job's arguments as JSON gives them; the message names the argument."""
    signature = (
        "edit_site takes (order_id, instruction, base_version=None, pages=None)"
        if kind == "edit"
        else "rollback_site takes (order_id, version)"
    )
    if extra_args:
        raise JobArgumentsInvalid(f"{signature}; got {len(extra_args)} extra positional argument(s)")
    if unknown:
        raise JobArgumentsInvalid(f"unknown job argument(s): {', '.join(sorted(map(str, unknown)))} ({signature})")
    if isinstance(order_id, bool) or not isinstance(order_id, int) or order_id <= 0:
        raise JobArgumentsInvalid(f"order_id must be a positive integer, got {order_id!r:.100}", field="order_id")
    if kind == "rollback":
        version = args.get("version")
        if isinstance(version, bool) or not isinstance(version, int) or version <= 0:
            raise JobArgumentsInvalid(f"version must be a positive integer, got {version!r:.100}", field="version")
        return order_id, {"version": version}
    instruction, base, pages = args.get("instruction"), args.get("base_version"), args.get("pages")
    problem = edit_request_problem(instruction, base, pages)
    if problem is not None:
        raise JobArgumentsInvalid(": ".join(problem), field=problem[0])
    assert isinstance(instruction, str)
    return order_id, {"instruction": instruction.strip(), "base_version": base, "pages": pages}


async def run_edit(
    rt: Runtime,
    kind: str,
    order_id: int,
    request: dict[str, Any],
    *,
    job_id: str,
    job_try: int,
    enqueued_at: datetime | None = None,
) -> dict[str, Any]:
    """Run (or resume, or skip) an edit or rollback job of an order: it waits for the order's other runs and
    for the edits sent before it, then runs its phases like a generation (see README, "Versions and edits")."""
    settings = rt.settings
    log = partial(rt.progress.log, order_id)
    try:
        ahead = (
            await jobs_ahead(rt.redis, settings.worker.queue_name, order_id, job_id, enqueued_at)
            if rt.redis is not None
            else []
        )
        claim = await rt.store.claim_edit(
            order_id,
            kind,  # type: ignore[arg-type]
            request,
            job_id=job_id,
            enqueued_at=enqueued_at,
            max_attempts=settings.worker.max_attempts,
            ahead=ahead,
        )
    except (InputError, EditInvalid) as exc:
        error = describe(exc)
        logger.error("order {}: {} job rejected: {}", order_id, kind, exc)
        await log(
            f"{kind} rejected: {error['message']}",
            level="error",
            event=f"{kind}.failed",
            generation_id=exc.details.get("generation_id"),
            error=_short(error),
        )
        raise
    except OrderBusy as exc:
        await log(f"{kind} waiting: {exc}", level="info", event="job.waiting", generation_id=exc.generation_id)
        raise RetryLater(exc.retry_after_s, exc) from exc
    except AttemptsExhausted as exc:
        logger.error("order {}: {}", order_id, exc)
        await log(
            f"{kind} failed: {exc}", level="error", event=f"{kind}.failed", generation_id=exc.details["generation_id"]
        )
        raise
    except Exception as exc:
        logger.opt(exception=exc).warning("order {}: could not claim the {}", order_id, kind)
        await log(f"could not start: {type(exc).__name__}: {message_of(exc)}", level="warning", event="job.not_started")
        if is_infrastructure(exc) or is_retryable(exc):
            raise RetryLater(backoff_s(settings, job_try), exc) from exc
        raise
    run = GenerationRun(rt, order_id, claim, job_try=job_try)
    if claim.kind in ("cancelled", "ended"):
        return await _skipped(run)
    asked = request.get("base_version")
    live = claim.request.get("live_version")
    if claim.kind == "started" and asked is not None and asked != live:
        await run.log(
            f"base_version {asked} is no longer live: the edit is applied to the live version {live}",
            level="warning",
            event="edit.rebased",
        )
    return await _carry(run, job_id, job_try)
