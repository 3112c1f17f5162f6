-- 0014_cancel: a cancel reaches the attempt it was meant for, and once
-- cancel_task() has returned true the task ends cancelled, never succeeded.
--
-- Two promises, each kept by the server rather than by timing:
--
-- 1. An interrupt names an attempt, not a backend. The worker's loop sends
--    it on its own connection, possibly behind a claim or a heartbeat; by
--    the time it runs, the thread may have finished that attempt and
--    started another on the same backend. interrupt_attempt() signals the
--    backend only while it is inside that attempt's transaction: the
--    attempt's first statement (lock_attempt) locks the task's row, so the
--    row's xmax is that transaction's id, and pg_stat_activity says whether
--    the backend's current transaction is that one.
--
-- 2. cancel_task() and the statements that end an attempt (complete_attempt,
--    complete_noop, finish_attempt) take the same per-task transaction
--    lock, an advisory lock (completion_lock), and look again after it.
--    cancel_task() cannot wait for the row lock (an attempt holds it for
--    its whole run), but the enders hold this one only from the moment they
--    decide until they commit: whichever comes second sees the first.
--      - cancel_task first: its request is committed before the attempt
--        checks, and the attempt ends cancelled;
--      - an ender first: cancel_task sees the task succeeded (false), or
--        queued again (it cancels the queued task), or failed (false).

-- The key of a task's completion lock: a class of our own in the
-- two-integer space (the heartbeat's lock is (1885827685, 1)), the task id
-- folded into 32 bits. Two tasks that share a key only make one wait for
-- the other's commit, which is harmless.
CREATE FUNCTION pgrunner.completion_lock(task bigint) RETURNS void
LANGUAGE sql AS $$
  SELECT pg_catalog.pg_advisory_xact_lock(1885827686,
                                          (task # (task >> 32))::int4)
$$;

CREATE FUNCTION pgrunner.interrupt_attempt(task bigint, attempt int,
                                           worker bigint, backend int)
RETURNS boolean
LANGUAGE plpgsql AS $$
BEGIN
  -- The check and the signal are one statement, microseconds apart; a
  -- signal that still arrives after the attempt ended finds the backend
  -- idle (the server ignores it) or in the next attempt, which the worker
  -- then runs again without counting it (txn.c: unsolicited interrupts).
  RETURN coalesce((
    SELECT pg_catalog.pg_cancel_backend(a.pid)
      FROM pgrunner.tasks t, pg_catalog.pg_stat_activity a
     WHERE t.id = task
       AND (t.state, t.attempts, t.worker_id)
           IS NOT DISTINCT FROM ('running'::text, attempt, worker)
       AND a.pid = backend
       AND a.backend_xid = t.xmax), false);
END
$$;

CREATE OR REPLACE FUNCTION pgrunner.cancel_task(task_id bigint)
RETURNS boolean
LANGUAGE plpgsql AS $$
DECLARE
  st text;
BEGIN
  FOR i IN 1..200 LOOP
    SELECT t.state INTO st FROM pgrunner.tasks t WHERE t.id = task_id;
    IF NOT FOUND THEN
      RAISE EXCEPTION 'pgrunner: no task with id %', task_id
        USING ERRCODE = 'no_data_found';
    END IF;
    IF st = 'running' THEN
      -- Wait for an attempt that is ending right now, then look again
      -- (a new statement, a new snapshot): it may have committed.
      PERFORM pgrunner.completion_lock(task_id);
      SELECT t.state INTO st FROM pgrunner.tasks t WHERE t.id = task_id;
      IF st = 'running' THEN
        INSERT INTO pgrunner.cancel_requests (task_id) VALUES (task_id)
          ON CONFLICT DO NOTHING;
        PERFORM pg_notify('pgrunner_cancel', task_id::text);
        RETURN true;
      END IF;
      CONTINUE;
    ELSIF st <> 'queued' THEN
      RETURN false;
    END IF;
    -- A queued row is locked only for the instant a worker claims it; do
    -- not queue behind that lock, look again. Locked, the row is read as
    -- it is now.
    SELECT t.state INTO st FROM pgrunner.tasks t WHERE t.id = task_id
       FOR UPDATE SKIP LOCKED;
    IF FOUND AND st = 'queued' THEN
      UPDATE pgrunner.tasks t
         SET state = 'cancelled', finished_at = now(), worker_id = NULL
       WHERE t.id = task_id;
      RETURN true;
    ELSIF NOT FOUND THEN
      PERFORM pg_sleep(0.005);
    END IF;
  END LOOP;
  RAISE EXCEPTION 'pgrunner: task % stayed locked; try again', task_id;
END
$$;

-- The success mark refuses a task with a cancel request (PR003, as
-- lock_attempt does): the attempt rolls back and is recorded cancelled.
CREATE OR REPLACE FUNCTION pgrunner.complete_attempt(task bigint, attempt int,
                                                     worker bigint)
RETURNS void
LANGUAGE plpgsql AS $$
BEGIN
  PERFORM pgrunner.completion_lock(task);
  IF EXISTS (SELECT 1 FROM pgrunner.cancel_requests c WHERE c.task_id = task)
  THEN
    RAISE EXCEPTION 'pgrunner: task % was cancelled', task
      USING ERRCODE = 'PR003';
  END IF;
  UPDATE pgrunner.tasks t
     SET state = 'succeeded', finished_at = clock_timestamp(),
         last_error = NULL
   WHERE t.id = task
     AND (t.state, t.attempts, t.worker_id)
         IS NOT DISTINCT FROM ('running'::text, attempt, worker);
  IF NOT FOUND THEN
    RAISE EXCEPTION 'pgrunner: attempt % of task % is no longer this worker''s',
      attempt, task USING ERRCODE = 'PR001';
  END IF;
END
$$;

CREATE OR REPLACE FUNCTION pgrunner.complete_noop(task bigint, attempt int,
                                                  worker bigint)
RETURNS boolean
LANGUAGE plpgsql AS $$
BEGIN
  PERFORM pgrunner.completion_lock(task);
  UPDATE pgrunner.tasks t
     SET state = 'succeeded', finished_at = clock_timestamp(), last_error = NULL
   WHERE t.id = task
     AND (t.state, t.attempts, t.worker_id)
         IS NOT DISTINCT FROM ('running'::text, attempt, worker)
     AND NOT EXISTS (SELECT 1 FROM pgrunner.cancel_requests c
                      WHERE c.task_id = task);
  RETURN FOUND;
END
$$;

-- finish_attempt (0011's, with the retry policies): a task with a cancel request ends cancelled
-- whatever the attempt's outcome (a failure, a time limit, a shutdown, a
-- thread's own give-back): queued again it would run after cancel_task
-- returned true.
CREATE OR REPLACE FUNCTION pgrunner.finish_attempt(task bigint, attempt int,
                                                   worker bigint, outcome text,
                                                   error text)
RETURNS TABLE (new_state text, run_at_ms bigint)
LANGUAGE plpgsql AS $$
DECLARE
  t pgrunner.tasks;
  st text;
  pol record;
  delay double precision;
BEGIN
  SELECT * INTO t FROM pgrunner.tasks x
   WHERE x.id = task
     AND (x.state, x.attempts, x.worker_id)
         IS NOT DISTINCT FROM ('running'::text, attempt, worker)
   FOR UPDATE;
  IF NOT FOUND THEN
    RETURN;
  END IF;
  PERFORM pgrunner.completion_lock(task);
  IF outcome <> 'cancel' AND EXISTS (SELECT 1 FROM pgrunner.cancel_requests c
                                      WHERE c.task_id = task) THEN
    outcome := 'cancel';
    error := 'cancelled';
  END IF;
  st := CASE
          WHEN outcome = 'cancel' THEN 'cancelled'
          WHEN outcome = 'requeue' THEN 'queued'
          WHEN outcome = 'permanent' OR t.attempts >= t.max_attempts THEN 'failed'
          ELSE 'queued' END;
  IF outcome = 'cancel' THEN
    DELETE FROM pgrunner.cancel_requests c WHERE c.task_id = task;
  END IF;
  -- The retry's delay from the task's policy (0011).
  IF st = 'queued' AND outcome <> 'requeue' THEN
    SELECT * INTO pol FROM pgrunner.retry_policy(t.kind, t.queue);
    delay := least(extract(epoch FROM pol.base)
                     * power(2::double precision,
                             least(greatest(t.attempts - 1, 0), 60)),
                   extract(epoch FROM pol.cap))
             * (1 - pol.jitter + 2 * pol.jitter * random());
  END IF;
  UPDATE pgrunner.tasks x
     SET state = st,
         attempts = CASE WHEN outcome = 'requeue' THEN greatest(x.attempts - 1, 0)
                         ELSE x.attempts END,
         last_error = CASE WHEN outcome = 'requeue' THEN x.last_error
                           ELSE error END,
         run_at = CASE
                    WHEN outcome = 'requeue' THEN now()
                    WHEN st = 'queued' THEN now() + delay * interval '1 second'
                    ELSE x.run_at END,
         finished_at = CASE WHEN st = 'queued' THEN NULL ELSE now() END,
         worker_id = CASE WHEN st = 'queued' THEN NULL ELSE x.worker_id END
   WHERE x.id = task
  RETURNING x.state, (extract(epoch FROM x.run_at) * 1000)::bigint
    INTO new_state, run_at_ms;
  RETURN NEXT;
END
$$;

-- prune (0005): a request that raced recovery (or release_unknown) is not
-- thrown away before it is honoured.
CREATE OR REPLACE FUNCTION pgrunner.prune(retention interval,
                                          batch int DEFAULT 10000)
RETURNS int
LANGUAGE plpgsql AS $$
DECLARE
  ids bigint[];
  keys text[];
  n int;
BEGIN
  ids := ARRAY(SELECT t.id FROM pgrunner.tasks t
                WHERE t.state = 'succeeded'
                  AND t.finished_at < now() - retention
                ORDER BY t.finished_at
                LIMIT batch
                  FOR UPDATE SKIP LOCKED);
  n := coalesce(cardinality(ids), 0);
  IF n > 0 THEN
    WITH gone AS (
      DELETE FROM pgrunner.tasks t WHERE t.id = ANY (ids) RETURNING t.key
    )
    SELECT array_agg(g.key) INTO keys FROM gone g WHERE g.key IS NOT NULL;
    -- The lock rows of those keys (0004). Any may go: the next inserter of
    -- a key puts its row back. Rows an inserter holds are left for later.
    IF keys IS NOT NULL THEN
      DELETE FROM pgrunner.task_keys k
       WHERE k.key = ANY (ARRAY(SELECT x.key FROM pgrunner.task_keys x
                                 WHERE x.key = ANY (keys)
                                   FOR UPDATE SKIP LOCKED));
    END IF;
  END IF;
  -- Requests for tasks that have ended; the table holds a handful. A
  -- scalar subquery, so each is one primary-key look-up (an anti-join may
  -- be planned as a walk over a whole index). A queued task keeps its
  -- request: recovery or a give-back may have queued it again while the
  -- request was being committed, and lock_attempt honours it at the next
  -- claim.
  DELETE FROM pgrunner.cancel_requests c
   WHERE coalesce((SELECT t.state FROM pgrunner.tasks t
                    WHERE t.id = c.task_id), 'gone')
         NOT IN ('running', 'queued');
  RETURN n;
END
$$;

-- As 0005 and 0006 did for the others: index lookups only, no JIT.
DO $$
DECLARE
  f regprocedure;
BEGIN
  FOR f IN SELECT p.oid::regprocedure FROM pg_proc p
            WHERE p.pronamespace = 'pgrunner'::regnamespace
              AND p.proname IN ('cancel_task', 'interrupt_attempt',
                                'complete_attempt', 'complete_noop',
                                'finish_attempt', 'prune')
  LOOP
    EXECUTE format('ALTER FUNCTION %s SET enable_seqscan = off', f);
    EXECUTE format('ALTER FUNCTION %s SET enable_bitmapscan = off', f);
    EXECUTE format('ALTER FUNCTION %s SET jit = off', f);
  END LOOP;
END
$$;

-- CREATE OR REPLACE made cancel_task a plain invoker's function again; it
-- stays the definer's, as 0013 set it, so a producer may cancel.
ALTER FUNCTION pgrunner.cancel_task(bigint)
  SECURITY DEFINER SET search_path = pg_catalog, pg_temp;
