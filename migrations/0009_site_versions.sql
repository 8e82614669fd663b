-- Issue 22: site versions and edits.
--
-- * Every successful generation, edit or rollback makes an immutable version of the order's site
--   (`site_versions`, numbered 1, 2, 3... per order). Its files are stored once by content
--   (`site_blobs`, by sha256), so an edit that changes one page stores that page alone.
-- * `site_orders.live_version` names the version `<output.dir>/<order_id>/` holds and the API serves.
-- * Edits and rollbacks are runs of their own kind in `site_generations` (`kind`), so they share the
--   claims, leases, heartbeat, hand-backs, cancels and the sweeper of a generation, and the one-active
--   index keeps one job per order running, whatever its kind. An edit or rollback that waits for its
--   turn is `waiting`: registered, in the order it was sent, but not active.
--
-- Rolling upgrade (docs/upgrading.md): replicas of the previous release keep working; they know no
-- edits or versions. A generation they finish writes `site_files` alone: its version is made when the
-- order is next edited or rolled back (`sitegen_backfill_version`). `site_files` is still written, for
-- them, for one release.

ALTER TABLE site_generations ADD COLUMN kind text NOT NULL DEFAULT 'generation'
    CHECK (kind IN ('generation', 'edit', 'rollback'));
-- What the edit or rollback asked for: {"instruction", "base_version", "pages"} or {"version"}.
ALTER TABLE site_generations ADD COLUMN request jsonb;
-- The version this run made, once it succeeded.
ALTER TABLE site_generations ADD COLUMN version integer;

ALTER TABLE site_generations DROP CONSTRAINT site_generations_status_check;
ALTER TABLE site_generations ADD CONSTRAINT site_generations_status_check
    CHECK (status IN ('waiting', 'queued', 'running', 'succeeded', 'failed', 'cancelled'));
ALTER TABLE site_generations DROP CONSTRAINT site_generations_current_phase_check;
ALTER TABLE site_generations ADD CONSTRAINT site_generations_current_phase_check
    CHECK (current_phase IN ('plan', 'content', 'code', 'assemble', 'edit_plan', 'edit_files', 'publish'));
ALTER TABLE site_generation_phases DROP CONSTRAINT site_generation_phases_phase_check;
ALTER TABLE site_generation_phases ADD CONSTRAINT site_generation_phases_phase_check
    CHECK (phase IN ('plan', 'content', 'code', 'assemble', 'edit_plan', 'edit_files', 'publish'));

-- An edit's or rollback's job is found again by its arq job id (each edit has its own).
CREATE UNIQUE INDEX site_generations_edit_job ON site_generations (order_id, kind, job_id)
    WHERE kind <> 'generation' AND job_id IS NOT NULL;
-- The waiting edits of an order, in the order they were sent.
CREATE INDEX site_generations_waiting ON site_generations (order_id, job_enqueued_at, id) WHERE status = 'waiting';

CREATE TABLE site_blobs (
    sha256  text PRIMARY KEY,
    content bytea NOT NULL,
    bytes   integer NOT NULL
);

CREATE TABLE site_versions (
    order_id       bigint NOT NULL REFERENCES site_orders (id),
    number         integer NOT NULL CHECK (number > 0),
    parent         integer,
    kind           text NOT NULL CHECK (kind IN ('generation', 'edit', 'rollback')),
    generation_id  bigint REFERENCES site_generations (id) ON DELETE SET NULL,
    -- An edit's instruction; a rollback's source version is `rolled_back_to`.
    instruction    text,
    rolled_back_to integer,
    -- The site plan the version was built from (an edit plans against it).
    plan           jsonb,
    usage          jsonb NOT NULL DEFAULT '{}'::jsonb,
    quality        jsonb NOT NULL DEFAULT '{}'::jsonb,
    created_at     timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (order_id, number)
);

-- The whole site of a version, manifest.json included: a path and the blob it holds.
CREATE TABLE site_version_files (
    order_id   bigint NOT NULL,
    number     integer NOT NULL,
    path       text NOT NULL,
    sha256     text NOT NULL REFERENCES site_blobs (sha256),
    bytes      integer NOT NULL,
    media_type text NOT NULL,
    PRIMARY KEY (order_id, number, path),
    FOREIGN KEY (order_id, number) REFERENCES site_versions (order_id, number) ON DELETE CASCADE
);
-- Pruning finds the blobs no version uses any more.
CREATE INDEX site_version_files_by_blob ON site_version_files (sha256);

-- Versions are immutable: pruning deletes whole versions, nothing ever changes one.
CREATE FUNCTION sitegen_versions_immutable() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION 'site versions are immutable (order %, version %)', OLD.order_id, OLD.number
        USING ERRCODE = 'integrity_constraint_violation';
END
$$;
CREATE TRIGGER site_versions_immutable BEFORE UPDATE ON site_versions
    FOR EACH ROW EXECUTE FUNCTION sitegen_versions_immutable();
CREATE TRIGGER site_version_files_immutable BEFORE UPDATE ON site_version_files
    FOR EACH ROW EXECUTE FUNCTION sitegen_versions_immutable();

ALTER TABLE site_orders ADD COLUMN live_version integer;
-- When the order's jobs were last cancelled: an edit or rollback job enqueued before it, not yet
-- registered (still in the queue), ends cancelled when it comes.
ALTER TABLE site_orders ADD COLUMN cancel_requested_at timestamptz;

-- Version 1 of an order from its latest succeeded generation's files, unless the order has versions
-- already; the number of the version made, or NULL. Used by this migration and, for generations that
-- a replica of the previous release finished, when the order is next edited or rolled back.
CREATE FUNCTION sitegen_backfill_version(p_order_id bigint) RETURNS integer
LANGUAGE plpgsql VOLATILE AS $$
DECLARE
    source record;
BEGIN
    PERFORM 1 FROM site_orders WHERE id = p_order_id FOR UPDATE;
    IF EXISTS (SELECT 1 FROM site_versions WHERE order_id = p_order_id) THEN
        RETURN NULL;
    END IF;
    SELECT g.id, g.usage,
           (SELECT p.output FROM site_generation_phases p WHERE p.generation_id = g.id AND p.phase = 'plan') AS plan,
           (SELECT p.output -> 'quality' FROM site_generation_phases p
            WHERE p.generation_id = g.id AND p.phase = 'assemble') AS quality
    INTO source
    FROM site_generations g
    WHERE g.order_id = p_order_id AND g.kind = 'generation' AND g.status = 'succeeded'
      AND EXISTS (SELECT 1 FROM site_files f WHERE f.generation_id = g.id)
    ORDER BY g.id DESC LIMIT 1;
    IF source.id IS NULL THEN
        RETURN NULL;
    END IF;
    INSERT INTO site_blobs (sha256, content, bytes)
    SELECT DISTINCT ON (f.sha256) f.sha256, f.content, f.bytes FROM site_files f WHERE f.generation_id = source.id
    ON CONFLICT (sha256) DO NOTHING;
    INSERT INTO site_versions (order_id, number, parent, kind, generation_id, plan, usage, quality)
    VALUES (p_order_id, 1, NULL, 'generation', source.id, source.plan, coalesce(source.usage, '{}'::jsonb),
            coalesce(source.quality, '{}'::jsonb));
    INSERT INTO site_version_files (order_id, number, path, sha256, bytes, media_type)
    SELECT p_order_id, 1, f.path, f.sha256, f.bytes, f.media_type FROM site_files f WHERE f.generation_id = source.id;
    UPDATE site_generations SET version = 1 WHERE id = source.id;
    UPDATE site_orders SET live_version = 1, updated_at = now() WHERE id = p_order_id;
    RETURN 1;
END
$$;

SELECT sitegen_backfill_version(o.id) FROM site_orders o;

-- The generation claim (0008 around 0005's body) reads the order's latest run: it must read the latest
-- generation, not an edit or rollback. Its body is kept as it is, with that one filter added (the
-- edit fails the migration if the text it replaces is not found).
DO $$
DECLARE
    body text;
    filtered text;
BEGIN
    body := pg_get_functiondef(
        'sitegen_claim_0005(bigint, jsonb, boolean, uuid, text, text, float8, timestamptz, integer)'::regprocedure);
    filtered := replace(body, 'FROM site_generations g WHERE g.order_id = p_order_id ORDER BY g.id DESC LIMIT 1;',
                        'FROM site_generations g WHERE g.order_id = p_order_id AND g.kind = ''generation'' '
                        'ORDER BY g.id DESC LIMIT 1;');
    IF filtered = body THEN
        RAISE EXCEPTION 'migration 0009: the claim of 0005 does not read the latest generation as expected';
    END IF;
    EXECUTE filtered;
END
$$;

-- And it waits while an edit or rollback of the order is active: checked first, under the order's lock
-- (which the claim then takes again: an advisory lock is re-entrant).
ALTER FUNCTION sitegen_claim(bigint, jsonb, boolean, uuid, text, text, float8, timestamptz, integer)
    RENAME TO sitegen_claim_0008;

CREATE FUNCTION sitegen_claim(
    p_order_id bigint,
    p_brief jsonb,
    p_regenerate boolean,
    p_token uuid,
    p_replica text,
    p_job_id text,
    p_lease_s float8,
    p_enqueued_at timestamptz,
    p_max_attempts integer
) RETURNS jsonb
LANGUAGE plpgsql VOLATILE AS $$
DECLARE
    active record;
BEGIN
    PERFORM pg_advisory_xact_lock(p_order_id);
    SELECT g.id, g.kind, g.replica_id,
           GREATEST(EXTRACT(EPOCH FROM g.lease_expires_at - now()), 1)::float8 AS lease_left_s
    INTO active
    FROM site_generations g
    WHERE g.order_id = p_order_id AND g.kind <> 'generation' AND g.status IN ('queued', 'running')
    LIMIT 1;
    IF active.id IS NOT NULL THEN
        RETURN jsonb_build_object(
            'outcome', 'busy', 'generation_id', active.id, 'replica_id', active.replica_id,
            'lease_left_s', least(active.lease_left_s, 5), 'kind', active.kind);
    END IF;
    RETURN sitegen_claim_0008(p_order_id, p_brief, p_regenerate, p_token, p_replica, p_job_id, p_lease_s,
                              p_enqueued_at, p_max_attempts);
END
$$;

-- A new version of the order's site, made live: its files (their blobs stored already, in the same
-- transaction), its parent the version live until now. The number of the version made. Called by the
-- last phase of a generation, an edit or a rollback, inside the statement that finishes the run.
-- p_keep: how many versions to keep (0: all); older ones go, but never the live one, and a blob goes
-- only when no version uses it any more.
CREATE FUNCTION sitegen_add_version(
    p_order_id bigint,
    p_generation_id bigint,
    p_kind text,
    p_instruction text,
    p_rolled_back_to integer,
    p_plan jsonb,
    p_usage jsonb,
    p_quality jsonb,
    p_paths text[],
    p_sha256 text[],
    p_bytes integer[],
    p_media_types text[],
    p_keep integer
) RETURNS integer
LANGUAGE plpgsql VOLATILE AS $$
DECLARE
    live integer;
    made integer;
    dropped text[];
BEGIN
    SELECT o.live_version INTO live FROM site_orders o WHERE o.id = p_order_id FOR UPDATE;
    SELECT coalesce(max(v.number), 0) + 1 INTO made FROM site_versions v WHERE v.order_id = p_order_id;
    INSERT INTO site_versions (order_id, number, parent, kind, generation_id, instruction, rolled_back_to, plan,
                               usage, quality)
    VALUES (p_order_id, made, live, p_kind, p_generation_id, p_instruction, p_rolled_back_to, p_plan,
            coalesce(p_usage, '{}'::jsonb), coalesce(p_quality, '{}'::jsonb));
    INSERT INTO site_version_files (order_id, number, path, sha256, bytes, media_type)
    SELECT p_order_id, made, f.path, f.sha256, f.bytes, f.media_type
    FROM unnest(p_paths, p_sha256, p_bytes, p_media_types) AS f (path, sha256, bytes, media_type);
    UPDATE site_orders SET live_version = made, updated_at = now() WHERE id = p_order_id;
    UPDATE site_generations SET version = made WHERE id = p_generation_id;
    IF p_keep > 0 THEN
        WITH gone AS (
            DELETE FROM site_versions v
            WHERE v.order_id = p_order_id AND v.number <= made - p_keep AND v.number <> made
            RETURNING v.number
        )
        SELECT coalesce(array_agg(DISTINCT f.sha256), '{}') INTO dropped
        FROM site_version_files f WHERE f.order_id = p_order_id AND f.number IN (SELECT number FROM gone);
        -- The files of the versions deleted went with them (ON DELETE CASCADE); the blobs they used go
        -- when nothing else uses them.
        DELETE FROM site_blobs b
        WHERE b.sha256 = ANY(dropped)
          AND NOT EXISTS (SELECT 1 FROM site_version_files f WHERE f.sha256 = b.sha256);
    END IF;
    RETURN made;
END
$$;

-- The claim of an edit or a rollback job (p_kind), in one round trip, under the order's lock.
--
-- An edit is registered by its job id the first time any replica sees it (`waiting`), with the time
-- it was sent (the job's first enqueue time, kept by arq across retries). It starts only when no run
-- of the order is active, no edit or rollback sent before it still waits, and no job of the order
-- sent before it is still in the queue unregistered (p_ahead: the replica read their ids in Redis),
-- so an order's edits run one at a time, in the order they were sent. A job found again (a retry, a
-- replica that died) resumes its run after its last committed phase, or, once it ended, does nothing.
--
-- Outcomes: "started" | "resumed" | "busy" | "ended" | "cancelled" | "not_found" | "no_site" |
-- "no_version" | "exhausted".
CREATE FUNCTION sitegen_claim_edit(
    p_order_id bigint,
    p_kind text,
    p_request jsonb,
    p_token uuid,
    p_replica text,
    p_job_id text,
    p_lease_s float8,
    p_enqueued_at timestamptz,
    p_max_attempts integer,
    p_ahead text[]
) RETURNS jsonb
LANGUAGE plpgsql VOLATILE AS $$
DECLARE
    ord record;
    own record;
    blocker record;
    unregistered text;
    claimed record;
    phases record;
    asked integer;
    failure jsonb;
    wait_s float8;
BEGIN
    PERFORM pg_advisory_xact_lock(p_order_id);
    SELECT o.id, o.live_version, o.cancel_requested_at INTO ord FROM site_orders o WHERE o.id = p_order_id FOR UPDATE;
    IF ord.id IS NULL THEN
        RETURN jsonb_build_object('outcome', 'not_found');
    END IF;
    IF ord.live_version IS NULL THEN
        ord.live_version := sitegen_backfill_version(p_order_id);
    END IF;

    SELECT g.id, g.status, g.attempt, g.attempt - g.spared_attempts AS counted_attempts, g.request, g.error,
           g.version, g.replica_id, g.claim_token, g.current_phase, g.job_enqueued_at,
           g.cancel_requested_at IS NOT NULL AS cancel_requested,
           GREATEST(EXTRACT(EPOCH FROM g.lease_expires_at - now()), 0)::float8 AS lease_left_s
    INTO own
    FROM site_generations g WHERE g.order_id = p_order_id AND g.kind = p_kind AND g.job_id = p_job_id;

    IF own.id IS NULL THEN
        IF ord.cancel_requested_at IS NOT NULL AND p_enqueued_at IS NOT NULL
           AND p_enqueued_at < ord.cancel_requested_at THEN
            INSERT INTO site_generations (order_id, kind, status, attempt, request, job_id, replica_id, error,
                                          job_enqueued_at, finished_at)
            VALUES (p_order_id, p_kind, 'cancelled', 0, p_request, p_job_id, p_replica,
                    jsonb_build_object('type', 'Cancelled', 'message', 'cancelled before it could run'),
                    p_enqueued_at, now())
            RETURNING id INTO claimed;
            RETURN jsonb_build_object('outcome', 'cancelled', 'generation_id', claimed.id, 'attempt', 0);
        END IF;
        INSERT INTO site_generations (order_id, kind, status, attempt, request, job_id, replica_id, heartbeat_at,
                                      job_enqueued_at)
        VALUES (p_order_id, p_kind, 'waiting', 0, p_request, p_job_id, p_replica, now(),
                coalesce(p_enqueued_at, now()))
        RETURNING id, status, attempt, 0 AS counted_attempts, request, NULL::jsonb AS error, NULL::integer AS version,
                  replica_id, claim_token, current_phase, job_enqueued_at, false AS cancel_requested,
                  0::float8 AS lease_left_s
        INTO own;
    END IF;

    IF own.status IN ('succeeded', 'failed', 'cancelled') THEN
        RETURN jsonb_build_object(
            'outcome', 'ended', 'generation_id', own.id, 'attempt', own.attempt, 'status', own.status,
            'version', own.version, 'error', own.error);
    END IF;
    IF own.status = 'running' AND own.lease_left_s > 0 THEN
        RETURN jsonb_build_object(
            'outcome', 'busy', 'generation_id', own.id, 'replica_id', own.replica_id,
            'lease_left_s', own.lease_left_s, 'reason', 'held');
    END IF;

    IF own.status = 'waiting' THEN
        SELECT g.id, g.kind, g.replica_id,
               GREATEST(EXTRACT(EPOCH FROM g.lease_expires_at - now()), 1)::float8 AS lease_left_s
        INTO blocker
        FROM site_generations g WHERE g.order_id = p_order_id AND g.status IN ('queued', 'running') LIMIT 1;
        IF blocker.id IS NULL THEN
            SELECT g.id, g.kind, g.replica_id, 1::float8 AS lease_left_s INTO blocker
            FROM site_generations g
            WHERE g.order_id = p_order_id AND g.status = 'waiting' AND g.id <> own.id
              AND (g.job_enqueued_at, g.id) < (own.job_enqueued_at, own.id)
            ORDER BY g.job_enqueued_at, g.id LIMIT 1;
        END IF;
        IF blocker.id IS NOT NULL THEN
            wait_s := least(blocker.lease_left_s, 2);
            UPDATE site_generations SET heartbeat_at = now(), retry_at = now() + make_interval(secs => wait_s)
            WHERE id = own.id;
            RETURN jsonb_build_object(
                'outcome', 'busy', 'generation_id', blocker.id, 'replica_id', blocker.replica_id,
                'lease_left_s', wait_s, 'kind', blocker.kind, 'reason', 'waiting', 'own_id', own.id);
        END IF;
        SELECT a INTO unregistered FROM unnest(coalesce(p_ahead, '{}')) AS a
        WHERE NOT EXISTS (SELECT 1 FROM site_generations g WHERE g.order_id = p_order_id AND g.job_id = a)
        LIMIT 1;
        IF unregistered IS NOT NULL THEN
            UPDATE site_generations SET heartbeat_at = now(), retry_at = now() + interval '1 second'
            WHERE id = own.id;
            RETURN jsonb_build_object(
                'outcome', 'busy', 'generation_id', own.id, 'replica_id', NULL, 'lease_left_s', 1,
                'reason', 'ahead', 'job_id', unregistered, 'own_id', own.id);
        END IF;

        IF ord.live_version IS NULL THEN
            failure := jsonb_build_object(
                'type', 'NoSite', 'message',
                format('order %s has no site to %s yet: generate it first (generate_site)', p_order_id,
                       CASE WHEN p_kind = 'edit' THEN 'edit' ELSE 'roll back' END),
                'retryable', false);
            UPDATE site_generations SET status = 'failed', error = failure, finished_at = now() WHERE id = own.id;
            RETURN jsonb_build_object('outcome', 'no_site', 'generation_id', own.id, 'error', failure);
        END IF;
        asked := CASE WHEN p_kind = 'edit' THEN (own.request ->> 'base_version')::integer
                      ELSE (own.request ->> 'version')::integer END;
        IF asked IS NOT NULL AND NOT EXISTS (
            SELECT 1 FROM site_versions v WHERE v.order_id = p_order_id AND v.number = asked) THEN
            failure := jsonb_build_object(
                'type', 'VersionNotFound', 'message',
                format('order %s has no version %s (%s): versions 1 to %s exist, unless pruned (setting output.keep_versions)',
                       p_order_id, asked, CASE WHEN p_kind = 'edit' THEN 'base_version' ELSE 'version' END,
                       (SELECT max(v.number) FROM site_versions v WHERE v.order_id = p_order_id)),
                'field', CASE WHEN p_kind = 'edit' THEN 'base_version' ELSE 'version' END,
                'retryable', false);
            UPDATE site_generations SET status = 'failed', error = failure, finished_at = now() WHERE id = own.id;
            RETURN jsonb_build_object('outcome', 'no_version', 'generation_id', own.id, 'error', failure);
        END IF;
        UPDATE site_generations
        SET status = 'running', attempt = 1, claim_token = p_token, replica_id = p_replica,
            heartbeat_at = now(), lease_expires_at = now() + make_interval(secs => p_lease_s), retry_at = NULL,
            started_at = now(), current_phase = CASE WHEN p_kind = 'edit' THEN 'edit_plan' ELSE 'publish' END,
            request = request || jsonb_build_object('live_version', ord.live_version)
        WHERE id = own.id
        RETURNING id, attempt, request INTO claimed;
        RETURN jsonb_build_object(
            'outcome', 'started', 'generation_id', claimed.id, 'attempt', claimed.attempt,
            'request', claimed.request);
    END IF;

    -- Handed back (queued) or held by a replica whose lease lapsed: resume, unless its attempts are spent.
    IF p_max_attempts IS NOT NULL AND own.counted_attempts >= p_max_attempts THEN
        failure := jsonb_build_object(
            'type', 'AttemptsExhausted',
            'message', format('gave up after %s attempts (setting worker.max_attempts = %s); last error: %s',
                              own.counted_attempts, p_max_attempts,
                              coalesce((own.error ->> 'type') || ': ' || (own.error ->> 'message'), 'none stored')),
            'phase', own.current_phase,
            'details', jsonb_build_object('attempts', own.counted_attempts, 'max_attempts', p_max_attempts,
                                          'last_error', own.error));
        UPDATE site_generations
        SET status = 'failed', error = failure, finished_at = now(), claim_token = NULL, lease_expires_at = NULL,
            retry_at = NULL
        WHERE id = own.id;
        RETURN jsonb_build_object(
            'outcome', 'exhausted', 'generation_id', own.id, 'attempt', own.attempt, 'error', failure);
    END IF;
    UPDATE site_generations
    SET status = 'running', attempt = attempt + 1, claim_token = p_token, replica_id = p_replica,
        heartbeat_at = now(), lease_expires_at = now() + make_interval(secs => p_lease_s), retry_at = NULL,
        error = NULL
    WHERE id = own.id
    RETURNING id, attempt, attempt - spared_attempts AS counted, request,
              cancel_requested_at IS NOT NULL AS cancel_requested INTO claimed;
    SELECT coalesce(jsonb_object_agg(p.phase, p.output), '{}'::jsonb) AS outputs,
           coalesce(jsonb_object_agg(p.phase, p.usage), '{}'::jsonb) AS usage
    INTO phases
    FROM site_generation_phases p WHERE p.generation_id = own.id;
    RETURN jsonb_build_object(
        'outcome', 'resumed', 'generation_id', claimed.id, 'attempt', claimed.attempt,
        'counted_attempts', claimed.counted, 'request', claimed.request, 'checkpoints', phases.outputs,
        'usage', phases.usage, 'cancel_requested', claimed.cancel_requested);
END
$$;
