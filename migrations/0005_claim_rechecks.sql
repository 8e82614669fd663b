-- Issue 14: the claim re-checks what it decided on under the generation's row lock; a cancel
-- sticks for the jobs enqueued before it; a generation has a total attempt limit; a handed-back
-- generation says when its retry is due, so the sweeper does not take it for lost.

-- When the deferred retry of a handed-back (queued) generation is due. The sweeper counts the
-- generation as lost only a lease after that.
ALTER TABLE site_generations ADD COLUMN retry_at timestamptz;

-- The first enqueue time of the job that last claimed the generation (arq's, kept across its retries;
-- the upstream app's clock, as the claim's p_enqueued_at is): a job enqueued no later than that is
-- the generation's own job, or older, and never starts another generation.
ALTER TABLE site_generations ADD COLUMN job_enqueued_at timestamptz;

-- Hand-backs that were not the generation's fault (it waited for a provider's budget, or its replica
-- was draining for a shutdown): they do not count towards worker.max_attempts.
ALTER TABLE site_generations ADD COLUMN spared_attempts integer NOT NULL DEFAULT 0;

-- The sweeper pages through the active generations by id.
CREATE INDEX site_generations_active_by_id ON site_generations (id) WHERE status IN ('queued', 'running');

-- Generations a claim reopened after their last phase was committed (the race fixed below) are
-- finished: their manifest and files were committed with that phase.
UPDATE site_generations g
SET status = 'succeeded', current_phase = NULL, claim_token = NULL, lease_expires_at = NULL, error = NULL,
    finished_at = p.completed_at
FROM site_generation_phases p
WHERE p.generation_id = g.id AND p.phase = 'assemble' AND g.status IN ('queued', 'running');

-- The claim (see 0003 for its shape). What changed:
--
-- * The decision reads the latest generation, then changes it with an UPDATE whose WHERE repeats
--   what the decision relied on (status, claim, lapsed lease). The order's lock keeps other claims
--   out, but not the replica that still holds the generation: its lease may have lapsed while it
--   finishes, fails, cancels or hands the generation back, and those writes do not take the
--   order's lock. When the claim's UPDATE waits for that replica's row lock, PostgreSQL re-checks
--   the WHERE on the committed row; it matches nothing, and the claim decides again on what was
--   committed. Before, it overwrote a finished generation with `running` (issue 14, defect 2).
-- * p_enqueued_at (the job's first enqueue time, kept by arq across retries): a job enqueued before
--   the latest generation's cancel is that generation's own pending job, and ends `cancelled`
--   without work. A job enqueued after it is a new request.
-- * The claim records p_enqueued_at on the generation (job_enqueued_at). A job enqueued no later
--   than that is the generation's own job (or older): it resumes its generation even with
--   regenerate=true (its deferred retry carries the flag again), and once the generation ended it
--   does no work: Redis still holds it when arq could not record its end (an outage), and
--   PostgreSQL, the record, says it is done. Both times come from the same clock, the enqueuer's.
-- * p_max_attempts: a generation whose `attempt` (claims so far, by any replica and job, the
--   sweeper's included), less its spared attempts (hand-backs that were not its fault: a wait for
--   a provider's budget, a shutdown's drain), has reached it is failed here, atomically, with an
--   error naming the attempts and its last error, instead of being claimed again. NULL: no limit.
-- * An active generation whose last phase is committed is finished, never resumed.
--
-- Outcomes: "started" | "resumed" | "done" | "busy" | "not_found" | "no_brief" | "cancelled" |
-- "ended" (a failed or cancelled generation's own job: nothing to do) | "exhausted".
CREATE OR REPLACE FUNCTION sitegen_claim(
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
    order_brief jsonb;
    latest record;
    claimed record;
    phases record;
    last_error jsonb;
    failure jsonb;
BEGIN
    PERFORM pg_advisory_xact_lock(p_order_id);

    IF p_brief IS NOT NULL THEN
        INSERT INTO site_orders (id, brief) VALUES (p_order_id, p_brief)
        ON CONFLICT (id) DO UPDATE SET brief = EXCLUDED.brief, updated_at = now()
        WHERE site_orders.brief IS DISTINCT FROM EXCLUDED.brief;
    ELSE
        SELECT o.brief INTO order_brief FROM site_orders o WHERE o.id = p_order_id FOR UPDATE;
        IF NOT FOUND THEN
            RETURN jsonb_build_object('outcome', 'not_found');
        ELSIF order_brief IS NULL THEN
            RETURN jsonb_build_object('outcome', 'no_brief');
        END IF;
    END IF;

    -- Each pass reads a fresh snapshot (VOLATILE); a pass whose UPDATE matched nothing saw a
    -- generation that its holder changed in the meantime, and the next pass sees that change.
    FOR pass IN 1..5 LOOP
        SELECT g.id, g.status, g.attempt, g.brief, g.output_dir, g.replica_id, g.claim_token, g.error,
               g.current_phase, g.cancel_requested_at, g.attempt - g.spared_attempts AS counted_attempts,
               (p_enqueued_at IS NOT NULL AND g.job_enqueued_at IS NOT NULL
                AND p_enqueued_at <= g.job_enqueued_at) AS own_job,
               GREATEST(EXTRACT(EPOCH FROM g.lease_expires_at - now()), 0)::float8 AS lease_left_s,
               EXISTS (SELECT 1 FROM site_generation_phases p
                       WHERE p.generation_id = g.id AND p.phase = 'assemble') AS assembled
        INTO latest
        FROM site_generations g WHERE g.order_id = p_order_id ORDER BY g.id DESC LIMIT 1;
        -- No generation yet: every field of `latest` is null.

        IF latest.id IS NULL THEN
            EXIT;
        ELSIF latest.status IN ('queued', 'running') AND latest.assembled THEN
            UPDATE site_generations
            SET status = 'succeeded', current_phase = NULL, claim_token = NULL, lease_expires_at = NULL,
                retry_at = NULL, error = NULL, finished_at = now()
            WHERE id = latest.id AND status IN ('queued', 'running');
            CONTINUE;
        ELSIF latest.status IN ('queued', 'running') THEN
            IF p_regenerate AND NOT latest.own_job THEN
                UPDATE site_generations
                SET status = 'cancelled', finished_at = now(), claim_token = NULL, lease_expires_at = NULL,
                    retry_at = NULL,
                    error = jsonb_build_object('type', 'Superseded', 'message', 'superseded by a job with regenerate=true')
                WHERE id = latest.id AND status IN ('queued', 'running');
                IF NOT FOUND THEN
                    CONTINUE;
                END IF;
                EXIT;
            ELSIF latest.status = 'running' AND latest.lease_left_s > 0 THEN
                RETURN jsonb_build_object(
                    'outcome', 'busy', 'generation_id', latest.id,
                    'replica_id', latest.replica_id, 'lease_left_s', latest.lease_left_s);
            ELSIF p_max_attempts IS NOT NULL AND latest.counted_attempts >= p_max_attempts THEN
                -- A running generation here has a lapsed lease: its last attempt ended without a word.
                last_error := CASE
                    WHEN latest.status = 'running' THEN jsonb_build_object(
                        'type', 'AttemptLost',
                        'message', format('attempt %s on replica %s stopped at phase %s without storing an error '
                                          '(killed, out of memory or past worker.job_timeout_s)',
                                          latest.attempt, latest.replica_id, latest.current_phase))
                    ELSE latest.error
                END;
                failure := jsonb_build_object(
                    'type', 'AttemptsExhausted',
                    'message', format('gave up after %s attempts (setting worker.max_attempts = %s); last error: %s',
                                      latest.counted_attempts, p_max_attempts,
                                      coalesce((last_error ->> 'type') || ': ' || (last_error ->> 'message'),
                                               'none stored')),
                    'phase', latest.current_phase,
                    'details', jsonb_build_object('attempts', latest.counted_attempts, 'max_attempts', p_max_attempts,
                                                  'last_error', last_error));
                UPDATE site_generations
                SET status = 'failed', error = failure, finished_at = now(), claim_token = NULL,
                    lease_expires_at = NULL, retry_at = NULL
                WHERE id = latest.id AND status = latest.status
                  AND claim_token IS NOT DISTINCT FROM latest.claim_token
                  AND (status = 'queued' OR lease_expires_at IS NULL OR lease_expires_at <= now());
                IF NOT FOUND THEN
                    CONTINUE;
                END IF;
                RETURN jsonb_build_object(
                    'outcome', 'exhausted', 'generation_id', latest.id, 'attempt', latest.attempt, 'error', failure);
            ELSE
                UPDATE site_generations
                SET status = 'running', attempt = attempt + 1, claim_token = p_token, replica_id = p_replica,
                    job_id = p_job_id, heartbeat_at = now(), lease_expires_at = now() + make_interval(secs => p_lease_s),
                    retry_at = NULL, started_at = coalesce(started_at, now()), error = NULL,
                    job_enqueued_at = greatest(job_enqueued_at, p_enqueued_at)
                WHERE id = latest.id AND status = latest.status
                  AND claim_token IS NOT DISTINCT FROM latest.claim_token
                  AND (status = 'queued' OR lease_expires_at IS NULL OR lease_expires_at <= now())
                RETURNING id, attempt, attempt - spared_attempts AS counted, brief,
                          cancel_requested_at IS NOT NULL AS cancel_requested INTO claimed;
                IF NOT FOUND THEN
                    CONTINUE;
                END IF;
                SELECT coalesce(jsonb_object_agg(p.phase, p.output), '{}'::jsonb) AS outputs,
                       coalesce(jsonb_object_agg(p.phase, p.usage), '{}'::jsonb) AS usage
                INTO phases
                FROM site_generation_phases p WHERE p.generation_id = latest.id;
                RETURN jsonb_build_object(
                    'outcome', 'resumed', 'generation_id', claimed.id, 'attempt', claimed.attempt,
                    'counted_attempts', claimed.counted,
                    'brief', claimed.brief, 'checkpoints', phases.outputs, 'usage', phases.usage,
                    'cancel_requested', claimed.cancel_requested,
                    'brief_differs', p_brief IS NOT NULL AND latest.brief IS DISTINCT FROM p_brief);
            END IF;
        ELSIF latest.status = 'cancelled' AND latest.cancel_requested_at IS NOT NULL
              AND p_enqueued_at IS NOT NULL AND p_enqueued_at < latest.cancel_requested_at THEN
            RETURN jsonb_build_object(
                'outcome', 'cancelled', 'generation_id', latest.id, 'attempt', latest.attempt,
                'brief', latest.brief, 'cancel_requested_at', latest.cancel_requested_at);
        ELSIF latest.status IN ('failed', 'cancelled') AND latest.own_job THEN
            RETURN jsonb_build_object(
                'outcome', 'ended', 'generation_id', latest.id, 'attempt', latest.attempt,
                'brief', latest.brief, 'status', latest.status);
        ELSIF latest.status = 'succeeded' AND (NOT p_regenerate OR latest.own_job) THEN
            SELECT coalesce(jsonb_object_agg(p.phase, p.output), '{}'::jsonb) AS outputs,
                   coalesce(jsonb_object_agg(p.phase, p.usage), '{}'::jsonb) AS usage
            INTO phases
            FROM site_generation_phases p WHERE p.generation_id = latest.id;
            RETURN jsonb_build_object(
                'outcome', 'done', 'generation_id', latest.id, 'attempt', latest.attempt, 'brief', latest.brief,
                'checkpoints', phases.outputs, 'usage', phases.usage, 'output_dir', latest.output_dir);
        END IF;
        EXIT;  -- nothing to resume or return: start a fresh generation
    END LOOP;

    IF latest.id IS NOT NULL AND latest.status IN ('queued', 'running') AND NOT p_regenerate THEN
        -- Five passes, each overtaken by the generation's holder: let the job come back shortly.
        RETURN jsonb_build_object(
            'outcome', 'busy', 'generation_id', latest.id, 'replica_id', latest.replica_id, 'lease_left_s', 1);
    END IF;

    INSERT INTO site_generations (order_id, status, current_phase, attempt, brief, claim_token, replica_id, job_id,
                                  heartbeat_at, lease_expires_at, started_at, job_enqueued_at)
    VALUES (p_order_id, 'running', 'plan', 1, coalesce(p_brief, order_brief), p_token, p_replica, p_job_id,
            now(), now() + make_interval(secs => p_lease_s), now(), p_enqueued_at)
    RETURNING id, attempt, brief INTO claimed;
    RETURN jsonb_build_object(
        'outcome', 'started', 'generation_id', claimed.id, 'attempt', claimed.attempt, 'brief', claimed.brief);
END
$$;

-- The previous signature, for replicas of the previous release during a rolling upgrade: the same
-- claim, with its re-checks, without the cancel and attempt rules they do not know about.
CREATE OR REPLACE FUNCTION sitegen_claim(
    p_order_id bigint,
    p_brief jsonb,
    p_regenerate boolean,
    p_token uuid,
    p_replica text,
    p_job_id text,
    p_lease_s float8
) RETURNS jsonb
LANGUAGE sql VOLATILE AS $$
    SELECT sitegen_claim(p_order_id, p_brief, p_regenerate, p_token, p_replica, p_job_id, p_lease_s,
                         NULL::timestamptz, NULL::integer)
$$;
