-- Log chunks are mostly incompressible or already small; storing them without TOAST compression
-- saves the server's and the database's CPU on every append.
ALTER TABLE log_chunks ALTER COLUMN data SET STORAGE EXTERNAL;
