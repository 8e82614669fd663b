-- The two large columns (every page's HTML in the code checkpoint, and the site's files) are
-- compressed with lz4 instead of pglz where the server has lz4 (PostgreSQL 14 or newer, built
-- --with-lz4, as Debian's and the official Docker images are). In bench/ this took PostgreSQL's
-- CPU per site from 2.35 to 1.9 ms (pglz_compress was a fifth of it) for 16% more bytes stored.
-- Only rows written from now on change; existing values stay as they are and stay readable.
-- SET COMPRESSION changes the catalog only (no table rewrite) under a brief exclusive lock.
DO $$
BEGIN
    IF 'lz4' = ANY ((SELECT enumvals FROM pg_settings WHERE name = 'default_toast_compression')::text[]) THEN
        ALTER TABLE site_generation_phases ALTER COLUMN output SET COMPRESSION lz4;
        ALTER TABLE site_files ALTER COLUMN content SET COMPRESSION lz4;
    END IF;
END
$$;
