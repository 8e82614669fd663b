-- Issue 21 defect 9: a claim with regenerate=true that lost its five races to the generation's holder
-- (each pass's UPDATE matched nothing because the holder changed the row meanwhile) fell through to
-- INSERT a new generation while one was still active, and failed on the partial unique index
-- (site_generations_one_active). It answers `busy` instead, so the job comes back shortly.
--
-- The claim of 0005 is kept whole under another name; `sitegen_claim`, with the same signature (the
-- 7-argument wrapper of 0005 and replicas of the previous release call it by that name), runs it in a
-- subtransaction and turns that one unique violation into `busy`. Nothing the failed pass did is kept.
ALTER FUNCTION sitegen_claim(bigint, jsonb, boolean, uuid, text, text, float8, timestamptz, integer)
    RENAME TO sitegen_claim_0005;

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
    BEGIN
        RETURN sitegen_claim_0005(p_order_id, p_brief, p_regenerate, p_token, p_replica, p_job_id, p_lease_s,
                                  p_enqueued_at, p_max_attempts);
    EXCEPTION WHEN unique_violation THEN
        SELECT g.id, g.replica_id INTO active
        FROM site_generations g
        WHERE g.order_id = p_order_id AND g.status IN ('queued', 'running')
        ORDER BY g.id DESC LIMIT 1;
        IF active.id IS NULL THEN
            RAISE;  -- not the race with an active generation: a real error
        END IF;
        RETURN jsonb_build_object(
            'outcome', 'busy', 'generation_id', active.id, 'replica_id', active.replica_id, 'lease_left_s', 1);
    END;
END
$$;
