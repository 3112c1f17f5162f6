-- 0004_bulk_keys: key de-duplication without one shared-memory lock per row.
--
-- 0001's trigger took a transaction advisory lock per keyed row. Those live
-- in the server's shared lock table (max_locks_per_transaction, default 64,
-- times max_connections slots) and are held to commit, so one INSERT or COPY
-- of about 14,000 keyed rows failed with "out of shared memory". A row lock
-- lives in the tuple itself and costs no shared memory, so inserts of one
-- key now serialise on a row of pgrunner.task_keys instead.
--
-- pgrunner migrate runs this inside one transaction, under an advisory lock,
-- and records it in pgrunner.migrations.

-- One row per key that tasks have used: a lock object, not the truth about
-- which keys are taken (that is pgrunner.tasks, checked after the lock).
-- Any row here may be deleted at any time without breaking the key rule
-- (the next inserter of that key inserts it again); retention deletes the
-- rows of pruned tasks' keys. Tasks keyed before this migration have no
-- row; the first inserter of such a key inserts one and then sees the task.
CREATE TABLE pgrunner.task_keys (
  key text PRIMARY KEY
);

-- Key de-duplication for every insert (add_task, INSERT, COPY): while a task
-- with the same key is queued or running, the new row is silently skipped.
--
-- First hold the key's row in task_keys until the end of the transaction:
--   - insert it; ON CONFLICT's speculative insertion waits for a concurrent
--     transaction that inserted (or is deleting) the same key, then either
--     inserts or finds the committed row;
--   - if it was there, lock it FOR UPDATE, which waits for whoever holds
--     it; if it is gone meanwhile (deleted by retention), insert again.
-- Then, in READ COMMITTED, the check takes a fresh snapshot, after the
-- previous holder committed, and sees its task. Rows inserted earlier by
-- the same statement are visible to it too (a BEFORE ROW trigger sees them),
-- so a key repeated within one INSERT or COPY adds one task. The unique index
-- tasks_key_idx stays as the backstop.
--
-- Two transactions that insert several shared keys in opposite orders can
-- deadlock (as with any per-key lock): insert many keys in a consistent
-- order. In REPEATABLE READ or SERIALIZABLE the snapshot cannot move, so a
-- same-key task committed by another transaction after the snapshot makes
-- the insert fail (serialization failure or unique violation) rather than
-- be skipped; retry the transaction.
--
-- A role that inserts tasks needs INSERT, SELECT and UPDATE (FOR UPDATE) on
-- pgrunner.task_keys, as it needs INSERT and SELECT on pgrunner.tasks.
CREATE OR REPLACE FUNCTION pgrunner.tasks_dedup() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
  IF NEW.state IN ('queued', 'running') THEN
    LOOP
      INSERT INTO pgrunner.task_keys (key) VALUES (NEW.key)
        ON CONFLICT DO NOTHING;
      EXIT WHEN FOUND;
      PERFORM 1 FROM pgrunner.task_keys k WHERE k.key = NEW.key FOR UPDATE;
      EXIT WHEN FOUND;
    END LOOP;
    IF EXISTS (SELECT 1 FROM pgrunner.tasks t
                WHERE t.key = NEW.key AND t.state IN ('queued', 'running')) THEN
      RETURN NULL;
    END IF;
  END IF;
  RETURN NEW;
END
$$;
