-- The edit claim (`sitegen_claim_edit`, migration 0009), two changes:
-- 1. Edits (and rollbacks) of one order sent in the same millisecond run in the order they were sent. arq
--    stamps a job's enqueue time in milliseconds; 0009 broke ties among waiting edits by the order replicas
--    registered them (site_generations.id). It breaks them by the last part of the job id now, which
--    worker.client makes sort by send time (worker.client.send_key), then by id.
-- 2. A claim that waited for the run's row lock rechecks the run before it changes it. 0009 started,
--    resumed or gave up on a run `WHERE id = own.id`, with `own` read before the wait: a claim that waited
--    for a write failing or cancelling the run (a replica whose lease had lapsed, a cancel) reopened it
--    (`running`, attempt + 1). Each of those updates now also requires the status and claim it read, and
--    when the run changed meanwhile the claim says what it is now (`sitegen_claim_edit_changed`): ended, or
--    busy (held by the replica that took it).
-- Rolling upgrades: the claim's signature and outcomes are unchanged; replicas of the 0009 release call it
-- as before.

CREATE FUNCTION sitegen_claim_edit_changed(p_id bigint) RETURNS jsonb
LANGUAGE plpgsql AS $$
DECLARE
    now_run record;
BEGIN
    SELECT g.id, g.status, g.attempt, g.version, g.error, g.replica_id,
           GREATEST(EXTRACT(EPOCH FROM g.lease_expires_at - now()), 1)::float8 AS lease_left_s
    INTO now_run FROM site_generations g WHERE g.id = p_id;
    IF now_run.status IN ('succeeded', 'failed', 'cancelled') THEN
        RETURN jsonb_build_object(
            'outcome', 'ended', 'generation_id', now_run.id, 'attempt', now_run.attempt, 'status', now_run.status,
            'version', now_run.version, 'error', now_run.error);
    END IF;
    RETURN jsonb_build_object(
        'outcome', 'busy', 'generation_id', now_run.id, 'replica_id', now_run.replica_id,
        'lease_left_s', least(coalesce(now_run.lease_left_s, 1), 2), 'reason', 'held');
END
$$;

DO $$
DECLARE
    body text;
    patched text;
    step text;
    steps text[][] := ARRAY[
        -- 1: ties of the enqueue time, by the job id's send key
        ARRAY['(g.job_enqueued_at, g.id) < (own.job_enqueued_at, own.id)',
              '(g.job_enqueued_at, split_part(g.job_id, '':'', 3), g.id) '
              '< (own.job_enqueued_at, split_part(p_job_id, '':'', 3), own.id)'],
        ARRAY['ORDER BY g.job_enqueued_at, g.id LIMIT 1',
              'ORDER BY g.job_enqueued_at, split_part(g.job_id, '':'', 3), g.id LIMIT 1'],
        -- 2: the start of a waiting run
        ARRAY['        WHERE id = own.id
        RETURNING id, attempt, request INTO claimed;',
              '        WHERE id = own.id AND status = ''waiting''
        RETURNING id, attempt, request INTO claimed;
        IF NOT FOUND THEN
            RETURN sitegen_claim_edit_changed(own.id);
        END IF;'],
        -- 2: giving up on a run whose attempts are spent
        ARRAY['            retry_at = NULL
        WHERE id = own.id;',
              '            retry_at = NULL
        WHERE id = own.id AND status = own.status AND claim_token IS NOT DISTINCT FROM own.claim_token;
        IF NOT FOUND THEN
            RETURN sitegen_claim_edit_changed(own.id);
        END IF;'],
        -- 2: resuming a run handed back or whose lease lapsed
        ARRAY['    WHERE id = own.id
    RETURNING id, attempt, attempt - spared_attempts AS counted, request,
              cancel_requested_at IS NOT NULL AS cancel_requested INTO claimed;',
              '    WHERE id = own.id AND status = own.status AND claim_token IS NOT DISTINCT FROM own.claim_token
    RETURNING id, attempt, attempt - spared_attempts AS counted, request,
              cancel_requested_at IS NOT NULL AS cancel_requested INTO claimed;
    IF NOT FOUND THEN
        RETURN sitegen_claim_edit_changed(own.id);
    END IF;']
    ];
BEGIN
    body := pg_get_functiondef('sitegen_claim_edit'::regproc);
    patched := body;
    FOR i IN 1 .. array_length(steps, 1) LOOP
        step := replace(patched, steps[i][1], steps[i][2]);
        IF step = patched THEN
            RAISE EXCEPTION 'migration 0010: sitegen_claim_edit does not read as 0009 wrote it (step %)', i;
        END IF;
        patched := step;
    END LOOP;
    EXECUTE patched;
END
$$;
