-- The dashboard overview's aggregates read recent rows only: failures of the last 24 hours
-- (`dashboard_failures`) and phases committed in the last 7 days (`dashboard_usage`). Without these
-- indexes each render read both tables whole.
--
-- Plain CREATE INDEX: the runner applies each file in a transaction, where CONCURRENTLY cannot run.
-- It blocks writes to each table while it builds; on a large database build them first by hand,
-- outside a transaction, with the same names (docs/upgrading.md), and this file then does nothing.
CREATE INDEX IF NOT EXISTS site_generations_failed_by_finished_at
    ON site_generations (finished_at) WHERE status = 'failed';
CREATE INDEX IF NOT EXISTS site_generation_phases_by_completed_at
    ON site_generation_phases (completed_at);
