"""Provider limits shared by every replica: requests and tokens per minute, cluster concurrency, 429 pauses.

Each is decided in Redis by one atomic Lua script, on Redis' own clock, so N replicas together
never exceed a limit whatever their number:

- requests and tokens per minute: GCRA (the generic cell rate algorithm). One key per budget
  holds its *theoretical arrival time* (TAT): the instant the budget is paid up to. A call may go
  when the TAT is not in the future; it pushes the TAT by its cost times the emission interval
  (60 s / limit). Requests therefore go out evenly spaced, at most `requests_per_minute` in any
  60 s window (and at most one in any 60 s / limit); a call's tokens are charged from an estimate
  before it is made and corrected from the reported usage after it (a minute may see one call's
  worth more than `tokens_per_minute`, which a provider's token bucket of a minute's capacity
  absorbs). A call that would have to wait books its place in the future at once (the TAT
  moves for it), so waiting callers never poll for rate budget and never herd.
- cluster concurrency: a ZSET of holders scored by the end of their lease (`worker.lease_s`,
  renewed by the heartbeat), so the slots of a SIGKILLed replica come back by themselves. A call takes
  its slot first and is charged for the rates only then (holding the slot while it waits for its
  booked time), so calls that waited for a slot while the provider stalled still go out at the rates.
- a call that failed (an error status, a timeout, a lost connection) gives its token estimate back; a
  correction for a call that used more than its estimate is charged from now when its budget's key
  has expired meanwhile.
- pause: after a 429, one key holds when the provider may be asked again (its Retry-After or
  rate-limit reset, clamped to `ai.max_retry_defer_s`); every replica checks it before every call.

Keys, per provider NAME (one hash tag, so a provider's keys share a slot):
`sitegen:limits:{NAME}:requests` and `:tokens` (a TAT in ms, expiring when it is past),
`:slots` (ZSET holder -> lease end in ms) and `:pause` (the pause's end in ms, expiring with it).

Redis cost (see `ProviderLimiter`): one EVALSHA per model call to acquire; one more after the call
only when it holds a cluster slot, must correct its token estimate, or was answered 429 (all three
in that one call); a call that waits for rate budget asks once more when its booked time comes
(for the pause and the slot); a call waiting for a cluster slot asks again with backoff (50 ms to
1 s). Slot leases are renewed in the heartbeat's existing pipeline. Every 30 s a replica counts
the live replicas' health keys (SCAN), for the fallback below.

If Redis does not answer (down, or slower than `REDIS_TIMEOUT_S`) or refuses (READONLY after a
failover, OOM, LOADING...: `worker.errors.redis_refusal`), each replica falls back to its share of
every limit (limit / the number of live replicas it last saw), enforced in memory, says so once in
its log, asks Redis again every `REDIS_RETRY_S`, and shares again as soon as Redis answers.
"""

from __future__ import annotations

import asyncio
import math
import random
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

import redis.exceptions
from loguru import logger
from redis.asyncio import Redis
from redis.asyncio.client import Pipeline

from worker.ai.base import clamp_wait_s, sleep_s
from worker.errors import (
    REDIS_ERRORS,
    BudgetWaitExceeded,
    message_of,
    redis_refusal,
    redis_trouble,
    redis_unavailable,
)

KEY_PREFIX = "sitegen:limits"
#: Longest one limiter call to Redis may take before this replica uses its local share instead.
REDIS_TIMEOUT_S = 2.0
#: While Redis is away, how often a call tries it again (the others use the local share meanwhile).
REDIS_RETRY_S = 5.0
#: How often the live replicas are counted from their health keys.
REPLICAS_EVERY_S = 30.0
#: A call waiting for a cluster slot asks again after this long, doubling up to the second value.
SLOT_POLL_S = (0.05, 1.0)
#: A wait at least this long is written to the progress log ("waiting for openai: ...").
NOTICE_S = 1.0
#: A provider without limits of its own is only checked for a pause (another replica's 429): after a
#: check that found none, calls go without asking Redis for this long. Another replica's 429 is seen
#: within it; asking on every call cost about 0.5 ms of CPU per site in bench/ (three calls a site).
PAUSE_RECHECK_S = 0.2
#: A pause without Retry-After or reset header lasts this long.
DEFAULT_PAUSE_S = 1.0

#: What Redis out of reach or refusing raises (`_unavailable` tells a refusal from our own mistake).
REDIS_DOWN = (*REDIS_ERRORS, OSError)


def _unavailable(exc: BaseException) -> bool:
    return isinstance(exc, OSError) or redis_unavailable(exc)


# KEYS: requests TAT, tokens TAT, slots ZSET, pause.
# ARGV: charge (1: charge the rates), ms per request (0: no limit), tokens, ms per token (0: no limit),
#       cluster max (0: no limit), holder, lease ms, longest wait ms the caller accepts for the rates.
# Returns {status, wait ms, charged, holders, requests backlog ms, tokens backlog ms, budget, now ms}; status is
# ok, paused, booked (charged for a time `wait` from now, and holding its cluster slot: come back then with
# charge 0), over (`budget`, requests or tokens, needs `wait`, more than the caller accepts: nothing charged)
# or concurrency (no slot free: nothing charged).
# The cluster slot comes first: a call is charged for the rates only once it holds a slot, so calls that
# waited for one (a provider that stalled) go out spaced by the rates, not all at once when it answers again.
# Fractions go back as strings: Lua numbers become integers on the way out.
ACQUIRE = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + tonumber(t[2]) / 1000
local function tat(key)
  return math.max(tonumber(redis.call('GET', key) or '0'), now)
end
local function ms(x) return string.format('%.3f', x) end
local req_ms, tokens, tok_ms = tonumber(ARGV[2]), tonumber(ARGV[3]), tonumber(ARGV[4])
local req_tat, tok_tat = now, now
if req_ms > 0 then req_tat = tat(KEYS[1]) end
if tok_ms > 0 then tok_tat = tat(KEYS[2]) end
local held, holding = 0, false
local max = tonumber(ARGV[5])
if max > 0 then
  redis.call('ZREMRANGEBYSCORE', KEYS[3], '-inf', now)
  held = redis.call('ZCARD', KEYS[3])
  holding = redis.call('ZSCORE', KEYS[3], ARGV[6]) ~= false
end
local paused = tonumber(redis.call('GET', KEYS[4]) or '0')
if paused > now then
  return {'paused', ms(paused - now), 0, held, ms(req_tat - now), ms(tok_tat - now), 'paused', ms(now)}
end
if max > 0 and not holding and held >= max then
  return {'concurrency', '0', 0, held, ms(req_tat - now), ms(tok_tat - now), 'concurrency', ms(now)}
end
local charged, wait, what = 0, 0, 'none'
if ARGV[1] == '1' then
  wait, what = math.max(req_tat, tok_tat) - now, 'requests'
  if tok_tat > req_tat then what = 'tokens' end
  if wait > tonumber(ARGV[8]) then
    return {'over', ms(wait), 0, held, ms(req_tat - now), ms(tok_tat - now), what, ms(now)}
  end
  if req_ms > 0 then
    req_tat = req_tat + req_ms
    redis.call('SET', KEYS[1], ms(req_tat), 'PX', math.ceil(req_tat - now) + 1000)
  end
  if tok_ms > 0 then
    tok_tat = tok_tat + tokens * tok_ms
    redis.call('SET', KEYS[2], ms(tok_tat), 'PX', math.ceil(tok_tat - now) + 1000)
  end
  charged = 1
end
if max > 0 then
  local lease = tonumber(ARGV[7])
  redis.call('ZADD', KEYS[3], now + lease, ARGV[6])
  redis.call('PEXPIRE', KEYS[3], lease * 2)
  if not holding then held = held + 1 end
end
if wait > 0 then
  return {'booked', ms(wait), 1, held, ms(req_tat - now), ms(tok_tat - now), what, ms(now)}
end
return {'ok', '0', charged, held, ms(req_tat - now), ms(tok_tat - now), 'none', ms(now)}
"""

# KEYS: slots ZSET, tokens TAT, pause. ARGV: holder ('' : none), token correction ms (+/-), pause ms (0: none).
# A positive correction is charged from the budget's TAT or now, whichever is later: the key of a budget paid
# up expires (1 s after its TAT), and a call can outlast that.
RELEASE = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + tonumber(t[2]) / 1000
if ARGV[1] ~= '' then redis.call('ZREM', KEYS[1], ARGV[1]) end
local d = tonumber(ARGV[2])
if d ~= 0 then
  local tat = tonumber(redis.call('GET', KEYS[2]) or '0')
  if d > 0 then tat = math.max(tat, now) end
  local new = math.max(tat + d, now)
  if new > now then
    redis.call('SET', KEYS[2], string.format('%.3f', new), 'PX', math.ceil(new - now) + 1000)
  else
    redis.call('DEL', KEYS[2])
  end
end
local p = tonumber(ARGV[3])
if p > 0 and now + p > tonumber(redis.call('GET', KEYS[3]) or '0') then
  redis.call('SET', KEYS[3], string.format('%.3f', now + p), 'PX', math.ceil(p))
end
return 1
"""

# KEYS: the slots ZSET of each holder, in order. ARGV: lease ms, then the holders.
RENEW = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + tonumber(t[2]) / 1000
local lease = tonumber(ARGV[1])
for i, key in ipairs(KEYS) do
  redis.call('ZADD', key, 'XX', now + lease, ARGV[i + 1])
  redis.call('PEXPIRE', key, lease * 2)
end
return #KEYS
"""


def keys(provider: str) -> dict[str, str]:
    base = f"{KEY_PREFIX}:{{{provider}}}"
    return {name: f"{base}:{name}" for name in ("requests", "tokens", "slots", "pause")}


#: A replica's limits recorded in `settings_key` count for this long after it last wrote them (every 30 s).
SETTINGS_MAX_AGE_S = 120.0


def settings_key(provider: str) -> str:
    """The hash of each live replica's limits for `provider`: replica id -> "<unix time> <limits>"."""
    return f"{KEY_PREFIX}:{{{provider}}}:settings"


def _describe(limits: Limits) -> str:
    return (
        f"requests_per_minute={limits.requests_per_minute}, tokens_per_minute={limits.tokens_per_minute}, "
        f"cluster_max_concurrency={limits.cluster_max_concurrency}"
    )


class BudgetObserver(Protocol):
    """Hears how long each call waited for its budget (the worker's metrics)."""

    def budget_wait(self, *, provider: str, budget: str, seconds: float, granted: bool) -> None: ...


@dataclass(frozen=True)
class Limits:
    """A provider's shared limits (None: no limit of that kind)."""

    requests_per_minute: int | None = None
    tokens_per_minute: int | None = None
    cluster_max_concurrency: int | None = None


@dataclass
class Answer:
    """What the acquire script (or its local twin) said; `budget` is what the call waits for."""

    status: str
    wait_s: float
    charged: bool
    holders: int
    requests_backlog_s: float
    tokens_backlog_s: float
    budget: str
    local: bool = False
    #: When the answer was given, in ms on the limiter's clock (Redis' TIME; monotonic for the local share).
    now_ms: float = 0.0
    at: float = field(default_factory=time.monotonic)


@dataclass
class Budget:
    """The budget one call holds: release it after the call (`ProviderLimiter.release`)."""

    tokens: int
    holder: str | None
    local: bool
    waited_s: float
    #: The instant its rate budget was booked for, in ms on the limiter's clock (Redis' TIME; monotonic for the
    #: local share): these are spaced by the limits exactly; the call itself goes at that instant or later.
    booked_ms: float = 0.0


class _LocalBudget:
    """The acquire script's rules in memory, for one replica's share while Redis is away (monotonic ms)."""

    def __init__(self) -> None:
        self.requests_tat = 0.0
        self.tokens_tat = 0.0
        self.paused_until = 0.0
        self.holders: set[str] = set()

    def acquire(
        self,
        limits: Limits,
        share: int,
        *,
        charge: bool,
        tokens: int,
        holder: str,
        max_wait_ms: float,
        slots: int | None = None,
    ) -> Answer:
        """`share`: the replicas the rates are divided by; `slots`: this replica's calls at once (None: the
        cluster's limit divided by `share`, at least one)."""
        now = time.monotonic() * 1000
        req_ms = 60_000 * share / limits.requests_per_minute if limits.requests_per_minute else 0
        tok_ms = 60_000 * share / limits.tokens_per_minute if limits.tokens_per_minute else 0
        req_tat = max(self.requests_tat, now) if req_ms else now
        tok_tat = max(self.tokens_tat, now) if tok_ms else now
        most: int | None = None  # calls at once: None, no limit; 0, none while Redis is away (see slot_share)
        if limits.cluster_max_concurrency:
            most = slots if slots is not None else max(limits.cluster_max_concurrency // share, 1)
        held = len(self.holders)

        def answer(status: str, wait_ms: float, charged: bool, budget: str) -> Answer:
            return Answer(
                status, wait_ms / 1000, charged, held, (req_tat - now) / 1000, (tok_tat - now) / 1000, budget, True, now
            )

        if self.paused_until > now:
            return answer("paused", self.paused_until - now, False, "paused")
        holding = holder in self.holders
        if most is not None and not holding and held >= most:
            return answer("concurrency", 0, False, "concurrency")
        charged, wait, what = False, 0.0, "none"
        if charge:
            wait = max(req_tat, tok_tat) - now
            what = "tokens" if tok_tat > req_tat else "requests"
            if wait > max_wait_ms:
                return answer("over", wait, False, what)
            if req_ms:
                req_tat = self.requests_tat = req_tat + req_ms
            if tok_ms:
                tok_tat = self.tokens_tat = tok_tat + tokens * tok_ms
            charged = True
        if most is not None and not holding:
            self.holders.add(holder)
            held += 1
        if wait > 0:
            return answer("booked", wait, True, what)
        return answer("ok", 0, charged, "none")

    def release(self, limits: Limits, share: int, holder: str | None, token_delta: int, pause_s: float) -> None:
        now = time.monotonic() * 1000
        if holder is not None:
            self.holders.discard(holder)
        if token_delta and limits.tokens_per_minute:
            tat = max(self.tokens_tat, now) if token_delta > 0 else self.tokens_tat  # as RELEASE does
            self.tokens_tat = max(tat + token_delta * 60_000 * share / limits.tokens_per_minute, now)
        if pause_s > 0:
            self.paused_until = max(self.paused_until, now + pause_s * 1000)


class SharedLimits:
    """What every provider's limiter shares: the Redis connection, whether Redis answers, and how many
    replicas are alive (counted from their health keys `{queue}:health-check:*`) for the local shares."""

    def __init__(
        self,
        redis: Redis | None,
        *,
        queue_name: str = "site_generation",
        replica: str = "",
        lease_s: float = 8.0,
        max_pause_s: float = 300.0,
    ) -> None:
        self.redis = redis
        self.health_pattern = f"{queue_name}:health-check:*"
        self.replica = replica
        self.lease_ms = int(lease_s * 1000)
        self.max_pause_s = max_pause_s
        #: Live replicas last seen in the health keys (the local share of a limit is limit / this), and this
        #: replica's place among them by id (None: its own key was not among them).
        self.replicas = 1
        self.rank: int | None = None
        self.degraded = redis is None
        self.limiters: dict[str, ProviderLimiter] = {}
        #: Cluster slots held by this replica's calls: holder -> slots key (renewed by the heartbeat).
        self.held: dict[str, str] = {}
        self._retry_at = 0.0
        self._counted_at = -math.inf
        self._counting: asyncio.Task[int] | None = None
        #: Disagreements on limits already logged (see `compare_limits`).
        self._warned: set[str] = set()
        if redis is not None:
            self._acquire = redis.register_script(ACQUIRE)
            self._release = redis.register_script(RELEASE)
            self._renew = redis.register_script(RENEW)

    def provider(self, name: str, limits: Limits) -> ProviderLimiter:
        limiter = ProviderLimiter(self, name, limits)
        self.limiters[name] = limiter
        return limiter

    # -- Redis, or the local share

    def use_redis(self) -> bool:
        return self.redis is not None and (not self.degraded or time.monotonic() >= self._retry_at)

    def went_away(self, exc: BaseException) -> None:
        self._retry_at = time.monotonic() + REDIS_RETRY_S
        if not self.degraded:
            self.degraded = True
            shares = "; ".join(limiter.describe_share() for limiter in self.limiters.values() if limiter.limited)
            logger.warning(
                "provider limits: Redis {}: this replica keeps to its share of each limit, "
                "1/{} for the {} live replica(s) it last saw{}",
                redis_trouble(exc)
                if redis_refusal(exc) is not None
                else f"does not answer ({message_of(exc)})"
                if not isinstance(exc, TimeoutError)
                else f"does not answer (no answer within {REDIS_TIMEOUT_S:g}s)",
                self.replicas,
                self.replicas,
                f" ({shares})" if shares else "",
            )

    def came_back(self) -> None:
        if self.degraded and self.redis is not None:
            self.degraded = False
            logger.info("provider limits: Redis answers again; limits are shared by every replica again")
        if time.monotonic() - self._counted_at >= REPLICAS_EVERY_S and (
            self._counting is None or self._counting.done()
        ):
            self._counted_at = time.monotonic()
            self._counting = asyncio.create_task(self.count_replicas())

    async def count_replicas(self) -> int:
        """Count the live replicas' health keys (SCAN: cost grows with the keyspace; run every 30 s)."""
        if self.redis is None:
            return self.replicas
        try:
            async with asyncio.timeout(REDIS_TIMEOUT_S * 5):
                found = {key async for key in self.redis.scan_iter(match=self.health_pattern, count=1000)}
        except REDIS_DOWN as exc:
            if not _unavailable(exc):
                raise
            return self.replicas  # the acquire that finds Redis away says so
        self.replicas = max(len(found), 1)
        names = sorted(k.decode() if isinstance(k, bytes) else str(k) for k in found)
        own = self.health_pattern[:-1] + self.replica
        self.rank = names.index(own) if own in names else None
        try:
            async with asyncio.timeout(REDIS_TIMEOUT_S * 5):
                await self.compare_limits()
        except REDIS_DOWN as exc:
            if not _unavailable(exc):
                raise
        return self.replicas

    async def compare_limits(self) -> dict[str, dict[str, str]]:
        """Record this replica's limits of each provider in Redis (`settings_key`) and read the other live
        replicas'; a provider whose replicas disagree is logged once per disagreement, with each replica's
        values. Replicas with different limits share one budget whose every call is charged by the
        caller's own limits, so the most permissive replica sets the cluster's limit (docs/runbook.md).
        Returns provider -> replica -> its limits, for the providers that disagree."""
        if self.redis is None or not self.replica:
            return {}
        limited = [limiter for limiter in self.limiters.values() if limiter.limited]
        now = time.time()
        async with self.redis.pipeline(transaction=False) as pipe:
            for limiter in limited:
                key = settings_key(limiter.name)
                pipe.hset(key, self.replica, f"{now:.0f} {_describe(limiter.limits)}")
                pipe.expire(key, int(SETTINGS_MAX_AGE_S * 2))
                pipe.hgetall(key)
            answers = await pipe.execute()
        differing: dict[str, dict[str, str]] = {}
        for limiter, seen in zip(limited, answers[2::3], strict=True):
            fresh = {}
            for replica, value in seen.items():
                stamp, _, described = (value.decode() if isinstance(value, bytes) else str(value)).partition(" ")
                if stamp.isdigit() and now - int(stamp) <= SETTINGS_MAX_AGE_S:
                    fresh[replica.decode() if isinstance(replica, bytes) else str(replica)] = described
            if len(set(fresh.values())) > 1:
                differing[limiter.name] = dict(sorted(fresh.items()))
        for name, by_replica in differing.items():
            signature = f"{name}:{sorted(by_replica.items())}"
            if signature not in self._warned:
                self._warned.add(signature)
                logger.warning(
                    "provider limits: the replicas do not agree on provider {!r}'s limits ({}); every call is "
                    "charged by its own replica's limits, so the most permissive one sets the cluster's: give "
                    "every replica the same ai.providers.{}.* settings",
                    name,
                    "; ".join(f"{replica}: {described}" for replica, described in by_replica.items()),
                    name,
                )
        return differing

    def slot_share(self, cluster_max: int) -> int:
        """This replica's share of `cluster_max` calls at once while Redis is away: the slots dealt round the
        live replicas in the order of their ids, so together they never hold more than `cluster_max` (with
        more replicas than slots, some get none: their calls wait, and hand back after the longest wait)."""
        n = self.replicas
        if n <= 1:
            return cluster_max
        rank = self.rank if self.rank is not None else n - 1  # not seen yet: as the last
        return len(range(rank, cluster_max, n))

    async def renew(self, pipe: Pipeline | None = None) -> None:
        """Extend the lease of every cluster slot this replica holds: one EVALSHA, in `pipe` when given
        (the heartbeat's pipeline), else on its own."""
        if self.redis is None or not self.held:
            return
        holders = list(self.held.items())
        slot_keys = [key for _, key in holders]
        args: list[Any] = [self.lease_ms, *(holder for holder, _ in holders)]
        if pipe is not None:
            await self._renew(keys=slot_keys, args=args, client=pipe)
            return
        async with asyncio.timeout(REDIS_TIMEOUT_S):
            await self._renew(keys=slot_keys, args=args)

    async def aclose(self) -> None:
        if self._counting is not None:
            self._counting.cancel()
            await asyncio.gather(self._counting, return_exceptions=True)


OnWait = Callable[[str, float], Awaitable[None]]


class ProviderLimiter:
    """One provider's shared limits.

    Redis cost of one call: `acquire` is one EVALSHA when the budget is free; a call that must wait
    for rate budget books its time in that same EVALSHA and asks once more at that time (for a pause
    or a slot taken meanwhile); waiting for a cluster slot asks again every 50 ms to 1 s; waiting for a
    pause asks again once it ends. `release` is one EVALSHA, and only when there is something to
    release: a cluster slot, a token estimate to correct, or a pause to set after a 429. A provider
    without limits of its own asks only whether it is paused, at most every PAUSE_RECHECK_S.
    """

    def __init__(self, shared: SharedLimits, name: str, limits: Limits) -> None:
        self.shared = shared
        self.name = name
        self.limits = limits
        self.keys = keys(name)
        self._key_list = [self.keys[k] for k in ("requests", "tokens", "slots", "pause")]
        self._local = _LocalBudget()
        self.observer: BudgetObserver | None = None
        #: Calls waiting for budget now, and what the last answer said (read by the metrics).
        self.waiting = 0
        self.last: Answer | None = None
        self.pauses = 0
        #: Without limits of its own: until when (monotonic) a pause check that found none holds.
        self._unpaused_until = 0.0

    @property
    def limited(self) -> bool:
        return any(
            (self.limits.requests_per_minute, self.limits.tokens_per_minute, self.limits.cluster_max_concurrency)
        )

    def describe_share(self) -> str:
        n = self.shared.replicas
        parts = []
        if self.limits.requests_per_minute:
            parts.append(f"{self.limits.requests_per_minute / n:g} requests/min")
        if self.limits.tokens_per_minute:
            parts.append(f"{self.limits.tokens_per_minute / n:g} tokens/min")
        if self.limits.cluster_max_concurrency:
            parts.append(f"{self.shared.slot_share(self.limits.cluster_max_concurrency)} calls at once")
        return f"{self.name}: {', '.join(parts)}"

    def what(self, budget: str) -> str:
        """The budget a call waits for, in words ("60 requests/min budget")."""
        if budget == "requests":
            return f"{self.limits.requests_per_minute} requests/min budget"
        if budget == "tokens":
            return f"{self.limits.tokens_per_minute:,} tokens/min budget"
        if budget == "concurrency":
            return f"{self.limits.cluster_max_concurrency} calls at once across the cluster"
        return "paused for every replica after a 429"

    async def _ask(self, *, charge: bool, tokens: int, holder: str, max_wait_s: float) -> Answer:
        lim = self.limits
        if self.shared.use_redis():
            try:
                async with asyncio.timeout(REDIS_TIMEOUT_S):
                    raw = await self.shared._acquire(
                        keys=self._key_list,
                        args=[
                            1 if charge else 0,
                            60_000 / lim.requests_per_minute if lim.requests_per_minute else 0,
                            tokens,
                            60_000 / lim.tokens_per_minute if lim.tokens_per_minute else 0,
                            lim.cluster_max_concurrency or 0,
                            holder,
                            self.shared.lease_ms,
                            min(max(max_wait_s, 0), 86_400) * 1000,  # a day: "no bound" for Lua
                        ],
                    )
            except REDIS_DOWN as exc:
                if not _unavailable(exc):
                    raise
                self.shared.went_away(exc)
            else:
                self.shared.came_back()
                status, wait, charged, held, req, tok, budget, now = (
                    x.decode() if isinstance(x, bytes) else x for x in raw
                )
                return Answer(
                    str(status),
                    clamp_wait_s(float(wait) / 1000) or 0.0,
                    bool(int(charged)),
                    int(held),
                    float(req) / 1000,
                    float(tok) / 1000,
                    str(budget),
                    now_ms=float(now),
                )
        return self._local.acquire(
            lim,
            self.shared.replicas,
            charge=charge,
            tokens=tokens,
            holder=holder,
            max_wait_ms=max_wait_s * 1000,
            slots=self.shared.slot_share(lim.cluster_max_concurrency) if lim.cluster_max_concurrency else None,
        )

    async def acquire(self, tokens: int, *, max_wait_s: float, on_wait: OnWait | None = None) -> Budget:
        """Wait (at most `max_wait_s`) until the provider may be called with about `tokens` tokens; the budget
        is held until `release`. BudgetWaitExceeded, at once, when it would take longer."""
        started = time.monotonic()
        if started < self._unpaused_until:  # no limits, and no pause PAUSE_RECHECK_S ago
            return Budget(tokens, None, False, 0.0)
        holder = f"{self.shared.replica}:{uuid.uuid4().hex[:16]}"
        slot = holder if self.limits.cluster_max_concurrency else None
        #: The cluster slot this call took while it waits for its booked time (None: none yet), and where.
        taken: Answer | None = None
        charge = True
        told = False
        budget = "none"
        poll_s = SLOT_POLL_S[0]
        booked_ms = 0.0
        self.waiting += 1
        try:
            while True:
                left = max_wait_s - (time.monotonic() - started)
                answer = await self._ask(charge=charge, tokens=tokens, holder=holder, max_wait_s=left)
                self.last = answer
                if answer.charged:
                    booked_ms = answer.now_ms + (answer.wait_s * 1000 if answer.status == "booked" else 0)
                charge = charge and not answer.charged
                if slot is not None and answer.status in ("ok", "booked"):
                    taken = answer
                    if not answer.local:  # renewed by the heartbeat from now on, while it waits too
                        self.shared.held[slot] = self.keys["slots"]
                if answer.status == "ok":
                    if not self.limited and not answer.local:
                        self._unpaused_until = time.monotonic() + PAUSE_RECHECK_S
                    waited = time.monotonic() - started
                    self._observe(budget, waited, granted=True)
                    taken = None  # the caller's to release now
                    return Budget(tokens, slot, answer.local, waited, booked_ms)
                budget = answer.budget
                wait = expected = answer.wait_s
                if answer.status == "concurrency":
                    wait = expected = poll_s * random.uniform(0.5, 1.0)
                    poll_s = min(poll_s * 2, SLOT_POLL_S[1])
                elif answer.status == "paused":
                    # Book again after the pause (the rates pace the calls from there), woken at slightly
                    # different times: calls booked before it must not all go the moment it ends.
                    charge = True
                    wait += random.uniform(0, min(1.0, wait / 10))
                waited = time.monotonic() - started
                # A slot may free up any moment: ask until the time is up. The other waits are known in advance.
                if left <= 0 or (answer.status != "concurrency" and expected > left + 1e-3):
                    if not told and on_wait is not None:  # the progress log says what it waited for, always
                        await on_wait(budget, expected)
                    self._observe(budget, waited, granted=False)
                    raise BudgetWaitExceeded(
                        f"{self.name}: no budget after {waited:.1f}s of waiting for its {self.what(budget)} ("
                        + (f"{expected:.1f}s more needed" if answer.status != "concurrency" else "no slot came free")
                        + f"); the longest wait allowed is {max_wait_s:g}s",
                        provider=self.name,
                        task="",
                        retry_after_s=expected if answer.status != "concurrency" else 0.0,
                        budget=budget,
                    )
                if not told and on_wait is not None and max(expected, waited) >= NOTICE_S:
                    told = True
                    await on_wait(budget, expected)
                await sleep_s(min(wait, max(left, 0)), what=f"provider {self.name}: the wait for its budget")
        finally:
            self.waiting -= 1
            if taken is not None:  # refused or cancelled while it held a slot: give the slot back
                await self.release(Budget(0, slot, taken.local, 0.0))

    def _observe(self, budget: str, seconds: float, *, granted: bool) -> None:
        if self.observer is not None:
            self.observer.budget_wait(provider=self.name, budget=budget, seconds=seconds, granted=granted)

    async def release(
        self,
        budget: Budget | None,
        *,
        used_tokens: int | None = None,
        pause_s: float | None = None,
        failed: bool = False,
    ) -> None:
        """Give back the call's cluster slot, correct its token estimate from `used_tokens` (a call that
        `failed`, answered with an error or none, gives all of it back), and pause the provider for every
        replica for `pause_s` (a 429; clamped to `ai.max_retry_defer_s`). One EVALSHA at most, none when
        there is nothing to do; never raises (a slot left behind ends with its lease)."""
        holder = budget.holder if budget is not None else None
        if holder is not None:
            self.shared.held.pop(holder, None)  # no longer renewed, whatever happens below
        delta = 0
        if budget is not None and self.limits.tokens_per_minute:
            if failed:
                delta = -budget.tokens
            elif used_tokens:
                delta = used_tokens - budget.tokens
        pause = min(clamp_wait_s(pause_s or 0.0) or 0.0, self.shared.max_pause_s)
        if pause > 0:
            self.pauses += 1
            self._unpaused_until = 0.0  # a 429 here: the next call asks (and waits for the pause)
        n = self.shared.replicas
        if budget is None or budget.local:
            self._local.release(self.limits, n, holder, delta, pause)
            holder, delta = None, 0
        elif pause:  # also here: it holds should Redis be away for the next call
            self._local.release(self.limits, n, None, 0, pause)
        if not (holder or delta or pause) or not self.shared.use_redis():
            return
        tok_ms = 60_000 / self.limits.tokens_per_minute if self.limits.tokens_per_minute else 0
        try:
            async with asyncio.timeout(REDIS_TIMEOUT_S):
                await self.shared._release(
                    keys=[self.keys["slots"], self.keys["tokens"], self.keys["pause"]],
                    args=[holder or "", delta * tok_ms, pause * 1000],
                )
        except (*REDIS_DOWN, redis.exceptions.RedisError) as exc:
            if _unavailable(exc):
                self.shared.went_away(exc)
            else:
                logger.warning("provider limits: could not release {}'s budget: {}", self.name, message_of(exc))

    def paused_s(self) -> float:
        """The pause left as last seen (0: none)."""
        last = self.last
        if last is None or last.status != "paused":
            return 0.0
        return max(last.wait_s - (time.monotonic() - last.at), 0.0)


@dataclass(frozen=True)
class BudgetState:
    """A provider's shared budget as Redis holds it now (`sitegen status`)."""

    requests_backlog_s: float
    tokens_backlog_s: float
    calls_in_flight: int
    paused_s: float


async def read_budget(redis: Redis, provider: str) -> BudgetState:
    """One round trip (a pipeline of five reads); the backlogs are how far ahead each budget is booked."""
    k = keys(provider)
    async with redis.pipeline(transaction=False) as pipe:
        pipe.time()
        pipe.get(k["requests"])
        pipe.get(k["tokens"])
        pipe.get(k["pause"])
        pipe.zrangebyscore(k["slots"], "-inf", "+inf", withscores=True)
        (seconds, micros), requests, tokens, pause, slots = await pipe.execute()
    now = seconds * 1000 + micros / 1000

    def ahead(value: Any) -> float:
        return max(float(value) - now, 0.0) / 1000 if value else 0.0

    return BudgetState(ahead(requests), ahead(tokens), sum(1 for _, end in slots if end > now), ahead(pause))
