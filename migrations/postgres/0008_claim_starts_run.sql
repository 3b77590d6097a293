-- Kept in step with the SQLite migrations (where a trigger marks a claimed job's run started);
-- PostgreSQL's claim statements do that in a data-modifying CTE, so nothing changes here.
SELECT 1;
