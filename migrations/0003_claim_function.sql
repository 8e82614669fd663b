-- The claim of an order in one round trip (called by Store.claim_generation, which turns the
-- outcome into a Claim or an error). Before, the same steps were seven round trips: BEGIN, the
-- lock, four statements, COMMIT.
--
-- One call is one transaction, so the advisory lock is held until the claim is committed. The
-- function is VOLATILE: each statement in it reads a fresh snapshot, so what it reads after the
-- lock includes every claim of the order committed before the lock was granted.
--
-- Returns a jsonb object: {"outcome": "started" | "resumed" | "done" | "busy" | "not_found" |
-- "no_brief", ...}, with the generation's fields for the outcomes that have one.
CREATE FUNCTION sitegen_claim(
    p_order_id bigint,
    p_brief jsonb,
    p_regenerate boolean,
    p_token uuid,
    p_replica text,
    p_job_id text,
    p_lease_s float8
) RETURNS jsonb
LANGUAGE plpgsql VOLATILE AS $$
DECLARE
    order_brief jsonb;
    latest record;
    claimed record;
    phases record;
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

    SELECT g.id, g.status, g.attempt, g.brief, g.output_dir, g.replica_id,
           GREATEST(EXTRACT(EPOCH FROM g.lease_expires_at - now()), 0)::float8 AS lease_left_s
    INTO latest
    FROM site_generations g WHERE g.order_id = p_order_id ORDER BY g.id DESC LIMIT 1;
    -- No generation yet: every field of `latest` is null.

    IF latest.id IS NOT NULL AND latest.status IN ('queued', 'running') THEN
        IF p_regenerate THEN
            UPDATE site_generations
            SET status = 'cancelled', finished_at = now(), claim_token = NULL, lease_expires_at = NULL,
                error = jsonb_build_object('type', 'Superseded', 'message', 'superseded by a job with regenerate=true')
            WHERE id = latest.id;
        ELSIF latest.status = 'running' AND latest.lease_left_s > 0 THEN
            RETURN jsonb_build_object(
                'outcome', 'busy', 'generation_id', latest.id,
                'replica_id', latest.replica_id, 'lease_left_s', latest.lease_left_s);
        ELSE
            UPDATE site_generations
            SET status = 'running', attempt = attempt + 1, claim_token = p_token, replica_id = p_replica,
                job_id = p_job_id, heartbeat_at = now(), lease_expires_at = now() + make_interval(secs => p_lease_s),
                started_at = coalesce(started_at, now()), error = NULL
            WHERE id = latest.id
            RETURNING id, attempt, brief, cancel_requested_at IS NOT NULL AS cancel_requested INTO claimed;
            SELECT coalesce(jsonb_object_agg(p.phase, p.output), '{}'::jsonb) AS outputs,
                   coalesce(jsonb_object_agg(p.phase, p.usage), '{}'::jsonb) AS usage
            INTO phases
            FROM site_generation_phases p WHERE p.generation_id = latest.id;
            RETURN jsonb_build_object(
                'outcome', 'resumed', 'generation_id', claimed.id, 'attempt', claimed.attempt,
                'brief', claimed.brief, 'checkpoints', phases.outputs, 'usage', phases.usage,
                'cancel_requested', claimed.cancel_requested,
                'brief_differs', p_brief IS NOT NULL AND latest.brief IS DISTINCT FROM p_brief);
        END IF;
    ELSIF latest.id IS NOT NULL AND latest.status = 'succeeded' AND NOT p_regenerate THEN
        SELECT coalesce(jsonb_object_agg(p.phase, p.output), '{}'::jsonb) AS outputs,
               coalesce(jsonb_object_agg(p.phase, p.usage), '{}'::jsonb) AS usage
        INTO phases
        FROM site_generation_phases p WHERE p.generation_id = latest.id;
        RETURN jsonb_build_object(
            'outcome', 'done', 'generation_id', latest.id, 'attempt', latest.attempt, 'brief', latest.brief,
            'checkpoints', phases.outputs, 'usage', phases.usage, 'output_dir', latest.output_dir);
    END IF;

    INSERT INTO site_generations (order_id, status, current_phase, attempt, brief, claim_token, replica_id, job_id,
                                  heartbeat_at, lease_expires_at, started_at)
    VALUES (p_order_id, 'running', 'plan', 1, coalesce(p_brief, order_brief), p_token, p_replica, p_job_id,
            now(), now() + make_interval(secs => p_lease_s), now())
    RETURNING id, attempt, brief INTO claimed;
    RETURN jsonb_build_object(
        'outcome', 'started', 'generation_id', claimed.id, 'attempt', claimed.attempt, 'brief', claimed.brief);
END
$$;
