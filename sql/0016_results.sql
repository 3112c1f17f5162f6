-- 0016_results: a task's output, waiting for a task, and a retry delay a
-- handler may ask for.
--
-- - pgrunner.tasks.output (jsonb): what the attempt that ended the task last
--   returned. A SQL-function job's return value, or what a C handler set
--   with job->set_output(); stored by complete_attempt in the transaction
--   that marks the success, or by finish_attempt with a failed attempt (the
--   http kind keeps the response's status and body there). Deleted with the
--   row by retention; cleared by retry_task.
-- - pgrunner.wait_task(id, timeout): the state, output and last_error once
--   the task has ended, or as they are when the timeout passes.
-- - finish_attempt takes a retry delay (a handler's request, such as an
--   HTTP Retry-After) that replaces the policy's backoff, capped at the
--   policy's cap.

ALTER TABLE pgrunner.tasks ADD COLUMN output jsonb;

-- complete_attempt (0014) with the attempt's output.
CREATE FUNCTION pgrunner.complete_attempt(task bigint, attempt int,
                                          worker bigint, result jsonb)
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
         last_error = NULL, output = result
   WHERE t.id = task
     AND (t.state, t.attempts, t.worker_id)
         IS NOT DISTINCT FROM ('running'::text, attempt, worker);
  IF NOT FOUND THEN
    RAISE EXCEPTION 'pgrunner: attempt % of task % is no longer this worker''s',
      attempt, task USING ERRCODE = 'PR001';
  END IF;
END
$$;

-- What workers older than this migration call.
CREATE OR REPLACE FUNCTION pgrunner.complete_attempt(task bigint, attempt int,
                                                     worker bigint)
RETURNS void
LANGUAGE sql AS $$
  SELECT pgrunner.complete_attempt(task, attempt, worker, NULL::jsonb)
$$;

-- finish_attempt (0014's, with 0011's retry policies and the cancel check)
-- with the attempt's output and an optional retry delay. The delay a
-- handler asks for (retry_delay, NULL: none) replaces the policy's backoff
-- and jitter, but is never longer than the policy's cap, so a server that
-- answers "Retry-After: 31536000" does not park a task for a year.
CREATE FUNCTION pgrunner.finish_attempt(task bigint, attempt int,
                                        worker bigint, outcome text,
                                        error text, result jsonb,
                                        retry_delay interval)
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
    result := NULL;
  END IF;
  st := CASE
          WHEN outcome = 'cancel' THEN 'cancelled'
          WHEN outcome = 'requeue' THEN 'queued'
          WHEN outcome = 'permanent' OR t.attempts >= t.max_attempts THEN 'failed'
          ELSE 'queued' END;
  IF outcome = 'cancel' THEN
    DELETE FROM pgrunner.cancel_requests c WHERE c.task_id = task;
  END IF;
  -- The retry's delay from the task's policy (0011), or the handler's.
  IF st = 'queued' AND outcome <> 'requeue' THEN
    SELECT * INTO pol FROM pgrunner.retry_policy(t.kind, t.queue);
    IF retry_delay IS NOT NULL THEN
      delay := least(greatest(extract(epoch FROM retry_delay), 0),
                     extract(epoch FROM pol.cap));
    ELSE
      delay := least(extract(epoch FROM pol.base)
                       * power(2::double precision,
                               least(greatest(t.attempts - 1, 0), 60)),
                     extract(epoch FROM pol.cap))
               * (1 - pol.jitter + 2 * pol.jitter * random());
    END IF;
  END IF;
  UPDATE pgrunner.tasks x
     SET state = st,
         attempts = CASE WHEN outcome = 'requeue' THEN greatest(x.attempts - 1, 0)
                         ELSE x.attempts END,
         last_error = CASE WHEN outcome = 'requeue' THEN x.last_error
                           ELSE error END,
         output = CASE WHEN outcome = 'requeue' THEN x.output ELSE result END,
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

-- What workers older than this migration call.
CREATE OR REPLACE FUNCTION pgrunner.finish_attempt(task bigint, attempt int,
                                                   worker bigint, outcome text,
                                                   error text)
RETURNS TABLE (new_state text, run_at_ms bigint)
LANGUAGE sql AS $$
  SELECT * FROM pgrunner.finish_attempt(task, attempt, worker, outcome, error,
                                        NULL::jsonb, NULL::interval)
$$;

-- retry_task (0005) also forgets the output of the attempt that ended it.
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
           started_at = NULL, finished_at = NULL, output = NULL
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

-- wait_task: the task's state, output and last_error once it has ended
-- (succeeded, failed, cancelled), or as they are when `timeout` has
-- passed. A function cannot LISTEN (notifications reach a session only
-- between transactions), and a NOTIFY from every completion would make
-- every worker's commit queue on the server's notification lock whether
-- or not anyone waits; so it reads the row by primary key, sleeping 1 ms
-- after the first read and twice as long after each further one, at most
-- 100 ms: about a dozen reads in the first second, then ten a second.
-- Each read is a new snapshot, which only READ COMMITTED gives a
-- function; under REPEATABLE READ or SERIALIZABLE the row would never
-- change, so it refuses to wait there.
CREATE FUNCTION pgrunner.wait_task(id bigint,
                                   timeout interval DEFAULT interval '30 s',
                                   OUT state text, OUT output jsonb,
                                   OUT last_error text)
LANGUAGE plpgsql AS $$
DECLARE
  deadline timestamptz;
  nap double precision := 0.001;
BEGIN
  IF timeout IS NULL OR timeout < interval '0' THEN
    RAISE EXCEPTION 'pgrunner: wait_task timeout must be zero or more, not %',
      coalesce(timeout::text, 'NULL')
      USING ERRCODE = 'invalid_parameter_value';
  END IF;
  IF current_setting('transaction_isolation') <> 'read committed' THEN
    RAISE EXCEPTION 'pgrunner: wait_task needs READ COMMITTED (in % the task would never change)',
      upper(current_setting('transaction_isolation'))
      USING ERRCODE = 'invalid_transaction_state';
  END IF;
  deadline := clock_timestamp() + timeout;
  LOOP
    SELECT t.state, t.output, t.last_error INTO state, output, last_error
      FROM pgrunner.tasks t WHERE t.id = wait_task.id;
    IF NOT FOUND THEN
      RAISE EXCEPTION 'pgrunner: no task with id %', wait_task.id
        USING ERRCODE = 'no_data_found';
    END IF;
    EXIT WHEN state IN ('succeeded', 'failed', 'cancelled')
           OR clock_timestamp() >= deadline;
    PERFORM pg_sleep(least(nap, greatest(extract(epoch FROM
                                                 deadline - clock_timestamp()),
                                         0)));
    nap := least(nap * 2, 0.1);
  END LOOP;
END
$$;

-- Index lookups only, no JIT (0005, 0006), for what this file (re)defined.
DO $$
DECLARE
  f regprocedure;
BEGIN
  FOR f IN SELECT p.oid::regprocedure FROM pg_proc p
            WHERE p.pronamespace = 'pgrunner'::regnamespace
              AND p.proname IN ('complete_attempt', 'finish_attempt',
                                'retry_task', 'wait_task')
  LOOP
    EXECUTE format('ALTER FUNCTION %s SET enable_seqscan = off', f);
    EXECUTE format('ALTER FUNCTION %s SET enable_bitmapscan = off', f);
    EXECUTE format('ALTER FUNCTION %s SET jit = off', f);
  END LOOP;
END
$$;

-- CREATE OR REPLACE made retry_task a plain invoker's function again; it
-- stays the definer's, as 0013 set it, so a producer may retry.
ALTER FUNCTION pgrunner.retry_task(bigint)
  SECURITY DEFINER SET search_path = pg_catalog, pg_temp;

-- setup_roles (0013), with wait_task for producers: whoever adds a task may
-- wait for it (they may read the tasks anyway).
CREATE OR REPLACE FUNCTION pgrunner.setup_roles() RETURNS text
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp AS $$
DECLARE
  r text;
  missing text[] := '{}';
BEGIN
  FOREACH r IN ARRAY ARRAY['pgrunner_producer', 'pgrunner_worker'] LOOP
    CONTINUE WHEN EXISTS (SELECT 1 FROM pg_roles x WHERE x.rolname = r);
    BEGIN
      EXECUTE format('CREATE ROLE %I NOLOGIN', r);
    EXCEPTION
      WHEN insufficient_privilege THEN
        missing := missing || r;
      WHEN duplicate_object OR unique_violation THEN
        NULL; -- created meanwhile by a migrate of another database
    END;
  END LOOP;

  REVOKE ALL ON ALL FUNCTIONS IN SCHEMA pgrunner FROM PUBLIC;

  IF NOT 'pgrunner_producer' = ANY (missing) THEN
    GRANT USAGE ON SCHEMA pgrunner TO pgrunner_producer;
    -- Inserting: the columns a producer sets (never state, attempts or
    -- worker_id); the key's lock row (0004's trigger); reading back the id.
    -- 0015's serial-key trigger runs as its owner.
    GRANT INSERT (kind, payload, queue, run_at, priority, max_attempts, key,
                  timeout_seconds, serial_key)
      ON pgrunner.tasks TO pgrunner_producer;
    GRANT SELECT, INSERT, UPDATE ON pgrunner.task_keys TO pgrunner_producer;
    -- What `pgrunner status` and the schema check read.
    GRANT SELECT ON pgrunner.tasks, pgrunner.workers, pgrunner.migrations
      TO pgrunner_producer;
    -- 0011's insert trigger reads the retry policy as the inserter.
    GRANT SELECT ON pgrunner.retry_policies TO pgrunner_producer;
    GRANT EXECUTE ON FUNCTION pgrunner.retry_policy TO pgrunner_producer;
    GRANT EXECUTE ON FUNCTION pgrunner.add_task(text, jsonb, text,
                                                timestamptz, int, int, text,
                                                text),
                              pgrunner.cancel_task(bigint),
                              pgrunner.retry_task(bigint),
                              pgrunner.wait_task(bigint, interval)
      TO pgrunner_producer;
  END IF;

  IF NOT 'pgrunner_worker' = ANY (missing) THEN
    GRANT USAGE ON SCHEMA pgrunner TO pgrunner_worker;
    GRANT SELECT, INSERT, UPDATE, DELETE
      ON pgrunner.tasks, pgrunner.workers, pgrunner.task_keys,
         pgrunner.serial_keys
      TO pgrunner_worker;
    GRANT SELECT, DELETE ON pgrunner.cancel_requests TO pgrunner_worker;
    GRANT SELECT, UPDATE ON pgrunner.schedules TO pgrunner_worker;
    GRANT SELECT ON pgrunner.migrations, pgrunner.retry_policies
      TO pgrunner_worker;
    -- 0012: each worker adds its outcomes per minute, and forgets old ones.
    GRANT SELECT, INSERT, UPDATE, DELETE ON pgrunner.queue_stats
      TO pgrunner_worker;
    -- 0015: the claim reads and updates the limits of its queues.
    GRANT SELECT, UPDATE ON pgrunner.queue_limits TO pgrunner_worker;
    GRANT EXECUTE ON ALL FUNCTIONS IN SCHEMA pgrunner TO pgrunner_worker;
    REVOKE EXECUTE ON FUNCTION pgrunner.setup_roles() FROM pgrunner_worker;
    -- The default jobs schema; its functions (EXECUTE is PUBLIC's unless
    -- revoked) need whatever they touch granted to pgrunner_worker.
    IF EXISTS (SELECT 1 FROM pg_namespace s
                WHERE s.nspname = 'pgrunner_jobs') THEN
      GRANT USAGE ON SCHEMA pgrunner_jobs TO pgrunner_worker;
    END IF;
  END IF;

  IF cardinality(missing) > 0 THEN
    RETURN format('role %s missing and %I may not create roles (no '
                  'CREATEROLE), so nothing was granted to it; create it '
                  'as a NOLOGIN role and run pgrunner migrate again',
                  array_to_string(missing, ', '), current_user);
  END IF;
  RETURN NULL;
END
$$;
