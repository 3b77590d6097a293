-- Kept in step with the PostgreSQL migrations (which change how log chunks are stored);
-- SQLite stores blobs as they are, so nothing changes here.
SELECT 1;
