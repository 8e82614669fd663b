-- Every SQL statement of the worker, by name. Loaded once by worker/store.py.

-- name: lock_order
-- Serialises claims of one order across replicas until the transaction ends.
SELECT pg_advisory_xact_lock($1::bigint);

-- name: claim
-- Start, resume or skip a generation of the order, in one round trip: see migrations/0005_claim_rechecks.sql.
SELECT sitegen_claim($1, $2, $3, $4, $5, $6, $7, $8, $9);

-- name: ensure_order
INSERT INTO site_orders (id) VALUES ($1) ON CONFLICT (id) DO NOTHING;

-- name: latest_generation
SELECT id, order_id, status, current_phase, attempt, error, output_dir, usage, brief,
       claim_token, replica_id, lease_expires_at,
       GREATEST(EXTRACT(EPOCH FROM lease_expires_at - now()), 0)::float8 AS lease_left_s
FROM site_generations WHERE order_id = $1 ORDER BY id DESC LIMIT 1;

-- name: counted_attempts
-- The attempts of the order's latest generation that count towards worker.max_tries (not the spared ones).
SELECT attempt - spared_attempts FROM site_generations WHERE order_id = $1 ORDER BY id DESC LIMIT 1;

-- name: running_claim
SELECT claim_token FROM site_generations WHERE id = $1 AND status = 'running' AND replica_id = $2;

-- name: lapse_claim
-- Ends the lease of a claim its own replica proved dead (issued by this process, held by no run of it).
UPDATE site_generations SET lease_expires_at = now()
WHERE id = $1 AND claim_token = $2 AND status = 'running' AND lease_expires_at > now()
RETURNING id;

-- name: record_failed_generation
-- A job that failed before it could start a generation (bad brief): the error still lands on the order.
INSERT INTO site_generations (order_id, status, attempt, error, job_id, replica_id, started_at, finished_at)
VALUES ($1, 'failed', 1, $2, $3, $4, now(), now())
RETURNING id;

-- name: commit_phase
-- One statement, so one round trip and atomic without a transaction block: advance the generation
-- (fenced by the claim: a replica whose claim was taken over changes nothing and gets no row) and
-- store the phase's checkpoint. Returns whether a cancel was requested, read in the same step.
WITH advanced AS (
    UPDATE site_generations
    SET current_phase = $3, usage = $4, heartbeat_at = now(), lease_expires_at = now() + make_interval(secs => $5)
    WHERE id = $1 AND claim_token = $2 AND status = 'running'
    RETURNING id, cancel_requested_at IS NOT NULL AS cancel_requested
), phase AS (
    INSERT INTO site_generation_phases (generation_id, phase, output, usage, duration_ms)
    SELECT id, $6, $7, $8, $9 FROM advanced
)
SELECT cancel_requested FROM advanced;

-- name: finish_generation
-- The last phase in one statement: the generation's success (fenced by the claim), the manifest
-- and every file, all or nothing. No row back means the claim was lost and nothing was written.
WITH finished AS (
    UPDATE site_generations
    SET status = 'succeeded', current_phase = NULL, usage = $3, output_dir = $4, finished_at = now(),
        claim_token = NULL, lease_expires_at = NULL, heartbeat_at = now()
    WHERE id = $1 AND claim_token = $2 AND status = 'running'
    RETURNING id
), phase AS (
    INSERT INTO site_generation_phases (generation_id, phase, output, usage, duration_ms)
    SELECT id, 'assemble', $5, $6, $7 FROM finished
), files AS (
    INSERT INTO site_files (generation_id, path, content, sha256, bytes, media_type)
    SELECT finished.id, f.path, f.content, f.sha256, f.bytes, f.media_type
    FROM finished, unnest($8::text[], $9::bytea[], $10::text[], $11::int[], $12::text[])
         AS f (path, content, sha256, bytes, media_type)
)
SELECT id FROM finished;

-- name: fail_generation
UPDATE site_generations
SET status = 'failed', error = $3, finished_at = now(), claim_token = NULL, lease_expires_at = NULL
WHERE id = $1 AND claim_token = $2 AND status = 'running';

-- name: release_generation
-- Hands a generation back for a later try, due in $4 seconds: its committed phases stay, the claim goes.
-- $5: the hand-back was not the generation's fault, so this attempt does not count (worker.max_attempts).
UPDATE site_generations
SET status = 'queued', error = $3, claim_token = NULL, lease_expires_at = NULL,
    retry_at = now() + make_interval(secs => $4),
    spared_attempts = spared_attempts + CASE WHEN $5::boolean THEN 1 ELSE 0 END
WHERE id = $1 AND claim_token = $2 AND status = 'running';

-- name: settle_assembled
-- A claim of a generation whose every phase is committed (a claim function older than 0005 could
-- reopen one): it is finished, so it is marked so.
UPDATE site_generations g
SET status = 'succeeded', current_phase = NULL, claim_token = NULL, lease_expires_at = NULL, error = NULL,
    finished_at = now()
WHERE g.id = $1 AND g.claim_token = $2 AND g.status = 'running'
  AND EXISTS (SELECT 1 FROM site_generation_phases p WHERE p.generation_id = g.id AND p.phase = 'assemble');

-- name: heartbeat
-- Every claim a replica holds, extended in one statement; the claims it returns are still ours.
UPDATE site_generations
SET heartbeat_at = now(), lease_expires_at = now() + make_interval(secs => $2)
WHERE claim_token = ANY($1::uuid[]) AND status = 'running'
RETURNING claim_token;

-- name: stale_generations
-- Active generations nobody has touched for a lease: their owner died, or their job left Redis. A
-- handed-back generation waits for its deferred retry: it is stale only a lease after that is due.
-- One page of them, by id after $3.
SELECT id, order_id, status, current_phase, replica_id, kind, job_id, request
FROM site_generations
WHERE status IN ('queued', 'running', 'waiting') AND id > $3
  AND coalesce(lease_expires_at, retry_at + make_interval(secs => $1), heartbeat_at + make_interval(secs => $1),
               created_at + make_interval(secs => $1)) < now()
ORDER BY id
LIMIT $2;

-- name: request_cancel
-- Waiting and queued runs (no replica working on them) are cancelled at once; running ones are asked
-- to stop. The order remembers when: an edit or rollback job sent before it, still in the queue, ends
-- cancelled when it comes (sitegen_claim_edit). The running run first, then the others by id.
WITH marked AS (
    UPDATE site_orders SET cancel_requested_at = now() WHERE id = $1
), asked AS (
    UPDATE site_generations
    SET cancel_requested_at = now(),
        status = CASE WHEN status IN ('queued', 'waiting') THEN 'cancelled' ELSE status END,
        finished_at = CASE WHEN status IN ('queued', 'waiting') THEN now() ELSE finished_at END,
        error = CASE WHEN status IN ('queued', 'waiting')
                     THEN jsonb_build_object('type', 'Cancelled', 'message', $2::text) ELSE error END
    WHERE order_id = $1 AND status IN ('waiting', 'queued', 'running')
    RETURNING id, status, kind, job_id
)
SELECT id, status, kind, job_id FROM asked ORDER BY status = 'running' DESC, id;

-- name: cancel_requested
-- Only where no commit just said so: a generation interrupted in the middle of a phase.
SELECT cancel_requested_at IS NOT NULL FROM site_generations WHERE id = $1;

-- name: cancel_generation
UPDATE site_generations
SET status = 'cancelled', finished_at = now(), claim_token = NULL, lease_expires_at = NULL,
    error = jsonb_build_object('type', 'Cancelled', 'message', $3::text, 'phase', $4::text)
WHERE id = $1 AND claim_token = $2 AND status = 'running';

-- name: load_files
SELECT path, content FROM site_files WHERE generation_id = $1 ORDER BY path;

-- name: insert_logs
-- A batch of rows in one statement; each is announced, and NOTIFY is sent when it commits.
-- Phases, levels and messages come as jsonb[] strings, not text[]: asyncpg's codec for text, which
-- sanitizes what PostgreSQL refuses (store._init_connection), does not apply to text[].
WITH row AS (
    INSERT INTO site_generation_logs (order_id, generation_id, phase, level, message, details, created_at, replica_id)
    SELECT o, g, p #>> '{}', l #>> '{}', m #>> '{}', d, c, $8::text
    FROM unnest($1::bigint[], $2::bigint[], $3::jsonb[], $4::jsonb[], $5::jsonb[], $6::jsonb[], $7::timestamptz[])
         AS batch (o, g, p, l, m, d, c)
    RETURNING id, order_id, generation_id, phase, level, message, created_at
)
SELECT pg_notify('site_generation_progress', json_build_object(
           'id', id, 'order_id', order_id, 'generation_id', generation_id, 'phase', phase,
           'level', level, 'message', left(message, 200), 'created_at', created_at)::text)
FROM row;

-- name: logs_for_order
SELECT id, generation_id, phase, level, message, details, replica_id, created_at
FROM site_generation_logs WHERE order_id = $1 AND id > $2 ORDER BY id LIMIT $3;

-- name: generations_for_order
-- `sitegen status ORDER`; `last_message` is an active generation's latest progress row ("waiting for openai: ...").
SELECT g.id, g.status, g.current_phase, g.attempt, g.error, g.output_dir, g.usage, g.created_at, g.started_at,
       g.finished_at, EXTRACT(EPOCH FROM coalesce(g.finished_at, now()) - g.started_at)::float8 AS duration_s,
       (SELECT l.message FROM site_generation_logs l
        WHERE g.status IN ('queued', 'running') AND l.order_id = g.order_id AND l.generation_id = g.id
        ORDER BY l.id DESC LIMIT 1) AS last_message
FROM site_generations g WHERE g.order_id = $1 ORDER BY g.id DESC LIMIT $2;

-- name: recent_generations
SELECT g.id, g.order_id, g.status, g.current_phase, g.attempt, g.error, g.output_dir, g.usage, g.created_at,
       g.started_at, g.finished_at, EXTRACT(EPOCH FROM coalesce(g.finished_at, now()) - g.started_at)::float8 AS duration_s,
       (SELECT l.message FROM site_generation_logs l
        WHERE g.status IN ('queued', 'running') AND l.order_id = g.order_id AND l.generation_id = g.id
        ORDER BY l.id DESC LIMIT 1) AS last_message
FROM site_generations g ORDER BY g.id DESC LIMIT $1;

-- name: order_overview
-- `sitegen retry`: whether the order has a stored brief, and its latest generation.
SELECT o.id, o.brief IS NOT NULL AS has_brief, g.id AS generation_id, g.status, g.current_phase, g.error
FROM site_orders o
LEFT JOIN LATERAL (
    SELECT id, status, current_phase, error FROM site_generations WHERE order_id = o.id ORDER BY id DESC LIMIT 1
) g ON true
WHERE o.id = $1;

-- name: follow_position
-- `sitegen logs --follow`: the order's last progress row and whether a generation is queued or running.
SELECT coalesce((SELECT max(id) FROM site_generation_logs WHERE order_id = $1), 0)::bigint AS last_log_id,
       EXISTS (SELECT 1 FROM site_generations WHERE order_id = $1 AND status IN ('queued', 'running')) AS active;

-- ---------------------------------------------------------------------------------------------------
-- `sitegen serve` (worker/api/): reads for the progress API and the dashboard.

-- name: api_order
SELECT id, brief IS NOT NULL AS has_brief, created_at, updated_at FROM site_orders WHERE id = $1;

-- name: api_generations
-- An order's runs (generations, edits, rollbacks), newest first, with the pages of each one's manifest.
SELECT g.id, g.kind, g.version, g.status, g.current_phase, g.attempt, g.error, g.usage, g.replica_id,
       g.created_at, g.started_at, g.finished_at,
       coalesce((SELECT p.output -> 'pages' FROM site_generation_phases p
                 WHERE p.generation_id = g.id AND p.phase = 'assemble'), '[]'::jsonb) AS pages
FROM site_generations g WHERE g.order_id = $1 ORDER BY g.id DESC LIMIT $2;

-- name: api_phases
SELECT phase, duration_ms, usage, completed_at FROM site_generation_phases
WHERE generation_id = $1 ORDER BY completed_at, phase;

-- name: api_logs_max_id
SELECT coalesce(max(id), 0)::bigint FROM site_generation_logs;

-- name: api_logs_after
-- The fan-out's read: every progress row after the last one it delivered, of any order, by id.
SELECT id, order_id, generation_id, phase, level, message, details, created_at
FROM site_generation_logs WHERE id > $1 ORDER BY id LIMIT $2;

-- name: api_probe_log_ids
-- Whether ids $1..$2 of the progress log will never be rows: run in a transaction that is rolled back.
-- An id held by an open transaction makes this wait (and time out); a committed one violates the key.
INSERT INTO site_generation_logs (id, order_id, level, message)
SELECT i, 0, 'debug', 'sitegen-api probe (never committed)' FROM generate_series($1::bigint, $2::bigint) AS i;

-- name: api_replay
-- One order's rows in (after, upto], by id: what an SSE client missed, up to where the fan-out took over.
SELECT id, order_id, generation_id, phase, level, message, details, created_at
FROM site_generation_logs WHERE order_id = $1 AND id > $2 AND id <= $3 ORDER BY id LIMIT $4;

-- name: api_stream_start
-- Where a stream without Last-Event-ID starts: just before the first row of the order's latest generation.
SELECT (SELECT min(l.id) - 1 FROM site_generation_logs l WHERE l.order_id = $1 AND l.generation_id = g.id) AS start_after
FROM site_generations g WHERE g.order_id = $1 ORDER BY g.id DESC LIMIT 1;

-- name: api_stream_end
-- The order's latest generation, and the last row announcing its end (one of the kinds in $2), if written.
SELECT g.id, g.status, EXTRACT(EPOCH FROM now() - g.finished_at)::float8 AS finished_s_ago,
       (SELECT max(l.id) FROM site_generation_logs l
        WHERE l.order_id = g.order_id AND l.generation_id = g.id AND l.details ->> 'event' = ANY($2::text[])) AS end_id
FROM site_generations g WHERE g.order_id = $1 ORDER BY g.id DESC LIMIT 1;

-- name: api_site_file
-- A file of the order's live version; before the order has versions (a generation that a replica of
-- the previous release finished), of its latest succeeded generation. The live version is read first (a
-- scalar subquery, run once): the file is then one primary-key lookup, however many versions the order has
-- and whatever the planner's statistics say (a join let stale ones scan every version's copy of the path).
SELECT b.content, f.media_type, f.sha256
FROM site_version_files f
JOIN site_blobs b ON b.sha256 = f.sha256
WHERE f.order_id = $1 AND f.number = (SELECT live_version FROM site_orders WHERE id = $1) AND f.path = $2
UNION ALL
SELECT f.content, f.media_type, f.sha256 FROM site_files f
WHERE NOT EXISTS (SELECT 1 FROM site_orders o WHERE o.id = $1 AND o.live_version IS NOT NULL)
  AND f.generation_id = (SELECT id FROM site_generations WHERE order_id = $1 AND kind = 'generation'
                         AND status = 'succeeded' ORDER BY id DESC LIMIT 1)
  AND f.path = $2;

-- name: api_site_files
SELECT f.path, b.content
FROM site_version_files f
JOIN site_blobs b ON b.sha256 = f.sha256
WHERE f.order_id = $1 AND f.number = (SELECT live_version FROM site_orders WHERE id = $1)
UNION ALL
SELECT f.path, f.content FROM site_files f
WHERE NOT EXISTS (SELECT 1 FROM site_orders o WHERE o.id = $1 AND o.live_version IS NOT NULL)
  AND f.generation_id = (SELECT id FROM site_generations WHERE order_id = $1 AND kind = 'generation'
                         AND status = 'succeeded' ORDER BY id DESC LIMIT 1)
ORDER BY path;

-- name: announce_cancelled
-- A queued or waiting run cancelled at once has no replica to say so: its progress row announcing the end
-- ($5: its event, generation.cancelled, edit.cancelled or rollback.cancelled).
WITH row AS (
    INSERT INTO site_generation_logs (order_id, generation_id, phase, level, message, details, replica_id)
    VALUES ($1, $2, NULL, 'warning', $3::text, jsonb_build_object('event', $5::text), $4::text)
    RETURNING id, order_id, generation_id, phase, level, message, created_at
)
SELECT pg_notify('site_generation_progress', json_build_object(
           'id', id, 'order_id', order_id, 'generation_id', generation_id, 'phase', phase,
           'level', level, 'message', left(message, 200), 'created_at', created_at)::text)
FROM row;

-- name: dashboard_active
-- Queued and running generations with how many phases each has committed.
SELECT g.id, g.order_id, g.status, g.current_phase, g.attempt, g.replica_id, g.created_at, g.started_at,
       (SELECT count(*) FROM site_generation_phases p WHERE p.generation_id = g.id) AS phases_done
FROM site_generations g WHERE g.status IN ('queued', 'running') ORDER BY g.id LIMIT 200;

-- name: dashboard_failures
-- Failures of the last 24 hours by error type, with the latest order of each.
SELECT coalesce(error ->> 'type', 'Error') AS type, count(*) AS count, max(finished_at) AS last_at,
       (array_agg(order_id ORDER BY finished_at DESC NULLS LAST))[1] AS order_id
FROM site_generations
WHERE status = 'failed' AND finished_at > now() - interval '24 hours'
GROUP BY 1 ORDER BY 2 DESC, 1 LIMIT 50;

-- name: dashboard_usage
-- Tokens and cost of the phases committed today (UTC) and over 7 days, by phase.
SELECT phase,
       sum(CASE WHEN completed_at >= date_trunc('day', now() AT TIME ZONE 'UTC') AT TIME ZONE 'UTC'
                THEN coalesce((usage ->> 'input_tokens')::bigint, 0) + coalesce((usage ->> 'output_tokens')::bigint, 0)
                ELSE 0 END)::bigint AS today_tokens,
       sum(CASE WHEN completed_at >= date_trunc('day', now() AT TIME ZONE 'UTC') AT TIME ZONE 'UTC'
                THEN coalesce((usage ->> 'cost_usd')::float8, 0) ELSE 0 END)::float8 AS today_cost,
       sum(coalesce((usage ->> 'input_tokens')::bigint, 0) + coalesce((usage ->> 'output_tokens')::bigint, 0))::bigint
           AS week_tokens,
       sum(coalesce((usage ->> 'cost_usd')::float8, 0))::float8 AS week_cost
FROM site_generation_phases
WHERE completed_at > now() - interval '7 days' AND phase <> 'assemble'
GROUP BY phase;

-- name: api_signing_keys_lock
-- One `serve` process at a time creates the first signing key (in the caller's transaction).
SELECT pg_advisory_xact_lock(20862, 2);

-- name: api_signing_keys
-- The API's signing keys, newest (the one that signs) first.
SELECT key FROM api_signing_keys ORDER BY created_at DESC, kid;

-- name: api_signing_key_add
INSERT INTO api_signing_keys (kid, key) VALUES ($1, $2) ON CONFLICT (kid) DO NOTHING;

-- name: claim_edit
-- Register, start, resume or skip an edit or rollback: see migrations/0009_site_versions.sql.
SELECT sitegen_claim_edit($1, $2, $3, $4, $5, $6, $7, $8, $9, $10);

-- name: finish_run
-- The last phase of an edit or rollback: its success (fenced by the claim) and its checkpoint. The
-- version is added by `add_version` in the same transaction.
WITH finished AS (
    UPDATE site_generations
    SET status = 'succeeded', current_phase = NULL, usage = $3, output_dir = $4, finished_at = now(),
        claim_token = NULL, lease_expires_at = NULL, heartbeat_at = now()
    WHERE id = $1 AND claim_token = $2 AND status = 'running'
    RETURNING id
), phase AS (
    INSERT INTO site_generation_phases (generation_id, phase, output, usage, duration_ms)
    SELECT id, $5, $6, $7, $8 FROM finished
)
SELECT id FROM finished;

-- name: store_blobs
-- File contents by sha256; one already stored (another version uses it) is not sent or stored again.
INSERT INTO site_blobs (sha256, content, bytes)
SELECT b.sha256, b.content, b.bytes FROM unnest($1::text[], $2::bytea[], $3::int[]) AS b (sha256, content, bytes)
ON CONFLICT (sha256) DO NOTHING;

-- name: add_version
SELECT sitegen_add_version($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13);

-- name: known_blobs
SELECT sha256 FROM site_blobs WHERE sha256 = ANY($1::text[]);

-- name: live_version
SELECT o.live_version AS number, v.plan, v.kind, v.parent
FROM site_orders o LEFT JOIN site_versions v ON v.order_id = o.id AND v.number = o.live_version
WHERE o.id = $1;

-- name: version_files
-- The files of one version with their content, by path.
SELECT f.path, b.content, f.sha256, f.bytes, f.media_type
FROM site_version_files f JOIN site_blobs b ON b.sha256 = f.sha256
WHERE f.order_id = $1 AND f.number = $2
ORDER BY f.path;

-- name: version_file
SELECT b.content, f.media_type, f.sha256
FROM site_version_files f JOIN site_blobs b ON b.sha256 = f.sha256
WHERE f.order_id = $1 AND f.number = $2 AND f.path = $3;

-- name: versions_for_order
-- Every version of an order, newest first, with its size and whether it is live.
SELECT v.number, v.parent, v.kind, v.generation_id, v.instruction, v.rolled_back_to, v.usage, v.created_at,
       v.number = o.live_version AS live,
       (SELECT count(*) FROM site_version_files f WHERE f.order_id = v.order_id AND f.number = v.number) AS files,
       (SELECT coalesce(sum(f.bytes), 0) FROM site_version_files f
        WHERE f.order_id = v.order_id AND f.number = v.number) AS bytes
FROM site_versions v JOIN site_orders o ON o.id = v.order_id
WHERE v.order_id = $1
ORDER BY v.number DESC
LIMIT $2;

-- name: version_detail
SELECT v.number, v.parent, v.kind, v.generation_id, v.instruction, v.rolled_back_to, v.usage, v.quality,
       v.created_at, v.number = o.live_version AS live
FROM site_versions v JOIN site_orders o ON o.id = v.order_id
WHERE v.order_id = $1 AND v.number = $2;

-- name: version_manifest
-- Path, sha256, size and type of every file of a version (no content).
SELECT f.path, f.sha256, f.bytes, f.media_type FROM site_version_files f
WHERE f.order_id = $1 AND f.number = $2 ORDER BY f.path;

-- name: version_plan
SELECT plan FROM site_versions WHERE order_id = $1 AND number = $2;

-- ---------------------------------------------------------------------------------------------------
-- API: versions (issue 22)

-- name: api_version_state
-- Whether an order has a site to edit: its live version, its newest version, and (before its first
-- version is made) whether a generation of it succeeded with files.
SELECT o.live_version,
       (SELECT max(v.number) FROM site_versions v WHERE v.order_id = o.id) AS latest_version,
       EXISTS (SELECT 1 FROM site_generations g WHERE g.order_id = o.id AND g.kind = 'generation'
               AND g.status = 'succeeded' AND EXISTS (SELECT 1 FROM site_files f WHERE f.generation_id = g.id))
           AS has_generated_site
FROM site_orders o WHERE o.id = $1;

-- name: cli_edit_run
-- `sitegen edit --follow`: the run of an edit or rollback job, found by its job id, once registered.
SELECT id, kind, status, version, error FROM site_generations WHERE order_id = $1 AND job_id = $2;
