-- 0013_roles: who may do what, and liveness that another session cannot
-- fake.
--
-- Roles. pgrunner_producer adds tasks, cancels and retries them and reads
-- status; pgrunner_worker does everything `pgrunner work` does. Both are
-- NOLOGIN: grant them to login roles (GRANT pgrunner_producer TO app).
-- pgrunner.setup_roles() creates them if missing and (re)grants their
-- privileges; `pgrunner migrate` calls it after every run, so functions
-- added by later migrations are covered and a migration run by a user
-- without CREATEROLE can be completed later (see README, "Roles").
--
-- Whoever may insert a task runs any function of the jobs schema, with the
-- worker's rights: a task's kind names the function. That is the contract
-- of a job queue, not a hole; it is why the producer role is a grant of
-- its own.
--
-- Liveness. 0001 took a worker for alive while any session carried its
-- application_name, which any session may set: one idle session named
-- like a killed worker kept its tasks 'running' until the 30 s heartbeat
-- limit, and for ever when the worker could not terminate that session
-- (another role: pg_terminate_backend raised, and so did every heartbeat).
-- Reading pg_stat_activity every second also cost CPU on a busy server.
-- Now each of the worker's two loop connections holds a session-level
-- shared advisory lock keyed by the worker id (the bigint form: its key
-- space is apart from the two-int4 keys (1885827685, n) that migrate and
-- the heartbeat use), taken before the connection registers. A worker is
-- dead when:
--   - its heartbeat is over 30 s old (a hung or lost machine; its sessions
--     of its own login are terminated so their row locks go), or
--   - pg_try_advisory_xact_lock on its key succeeds: none of its loop
--     connections is left (no scan of pg_stat_activity), or
--   - its heartbeat is over 5 s old (a live worker beats every second) and
--     no holder of its key is a session of the login it registered with:
--     someone else took the lock. Only then are pg_locks and
--     pg_stat_activity read.
-- A session of the worker's own login can still fake it; whoever has that
-- login can do anything the worker does anyway.
--
-- Rows of workers older than this migration (login IS NULL: they take no
-- lock) keep the application_name rule, so a rolling upgrade strands
-- nothing.
--
-- pgrunner migrate runs this inside one transaction, under an advisory lock,
-- and records it in pgrunner.migrations.

-- The session_user a worker registered with; NULL for a worker that takes
-- no liveness lock (before this migration).
ALTER TABLE pgrunner.workers ADD COLUMN login name;

-- Is worker w alive? (Called by recover, once per registered worker.)
CREATE FUNCTION pgrunner.worker_alive(w pgrunner.workers) RETURNS boolean
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp AS $$
BEGIN
  IF w.heartbeat_at < now() - interval '30 seconds' THEN
    RETURN false;
  END IF;
  IF w.login IS NULL THEN
    RETURN EXISTS (SELECT 1 FROM pg_stat_activity a
                    WHERE a.application_name = w.name);
  END IF;
  -- Held to the end of our transaction when granted: a worker coming back
  -- meanwhile waits for its shared lock until we have given its tasks back.
  IF pg_try_advisory_xact_lock(w.id) THEN
    RETURN false;
  END IF;
  IF w.heartbeat_at >= now() - interval '5 seconds' THEN
    RETURN true;
  END IF;
  RETURN EXISTS (
    SELECT 1 FROM pg_locks k JOIN pg_stat_activity a ON a.pid = k.pid
     WHERE k.locktype = 'advisory' AND k.granted
       AND k.database = (SELECT d.oid FROM pg_database d
                          WHERE d.datname = current_database())
       AND k.classid = (w.id >> 32)::oid
       AND k.objid = (w.id & 4294967295)::oid
       AND k.objsubid = 1
       AND a.usename = w.login);
END
$$;

-- recover (0005) with the liveness above. `caller` is the worker calling
-- (NULL: anyone else): its own session holds its key, so the try-lock would
-- succeed there and it would find itself dead.
CREATE FUNCTION pgrunner.recover(sweep boolean, caller bigint) RETURNS int
LANGUAGE plpgsql AS $$
DECLARE
  stale bigint[];
  dead bigint[];
  ids bigint[];
  p int;
  n int;
  woken text[];
BEGIN
  stale := ARRAY(SELECT w.id FROM pgrunner.workers w
                  WHERE w.heartbeat_at < now() - interval '30 seconds'
                    AND w.id IS DISTINCT FROM caller);
  IF cardinality(stale) > 0 THEN
    -- Its sessions of its own login (a worker of another version: of any
    -- login), so their row locks go. One we may not signal (another
    -- non-superuser login without pg_signal_backend) is left; its task
    -- then waits for the session to end.
    FOR p IN SELECT a.pid FROM pg_stat_activity a
               JOIN pgrunner.workers w ON a.application_name = w.name
              WHERE w.id = ANY (stale) AND a.pid <> pg_backend_pid()
                AND (w.login IS NULL OR a.usename = w.login)
    LOOP
      BEGIN
        PERFORM pg_terminate_backend(p);
      EXCEPTION WHEN insufficient_privilege THEN
        NULL;
      END;
    END LOOP;
  END IF;

  dead := ARRAY(SELECT w.id FROM pgrunner.workers w
                 WHERE w.id IS DISTINCT FROM caller
                   AND NOT pgrunner.worker_alive(w));
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

-- What callers of 0005 call (workers of that version, users).
CREATE OR REPLACE FUNCTION pgrunner.recover(sweep boolean) RETURNS int
LANGUAGE sql AS $$ SELECT pgrunner.recover(sweep, NULL) $$;

-- heartbeat (0005) for workers that hold the liveness lock on the
-- connection they call it from (locked = true).
CREATE FUNCTION pgrunner.heartbeat(worker bigint, worker_name text,
                                   worker_host text, worker_pid int,
                                   worker_queues text[],
                                   worker_concurrency int, locked boolean)
RETURNS int
LANGUAGE plpgsql AS $$
BEGIN
  INSERT INTO pgrunner.workers AS w (id, name, host, pid, queues, concurrency,
                                     login)
  VALUES (worker, worker_name, worker_host, worker_pid, worker_queues,
          worker_concurrency, CASE WHEN locked THEN session_user END)
  ON CONFLICT (id) DO UPDATE SET heartbeat_at = now(), login = EXCLUDED.login;
  IF pg_try_advisory_xact_lock(1885827685, 1) THEN
    PERFORM pgrunner.run_schedules();
    RETURN pgrunner.recover(false, worker);
  END IF;
  RETURN 0;
END
$$;

-- The heartbeat of workers older than this migration (no lock).
CREATE OR REPLACE FUNCTION pgrunner.heartbeat(worker bigint, worker_name text,
                                              worker_host text, worker_pid int,
                                              worker_queues text[],
                                              worker_concurrency int)
RETURNS int
LANGUAGE sql AS $$
  SELECT pgrunner.heartbeat(worker, worker_name, worker_host, worker_pid,
                            worker_queues, worker_concurrency, false)
$$;

-- cancel_task and retry_task change rows a producer may not UPDATE itself:
-- they run with their owner's rights, and only they.
ALTER FUNCTION pgrunner.cancel_task(bigint)
  SECURITY DEFINER SET search_path = pg_catalog, pg_temp;
ALTER FUNCTION pgrunner.retry_task(bigint)
  SECURITY DEFINER SET search_path = pg_catalog, pg_temp;

-- The planner settings of 0005/0006 for what this file (re)defined.
DO $$
DECLARE
  f regprocedure;
BEGIN
  FOR f IN SELECT p.oid::regprocedure FROM pg_proc p
            WHERE p.pronamespace = 'pgrunner'::regnamespace
              AND p.proname IN ('recover', 'heartbeat')
  LOOP
    EXECUTE format('ALTER FUNCTION %s SET enable_seqscan = off', f);
    EXECUTE format('ALTER FUNCTION %s SET enable_bitmapscan = off', f);
    EXECUTE format('ALTER FUNCTION %s SET jit = off', f);
  END LOOP;
END
$$;

-- setup_roles: create the two roles if missing, and grant them what they
-- need (every call grants again, and takes EXECUTE on pgrunner's functions
-- away from PUBLIC: a function is for the roles granted it). Returns NULL,
-- or, when a role is missing and this user may not create it (no
-- CREATEROLE), a message naming it; its grants are then skipped and the
-- rest is done.
CREATE FUNCTION pgrunner.setup_roles() RETURNS text
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
    GRANT INSERT (kind, payload, queue, run_at, priority, max_attempts, key,
                  timeout_seconds)
      ON pgrunner.tasks TO pgrunner_producer;
    GRANT SELECT, INSERT, UPDATE ON pgrunner.task_keys TO pgrunner_producer;
    -- What `pgrunner status` and the schema check read.
    GRANT SELECT ON pgrunner.tasks, pgrunner.workers, pgrunner.migrations
      TO pgrunner_producer;
    -- 0011's insert trigger reads the retry policy as the inserter.
    GRANT SELECT ON pgrunner.retry_policies TO pgrunner_producer;
    GRANT EXECUTE ON FUNCTION pgrunner.retry_policy TO pgrunner_producer;
    GRANT EXECUTE ON FUNCTION pgrunner.add_task(text, jsonb, text,
                                                timestamptz, int, int, text),
                              pgrunner.cancel_task(bigint),
                              pgrunner.retry_task(bigint)
      TO pgrunner_producer;
  END IF;

  IF NOT 'pgrunner_worker' = ANY (missing) THEN
    GRANT USAGE ON SCHEMA pgrunner TO pgrunner_worker;
    GRANT SELECT, INSERT, UPDATE, DELETE
      ON pgrunner.tasks, pgrunner.workers, pgrunner.task_keys
      TO pgrunner_worker;
    GRANT SELECT, DELETE ON pgrunner.cancel_requests TO pgrunner_worker;
    GRANT SELECT, UPDATE ON pgrunner.schedules TO pgrunner_worker;
    GRANT SELECT ON pgrunner.migrations, pgrunner.retry_policies
      TO pgrunner_worker;
    -- 0012: each worker adds its outcomes per minute, and forgets old ones.
    GRANT SELECT, INSERT, UPDATE, DELETE ON pgrunner.queue_stats
      TO pgrunner_worker;
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
