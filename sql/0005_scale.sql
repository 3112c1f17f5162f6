-- 0005_scale: every statement a worker runs again and again costs the same
-- whatever the table holds (a backlog, a week of retained tasks, a bulk
-- insert not yet analyzed, dead rows behind a long transaction).
--
-- The rule used throughout: a statement finds the rows it changes by
-- primary key (id = ANY of an array it collected first, under a LIMIT),
-- never by a join, which a generic plan or stale statistics may turn into a
-- scan of the whole table. tests/integration/test_plans.py checks the plan
-- of every such statement in each of those conditions.
--
-- pgrunner migrate runs this inside one transaction, under an advisory lock,
-- and records it in pgrunner.migrations.

-- Vacuum the task table by rows changed, not by a fraction of its size: a
-- queue rewrites a few rows many times, and with the default scale factor
-- (20 %) a table holding a week of history would wait for millions of dead
-- rows before a vacuum. No cost delay: the claim index must stay short.
ALTER TABLE pgrunner.tasks SET (
  autovacuum_vacuum_scale_factor = 0,
  autovacuum_vacuum_threshold = 5000,
  autovacuum_vacuum_insert_scale_factor = 0,
  autovacuum_vacuum_insert_threshold = 50000,
  autovacuum_analyze_scale_factor = 0,
  autovacuum_analyze_threshold = 50000,
  autovacuum_vacuum_cost_delay = 0
);

-- The wake-up timer's index held every queued task, so every insert wrote
-- an entry into it. A task can be due in the future only if its run_at is
-- later than its insertion (a delayed task, a retry after backoff, a task
-- given back); one inserted to run now has run_at = created_at (the same
-- now()), and needs no entry. One index write less per task.
DROP INDEX pgrunner.tasks_run_at_idx;
CREATE INDEX tasks_delayed_idx ON pgrunner.tasks (queue, run_at)
  WHERE state = 'queued' AND run_at > created_at;

-- `pgrunner status` lists the most recent failures and counts finished
-- tasks from the newest back: failed and cancelled tasks are kept until
-- someone deletes them, so they need an index of their own.
CREATE INDEX tasks_ended_idx ON pgrunner.tasks (finished_at)
  WHERE state IN ('failed', 'cancelled');

-- recover (0001), in two costs. Every second (heartbeat): find the dead
-- workers (the workers table and pg_stat_activity, both small) and give
-- back the running tasks of those alone, through tasks_running_idx by
-- worker_id; a dead worker's row goes only once none of its tasks is left
-- running (one still locked is taken on a later call), so nothing is
-- forgotten. With sweep, also every running task whose worker has no row
-- at all (left by an older version, or a row deleted by hand): that reads
-- every entry of tasks_running_idx, which behind a long transaction holds
-- every task ever claimed, so workers do it once a minute, not at every
-- heartbeat. recover() as 0001 defined it is recover(true).
CREATE FUNCTION pgrunner.recover(sweep boolean) RETURNS int
LANGUAGE plpgsql AS $$
DECLARE
  dead bigint[];
  ids bigint[];
  n int;
  woken text[];
BEGIN
  PERFORM pg_terminate_backend(a.pid)
     FROM pg_stat_activity a
     JOIN pgrunner.workers w ON a.application_name = w.name
    WHERE w.heartbeat_at < now() - interval '30 seconds'
      AND a.pid <> pg_backend_pid();

  dead := ARRAY(SELECT w.id FROM pgrunner.workers w
                 WHERE w.heartbeat_at < now() - interval '30 seconds'
                    OR NOT EXISTS (SELECT 1 FROM pg_stat_activity a
                                    WHERE a.application_name = w.name));
  IF sweep THEN
    ids := ARRAY(SELECT t.id FROM pgrunner.tasks t
                  WHERE t.state = 'running'
                    AND (t.worker_id = ANY (dead)
                         OR NOT EXISTS (SELECT 1 FROM pgrunner.workers w
                                         WHERE w.id = t.worker_id))
                    FOR UPDATE SKIP LOCKED);
  ELSIF cardinality(dead) > 0 THEN
    ids := ARRAY(SELECT t.id FROM pgrunner.tasks t
                  WHERE t.worker_id = ANY (dead) AND t.state = 'running'
                    FOR UPDATE SKIP LOCKED);
  END IF;
  n := 0;
  IF cardinality(ids) > 0 THEN
    WITH fixed AS (
      UPDATE pgrunner.tasks t
         SET state = CASE
                       WHEN EXISTS (SELECT 1 FROM pgrunner.cancel_requests c
                                     WHERE c.task_id = t.id) THEN 'cancelled'
                       WHEN t.attempts >= t.max_attempts THEN 'failed'
                       ELSE 'queued' END,
             last_error = 'worker died during attempt ' || t.attempts,
             run_at = now(),
             worker_id = NULL,
             finished_at = CASE
                             WHEN t.attempts >= t.max_attempts
                               OR EXISTS (SELECT 1 FROM pgrunner.cancel_requests c
                                           WHERE c.task_id = t.id) THEN now()
                           END
       WHERE t.id = ANY (ids)
      RETURNING t.queue, t.state
    )
    SELECT count(*), array_agg(DISTINCT f.queue) FILTER (WHERE f.state = 'queued')
      INTO n, woken FROM fixed f;
    PERFORM pgrunner.wake(woken);
  END IF;
  IF cardinality(dead) > 0 THEN
    DELETE FROM pgrunner.workers w
     WHERE w.id = ANY (dead)
       AND NOT EXISTS (SELECT 1 FROM pgrunner.tasks t
                        WHERE t.worker_id = w.id AND t.state = 'running');
  END IF;
  RETURN n;
END
$$;

CREATE OR REPLACE FUNCTION pgrunner.recover() RETURNS int
LANGUAGE sql AS $$ SELECT pgrunner.recover(true) $$;

-- heartbeat (0002): the every-second recovery.
CREATE OR REPLACE FUNCTION pgrunner.heartbeat(worker bigint, worker_name text,
                                              worker_host text, worker_pid int,
                                              worker_queues text[],
                                              worker_concurrency int)
RETURNS int
LANGUAGE plpgsql AS $$
BEGIN
  INSERT INTO pgrunner.workers AS w (id, name, host, pid, queues, concurrency)
  VALUES (worker, worker_name, worker_host, worker_pid, worker_queues,
          worker_concurrency)
  ON CONFLICT (id) DO UPDATE SET heartbeat_at = now();
  IF pg_try_advisory_xact_lock(1885827685, 1) THEN
    PERFORM pgrunner.run_schedules();
    RETURN pgrunner.recover(false);
  END IF;
  RETURN 0;
END
$$;

-- release_unknown (0001): the same, with the rows found by primary key.
CREATE OR REPLACE FUNCTION pgrunner.release_unknown(worker bigint,
                                                    known bigint[])
RETURNS int
LANGUAGE plpgsql AS $$
DECLARE
  ids bigint[];
  n int;
  woken text[];
BEGIN
  ids := ARRAY(SELECT t.id FROM pgrunner.tasks t
                WHERE t.worker_id = worker AND t.state = 'running'
                  AND t.id <> ALL (coalesce(known, '{}'))
                  FOR UPDATE SKIP LOCKED);
  IF cardinality(ids) = 0 THEN
    RETURN 0;
  END IF;
  WITH back AS (
    UPDATE pgrunner.tasks t
       SET state = 'queued', attempts = greatest(t.attempts - 1, 0),
           worker_id = NULL, run_at = now(), started_at = NULL
     WHERE t.id = ANY (ids)
    RETURNING t.queue
  )
  SELECT count(*), array_agg(DISTINCT b.queue) INTO n, woken FROM back b;
  PERFORM pgrunner.wake(woken);
  RETURN n;
END
$$;

-- prune (0001): a batch of the oldest succeeded tasks past the retention,
-- found in tasks_succeeded_idx and deleted by primary key. The worker calls
-- it again at once while batches come back full, so retention keeps up
-- with any rate the workers reach.
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
  -- Requests for tasks no longer running; the table holds a handful. A
  -- scalar subquery, so each is one primary-key look-up (an anti-join may
  -- be planned as a walk over a whole index).
  DELETE FROM pgrunner.cancel_requests c
   WHERE (SELECT t.state FROM pgrunner.tasks t WHERE t.id = c.task_id)
         IS DISTINCT FROM 'running';
  RETURN n;
END
$$;

-- cancel_task and retry_task (0001) find the task by primary key alone and
-- look at its state afterwards. With the state in the WHERE clause the
-- planner may prefer a partial index of that state (tasks_claim_idx for
-- queued tasks) when the table looks small, and keep that plan in the
-- session: a scan of every queued task to find one.
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
      INSERT INTO pgrunner.cancel_requests (task_id) VALUES (task_id)
        ON CONFLICT DO NOTHING;
      PERFORM pg_notify('pgrunner_cancel', task_id::text);
      RETURN true;
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

CREATE OR REPLACE FUNCTION pgrunner.retry_task(task_id bigint) RETURNS boolean
LANGUAGE plpgsql AS $$
DECLARE
  st text;
  q text;
BEGIN
  -- Waits for an attempt in progress (it holds the row), as before.
  SELECT t.state, t.queue INTO st, q FROM pgrunner.tasks t
   WHERE t.id = task_id FOR UPDATE;
  IF NOT FOUND THEN
    RAISE EXCEPTION 'pgrunner: no task with id %', task_id
      USING ERRCODE = 'no_data_found';
  END IF;
  IF st NOT IN ('failed', 'cancelled') THEN
    RETURN false;
  END IF;
  BEGIN
    UPDATE pgrunner.tasks t
       SET state = 'queued', attempts = 0, run_at = now(), worker_id = NULL,
           started_at = NULL, finished_at = NULL
     WHERE t.id = task_id;
  EXCEPTION WHEN unique_violation THEN
    RAISE EXCEPTION 'pgrunner: task % has a key that another queued or running task holds', task_id
      USING ERRCODE = 'unique_violation';
  END;
  DELETE FROM pgrunner.cancel_requests c WHERE c.task_id = retry_task.task_id;
  PERFORM pg_notify('pgrunner', q);
  RETURN true;
END
$$;

-- The attempt's own statements find the task by primary key and nothing
-- else. Written as "state = 'running' AND worker_id = worker", the check
-- also matches tasks_running_idx (worker_id) WHERE state = 'running', which
-- the planner may prefer; while a long transaction elsewhere holds back
-- vacuum that index keeps an entry for every task this worker ever
-- claimed, and each attempt would walk them all. The same check as a row
-- IS NOT DISTINCT FROM matches no index, so only the primary key serves.
CREATE OR REPLACE FUNCTION pgrunner.lock_attempt(task bigint, attempt int,
                                                 worker bigint)
RETURNS void
LANGUAGE plpgsql AS $$
BEGIN
  PERFORM 1 FROM pgrunner.tasks t
   WHERE t.id = task
     AND (t.state, t.attempts, t.worker_id)
         IS NOT DISTINCT FROM ('running'::text, attempt, worker)
     FOR UPDATE;
  IF NOT FOUND THEN
    RAISE EXCEPTION 'pgrunner: attempt % of task % is no longer this worker''s',
      attempt, task USING ERRCODE = 'PR001';
  END IF;
  -- A cancel that arrived while the task waited for a thread (or before the
  -- worker knew it had the task) is honoured here, before the handler runs.
  IF EXISTS (SELECT 1 FROM pgrunner.cancel_requests c WHERE c.task_id = task)
  THEN
    RAISE EXCEPTION 'pgrunner: task % was cancelled', task
      USING ERRCODE = 'PR003';
  END IF;
END
$$;

CREATE OR REPLACE FUNCTION pgrunner.complete_attempt(task bigint, attempt int,
                                                     worker bigint)
RETURNS void
LANGUAGE plpgsql AS $$
BEGIN
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

-- A no-op task's whole attempt: one statement, as before (0001's worker
-- sent the UPDATE itself), now in a function so that its plan is made
-- under the settings below. False: not this worker's attempt, or
-- cancelled.
CREATE FUNCTION pgrunner.complete_noop(task bigint, attempt int, worker bigint)
RETURNS boolean
LANGUAGE plpgsql AS $$
BEGIN
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

-- finish_attempt (0001), with the same look-up.
CREATE OR REPLACE FUNCTION pgrunner.finish_attempt(task bigint, attempt int,
                                                   worker bigint, outcome text,
                                                   error text)
RETURNS TABLE (new_state text, run_at_ms bigint)
LANGUAGE plpgsql AS $$
DECLARE
  t pgrunner.tasks;
  st text;
BEGIN
  SELECT * INTO t FROM pgrunner.tasks x
   WHERE x.id = task
     AND (x.state, x.attempts, x.worker_id)
         IS NOT DISTINCT FROM ('running'::text, attempt, worker)
   FOR UPDATE;
  IF NOT FOUND THEN
    RETURN;
  END IF;
  st := CASE
          WHEN outcome = 'cancel' THEN 'cancelled'
          WHEN outcome = 'requeue' THEN 'queued'
          WHEN outcome = 'permanent' OR t.attempts >= t.max_attempts THEN 'failed'
          ELSE 'queued' END;
  IF outcome = 'cancel' THEN
    DELETE FROM pgrunner.cancel_requests c WHERE c.task_id = task;
  END IF;
  UPDATE pgrunner.tasks x
     SET state = st,
         attempts = CASE WHEN outcome = 'requeue' THEN greatest(x.attempts - 1, 0)
                         ELSE x.attempts END,
         last_error = CASE WHEN outcome = 'requeue' THEN x.last_error
                           ELSE error END,
         run_at = CASE
                    WHEN outcome = 'requeue' THEN now()
                    WHEN st = 'queued' THEN
                      now() + least(power(2, x.attempts - 1), 3600)
                              * (0.5 + random()) * interval '1 second'
                    ELSE x.run_at END,
         finished_at = CASE WHEN st = 'queued' THEN NULL ELSE now() END,
         worker_id = CASE WHEN st = 'queued' THEN NULL ELSE x.worker_id END
   WHERE x.id = task
  RETURNING x.state, (extract(epoch FROM x.run_at) * 1000)::bigint
    INTO new_state, run_at_ms;
  RETURN NEXT;
END
$$;

-- A function's plans are made once per session and kept. One made while
-- the table was nearly empty reads it sequentially, and keeps doing so
-- after a bulk insert has made it large, until an ANALYZE happens to
-- invalidate it. Every function that touches the tasks is planned with
-- whole-table reads priced out, so the only plans it can keep are the
-- index lookups it was written for; this applies inside these functions
-- only, never to the SQL of a user's job.
DO $$
DECLARE
  f regprocedure;
BEGIN
  FOR f IN SELECT p.oid::regprocedure FROM pg_proc p
            WHERE p.pronamespace = 'pgrunner'::regnamespace
              AND p.proname IN ('add_task', 'cancel_task', 'retry_task',
                                'recover', 'heartbeat', 'release_unknown',
                                'prune', 'mark_succeeded', 'finish_attempt',
                                'lock_attempt', 'complete_attempt',
                                'complete_noop', 'tasks_dedup',
                                'run_schedules')
  LOOP
    EXECUTE format('ALTER FUNCTION %s SET enable_seqscan = off', f);
    EXECUTE format('ALTER FUNCTION %s SET enable_bitmapscan = off', f);
  END LOOP;
END
$$;
