-- The contract's tables: orders, generation runs, their committed phase checkpoints,
-- the progress log a frontend shows, and the generated files.

CREATE TABLE site_orders (
    id          bigint PRIMARY KEY,
    brief       jsonb,
    created_at  timestamptz NOT NULL DEFAULT now(),
    updated_at  timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE site_generations (
    id               bigserial PRIMARY KEY,
    order_id         bigint NOT NULL REFERENCES site_orders (id),
    status           text NOT NULL DEFAULT 'queued'
                     CHECK (status IN ('queued', 'running', 'succeeded', 'failed', 'cancelled')),
    current_phase    text CHECK (current_phase IN ('plan', 'content', 'code', 'assemble')),
    attempt          integer NOT NULL DEFAULT 0,
    error            jsonb,
    output_dir       text,
    usage            jsonb NOT NULL DEFAULT '{}'::jsonb,
    -- The brief this generation is built from: a resumed run keeps it even if the order's changes.
    brief            jsonb,
    job_id           text,
    -- Fencing: every write of a running generation names the claim that made it.
    claim_token      uuid,
    replica_id       text,
    heartbeat_at     timestamptz,
    lease_expires_at timestamptz,
    created_at       timestamptz NOT NULL DEFAULT now(),
    started_at       timestamptz,
    finished_at      timestamptz
);

-- At most one active generation per order, whatever the replicas do.
CREATE UNIQUE INDEX site_generations_one_active
    ON site_generations (order_id) WHERE status IN ('queued', 'running');
CREATE INDEX site_generations_by_order ON site_generations (order_id, id DESC);
CREATE INDEX site_generations_active_lease
    ON site_generations (lease_expires_at) WHERE status IN ('queued', 'running');

CREATE TABLE site_generation_phases (
    generation_id bigint NOT NULL REFERENCES site_generations (id) ON DELETE CASCADE,
    phase         text NOT NULL CHECK (phase IN ('plan', 'content', 'code', 'assemble')),
    output        jsonb NOT NULL,
    usage         jsonb NOT NULL DEFAULT '{}'::jsonb,
    duration_ms   integer,
    completed_at  timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (generation_id, phase)
);

-- No foreign keys: a progress row must be writable even for an order that does not exist
-- (that is exactly the error the user needs to see).
CREATE TABLE site_generation_logs (
    id            bigserial PRIMARY KEY,
    order_id      bigint NOT NULL,
    generation_id bigint,
    phase         text,
    level         text NOT NULL,
    message       text NOT NULL,
    details       jsonb,
    replica_id    text,
    created_at    timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX site_generation_logs_by_order ON site_generation_logs (order_id, id);

CREATE TABLE site_files (
    generation_id bigint NOT NULL REFERENCES site_generations (id) ON DELETE CASCADE,
    path          text NOT NULL,
    content       bytea NOT NULL,
    sha256        text NOT NULL,
    bytes         integer NOT NULL,
    media_type    text NOT NULL,
    PRIMARY KEY (generation_id, path)
);
