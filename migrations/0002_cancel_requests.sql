-- `sitegen cancel`: a request the running generation honours at its next safe point.
ALTER TABLE site_generations ADD COLUMN cancel_requested_at timestamptz;
