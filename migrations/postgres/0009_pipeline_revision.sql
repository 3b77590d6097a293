-- Every stored version of a pipeline gets a revision of its own (a new id at every apply), so a
-- replica may keep a pipeline's parsed definition in memory and create runs from it without
-- reading it again: the statement that takes the run's number also checks the revision, and a
-- stale copy changes nothing and is read again (`Store::trigger_run`).
ALTER TABLE pipelines ADD COLUMN revision UUID NOT NULL DEFAULT gen_random_uuid();
