-- Edits (and rollbacks) of one order sent in the same millisecond run in the order they were sent.
-- arq stamps a job's enqueue time in milliseconds; 0009's claim broke ties among waiting edits by the
-- order replicas registered them (site_generations.id). It breaks them by the last part of the job id
-- now, which worker.client makes sort by send time (worker.client.send_key), then by id.
-- Rolling upgrades: only the claim's function body changes; replicas of 0009's release call it as before.
DO $$
DECLARE
    body text;
    patched text;
BEGIN
    body := pg_get_functiondef('sitegen_claim_edit'::regproc);
    patched := replace(replace(body,
        '(g.job_enqueued_at, g.id) < (own.job_enqueued_at, own.id)',
        '(g.job_enqueued_at, split_part(g.job_id, '':'', 3), g.id) '
        '< (own.job_enqueued_at, split_part(p_job_id, '':'', 3), own.id)'),
        'ORDER BY g.job_enqueued_at, g.id LIMIT 1',
        'ORDER BY g.job_enqueued_at, split_part(g.job_id, '':'', 3), g.id LIMIT 1');
    IF patched = body OR patched LIKE '%(g.job_enqueued_at, g.id)%' THEN
        RAISE EXCEPTION 'migration 0010: sitegen_claim_edit does not order waiting edits as 0009 wrote it';
    END IF;
    EXECUTE patched;
END
$$;
