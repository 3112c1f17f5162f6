-- 0015_flow: one task at a time per serial key, and limits per queue that
-- hold across every worker (issue 16, items 1 and 2).
--
-- pgrunner migrate runs this inside one transaction, under an advisory lock,
-- and records it in pgrunner.migrations.

------------------------------------------------------------------------
-- 1. Serial keys.
--
-- Tasks with the same serial_key run one at a time, in (priority, run_at,
-- id) order. Of the queued and running tasks of a key exactly one is its
-- head (serial_held = false); the others wait with serial_held = true and
-- are kept out of the claim index, so a backlog of 100,000 tasks of one key
-- costs a claim nothing. The head keeps the key while it runs and while it
-- waits for a retry; when it ends (succeeded, failed, cancelled, deleted)
-- the next waiting task of the key becomes the head in the same
-- transaction (tasks_serial_release), found in tasks_serial_wait_idx.
--
-- Inserts of one key serialise on its row in pgrunner.serial_keys, held
-- until commit (as 0004 does for de-duplication keys: a row lock costs no
-- shared memory, so one INSERT or COPY of 100,000 rows of one key, or of
-- 100,000 keys, works at default settings). The head is then looked up with
-- a fresh snapshot; rows inserted earlier by the same statement are visible
-- to it. A new task that sorts before a head that has not started yet
-- (attempts = 0) takes its place. The releaser takes the same row lock after
-- marking its task ended, so an insert either sees the head still there (and
-- waits behind it) or sees it ended and the next one released. A unique
-- index on the heads is the backstop.
------------------------------------------------------------------------

ALTER TABLE pgrunner.tasks
  ADD COLUMN serial_key text,
  ADD COLUMN serial_held boolean NOT NULL DEFAULT false,
  ADD CONSTRAINT tasks_serial_key_check CHECK (serial_key <> ''),
  ADD CONSTRAINT tasks_serial_held_check
    CHECK (NOT serial_held OR serial_key IS NOT NULL);

-- The claim index without the waiting tasks. Every statement that reads
-- queued tasks through it says "AND NOT t.serial_held".
DROP INDEX pgrunner.tasks_claim_idx;
CREATE INDEX tasks_claim_idx ON pgrunner.tasks (queue, priority, run_at, id)
  WHERE state = 'queued' AND NOT serial_held;
-- The head of each key: at most one.
CREATE UNIQUE INDEX tasks_serial_head_idx ON pgrunner.tasks (serial_key)
  WHERE serial_key IS NOT NULL AND state IN ('queued', 'running')
    AND NOT serial_held;
-- The waiting tasks of each key, in run order.
CREATE INDEX tasks_serial_wait_idx
  ON pgrunner.tasks (serial_key, priority, run_at, id)
  WHERE state = 'queued' AND serial_held;

-- Lock objects, as pgrunner.task_keys (0004): any row may be deleted at any
-- time; the releaser deletes the row of a key with nothing left waiting.
CREATE TABLE pgrunner.serial_keys (
  key text PRIMARY KEY
);

-- Hold key k's row until the end of the transaction.
CREATE FUNCTION pgrunner.serial_lock(k text) RETURNS void
LANGUAGE plpgsql AS $$
BEGIN
  LOOP
    INSERT INTO pgrunner.serial_keys (key) VALUES (k) ON CONFLICT DO NOTHING;
    EXIT WHEN FOUND;
    PERFORM 1 FROM pgrunner.serial_keys s WHERE s.key = k FOR UPDATE;
    EXIT WHEN FOUND;
  END LOOP;
END
$$;

-- A task becomes queued or running with a serial key (INSERT, COPY,
-- add_task, retry_task, an UPDATE by hand): head or waiting. Runs as its
-- owner, so that a producer (no UPDATE on tasks) may insert a task that
-- takes the place of a head that has not started.
CREATE FUNCTION pgrunner.tasks_serial_join() RETURNS trigger
LANGUAGE plpgsql SECURITY DEFINER AS $$
DECLARE
  h record;
BEGIN
  PERFORM pgrunner.serial_lock(NEW.serial_key);
  SELECT t.id, t.state, t.attempts, t.priority, t.run_at INTO h
    FROM pgrunner.tasks t
   WHERE t.serial_key = NEW.serial_key AND t.state IN ('queued', 'running')
     AND NOT t.serial_held AND t.id <> NEW.id;
  IF NOT FOUND THEN
    NEW.serial_held := false;
  ELSIF NEW.state = 'queued' AND h.state = 'queued' AND h.attempts = 0
        AND (NEW.priority, NEW.run_at, NEW.id) < (h.priority, h.run_at, h.id)
  THEN
    -- A head being claimed or cancelled right now is left alone (no wait:
    -- the claim starts it, the cancel releases the key).
    -- By primary key only (the checks as a row match no partial index,
    -- see 0005's lock_attempt).
    UPDATE pgrunner.tasks t SET serial_held = true
     WHERE t.id = (SELECT x.id FROM pgrunner.tasks x
                    WHERE x.id = h.id
                      AND (x.state, x.serial_held)
                          IS NOT DISTINCT FROM ('queued'::text, false)
                      FOR UPDATE SKIP LOCKED);
    NEW.serial_held := NOT FOUND;
  ELSE
    -- A running task cannot wait; it then meets tasks_serial_head_idx.
    NEW.serial_held := NEW.state = 'queued';
  END IF;
  RETURN NEW;
END
$$;

-- The head of a key ended (or was deleted): the next waiting task of the
-- key becomes the head, and its queue's workers are woken.
CREATE FUNCTION pgrunner.tasks_serial_release() RETURNS trigger
LANGUAGE plpgsql SECURITY DEFINER AS $$
DECLARE
  nxt bigint;
  q text;
BEGIN
  PERFORM pgrunner.serial_lock(OLD.serial_key);
  IF EXISTS (SELECT 1 FROM pgrunner.tasks t
              WHERE t.serial_key = OLD.serial_key
                AND t.state IN ('queued', 'running') AND NOT t.serial_held)
  THEN
    RETURN NULL;
  END IF;
  LOOP
    SELECT x.id INTO nxt FROM pgrunner.tasks x
     WHERE x.serial_key = OLD.serial_key AND x.state = 'queued'
       AND x.serial_held
     ORDER BY x.priority, x.run_at, x.id LIMIT 1;
    IF NOT FOUND THEN
      DELETE FROM pgrunner.serial_keys s WHERE s.key = OLD.serial_key;
      RETURN NULL;
    END IF;
    -- Cancelled meanwhile (cancel_task does not take the key): the next.
    UPDATE pgrunner.tasks t SET serial_held = false
     WHERE t.id = nxt
       AND (t.state, t.serial_held) IS NOT DISTINCT FROM ('queued'::text, true)
    RETURNING t.queue INTO q;
    EXIT WHEN FOUND;
  END LOOP;
  PERFORM pg_notify('pgrunner', q);
  RETURN NULL;
END
$$;

-- Trigger names order the BEFORE ROW triggers: tasks_dedup (a row skipped
-- for its key joins nothing), tasks_policy, then tasks_serial_join.
CREATE TRIGGER tasks_serial_join
  BEFORE INSERT ON pgrunner.tasks
  FOR EACH ROW
  WHEN (NEW.serial_key IS NOT NULL AND NEW.state IN ('queued', 'running'))
  EXECUTE FUNCTION pgrunner.tasks_serial_join();

CREATE TRIGGER tasks_serial_rejoin
  BEFORE UPDATE OF state ON pgrunner.tasks
  FOR EACH ROW
  WHEN (NEW.serial_key IS NOT NULL
        AND OLD.state NOT IN ('queued', 'running')
        AND NEW.state IN ('queued', 'running'))
  EXECUTE FUNCTION pgrunner.tasks_serial_join();

CREATE TRIGGER tasks_serial_release
  AFTER UPDATE OF state ON pgrunner.tasks
  FOR EACH ROW
  WHEN (OLD.serial_key IS NOT NULL AND NOT OLD.serial_held
        AND OLD.state IN ('queued', 'running')
        AND NEW.state NOT IN ('queued', 'running'))
  EXECUTE FUNCTION pgrunner.tasks_serial_release();

CREATE TRIGGER tasks_serial_release_deleted
  AFTER DELETE ON pgrunner.tasks
  FOR EACH ROW
  WHEN (OLD.serial_key IS NOT NULL AND NOT OLD.serial_held
        AND OLD.state IN ('queued', 'running'))
  EXECUTE FUNCTION pgrunner.tasks_serial_release();

-- add_task (0011) with serial_key appended, so every call that worked
-- still does. The old signature goes: with both, a call naming only the
-- first seven arguments would be ambiguous.
DROP FUNCTION pgrunner.add_task(text, jsonb, text, timestamptz, int, int,
                                text);
CREATE FUNCTION pgrunner.add_task(
  kind text,
  payload jsonb DEFAULT '{}',
  queue text DEFAULT 'default',
  run_at timestamptz DEFAULT now(),
  priority int DEFAULT 0,
  max_attempts int DEFAULT NULL,
  key text DEFAULT NULL,
  serial_key text DEFAULT NULL
) RETURNS bigint
LANGUAGE plpgsql AS $$
DECLARE
  new_id bigint;
BEGIN
  -- The existing task may finish between our skipped insert and the look-up;
  -- then the next round's insert goes through.
  FOR i IN 1..3 LOOP
    INSERT INTO pgrunner.tasks AS t
           (kind, payload, queue, run_at, priority, max_attempts, key,
            serial_key)
    VALUES (add_task.kind, coalesce(add_task.payload, '{}'),
            coalesce(add_task.queue, 'default'), coalesce(add_task.run_at, now()),
            coalesce(add_task.priority, 0), add_task.max_attempts,
            add_task.key, add_task.serial_key)
    RETURNING t.id INTO new_id;
    IF new_id IS NOT NULL THEN
      RETURN new_id;
    END IF;
    SELECT t.id INTO new_id FROM pgrunner.tasks t
     WHERE t.key = add_task.key AND t.state IN ('queued', 'running')
     ORDER BY t.id LIMIT 1;
    IF new_id IS NOT NULL THEN
      RETURN new_id;
    END IF;
  END LOOP;
  RAISE EXCEPTION 'pgrunner: could not add task with key %', add_task.key;
END
$$;

------------------------------------------------------------------------
-- 2. Limits per queue: max_running, rate, paused.
--
-- The claim reads pgrunner.queue_limits; a claim of queues without a row
-- costs one look-up in this small table. For a limited queue the claim
-- calls claim_limits(), which locks the queue's row (claims of that queue
-- serialise on it, across workers) and, with a fresh snapshot taken after
-- the lock, says how many tasks it may take; the claim's last step
-- records what it took in the same row, in the same transaction.
--
-- max_running: running_ids holds the tasks claimed from the queue that may
-- still run; each claim drops those no longer running (primary-key
-- look-ups, at most max_running of them) and adds what it claimed.
--
-- rate N/P: starts are counted in 20 buckets of P/20 each (rate_counts,
-- element i is bucket rate_base - i + 1, 42 of them: the window plus as
-- many again for claims whose now() is older than the last recorded one).
-- A claim at time t counts every start recorded in buckets from that of
-- t - P on, a superset of the starts in any window that holds t, so no
-- window of length P ever holds more than N starts (by started_at, which
-- is the claim's now()). The price: a start blocks its whole bucket's
-- worth of window, up to P/20 longer than needed.
--
-- Changing limits takes a SHARE ROW EXCLUSIVE lock on the table; every claim
-- holds ROW EXCLUSIVE on it from before its snapshot (it updates the table),
-- so a change waits for the claims in flight and every later claim sees it.
------------------------------------------------------------------------

CREATE TABLE pgrunner.queue_limits (
  queue       text PRIMARY KEY,
  max_running int,
  rate        text,           -- as given, normalised: 'N/Ps', 'N/Pm', 'N/Ph'
  rate_n      int,
  rate_period interval,
  paused      boolean NOT NULL DEFAULT false,
  running_ids bigint[],
  rate_base   bigint,
  rate_counts int[],
  updated_at  timestamptz NOT NULL DEFAULT now(),
  CONSTRAINT queue_limits_queue_check CHECK (queue <> ''),
  CONSTRAINT queue_limits_max_running_check CHECK (max_running > 0),
  CONSTRAINT queue_limits_rate_check
    CHECK ((rate IS NULL) = (rate_n IS NULL)
           AND (rate_n IS NULL) = (rate_period IS NULL)
           AND rate_n > 0 AND rate_period >= interval '1 second')
);

-- The bucket of time `at` for a rate over `period`: twentieths of it since
-- the epoch (exact: extract gives numeric microseconds).
CREATE FUNCTION pgrunner.rate_bucket(at timestamptz, period interval)
RETURNS bigint
LANGUAGE sql IMMUTABLE AS $$
  SELECT floor(extract(epoch FROM at) * 20 / extract(epoch FROM period))::bigint
$$;

-- Per limited queue among names (the claim's queues, wants its per-queue
-- batch sizes): how many tasks it may take now; when that is none because
-- of its rate, when the window frees a start (the claim's wake-up time);
-- and the state the claim writes back with what it took. Rows are locked
-- in queue order, so claims of overlapping queue lists do not deadlock.
CREATE FUNCTION pgrunner.claim_limits(names text[], wants int[])
RETURNS TABLE (queue text, allow int, wake_at timestamptz, running bigint[],
               rate_base bigint, rate_counts int[], rate_slot int)
LANGUAGE plpgsql AS $$
DECLARE
  l pgrunner.queue_limits;
  nb bigint;
  upto int;
  used int;
  oldest int;
BEGIN
  FOR l IN SELECT * FROM pgrunner.queue_limits x
            WHERE x.queue = ANY (names) ORDER BY x.queue FOR UPDATE
  LOOP
    queue := l.queue;
    allow := wants[array_position(names, l.queue)];
    wake_at := NULL;
    running := NULL;
    rate_base := NULL;
    rate_counts := NULL;
    rate_slot := NULL;
    IF l.paused THEN
      allow := 0;
    END IF;
    IF l.max_running IS NOT NULL THEN
      -- By primary key only: "state = 'running'" would match
      -- tasks_running_idx, which the planner may prefer (see 0005's
      -- lock_attempt).
      running := ARRAY(SELECT t.id FROM pgrunner.tasks t
                        WHERE t.id = ANY (l.running_ids)
                          AND t.state IS NOT DISTINCT FROM 'running');
      allow := least(allow, l.max_running - cardinality(running));
    END IF;
    IF l.rate_n IS NOT NULL THEN
      nb := pgrunner.rate_bucket(now(), l.rate_period);
      rate_base := greatest(l.rate_base, nb);
      rate_counts := array_fill(0, ARRAY[least(rate_base - l.rate_base, 42)::int])
                     || l.rate_counts[1:42 - least(rate_base - l.rate_base, 42)];
      rate_slot := rate_base - nb + 1;
      upto := rate_base - nb + 21;
      IF upto > 42 THEN
        allow := 0;  -- a claim older than the buckets kept: nothing
        rate_slot := NULL;
      ELSE
        used := (SELECT coalesce(sum(c), 0) FROM unnest(rate_counts[1:upto]) c);
        IF used >= l.rate_n THEN
          allow := 0;
          -- The oldest bucket in the window with a start leaves it first.
          SELECT max(i) INTO oldest FROM generate_series(1, upto) i
           WHERE rate_counts[i] > 0;
          wake_at := to_timestamp(((rate_base - oldest + 1 + 21)
                                   * extract(epoch FROM l.rate_period) / 20)
                                  ::double precision)
                     + interval '1 millisecond';
        ELSE
          allow := least(allow, l.rate_n - used);
        END IF;
      END IF;
    END IF;
    allow := greatest(allow, 0);
    RETURN NEXT;
  END LOOP;
END
$$;

-- Parse 'N/P' (P: [count]s|m|h, e.g. 100/1m, 5/s, 1000/2h).
CREATE FUNCTION pgrunner.parse_rate(rate text, OUT n int, OUT period interval)
LANGUAGE plpgsql IMMUTABLE AS $$
DECLARE
  m text[];
BEGIN
  m := regexp_match(rate, '^\s*([0-9]{1,9})\s*/\s*([0-9]{0,6})\s*([smh])\s*$');
  IF m IS NULL THEN
    RAISE EXCEPTION 'pgrunner: queue limit: rate must look like N/period with a period in s, m or h (e.g. 100/1m), not "%"',
      rate USING ERRCODE = 'invalid_parameter_value';
  END IF;
  n := m[1]::int;
  period := coalesce(nullif(m[2], '')::int, 1)
            * CASE m[3] WHEN 's' THEN interval '1 second'
                        WHEN 'm' THEN interval '1 minute'
                        ELSE interval '1 hour' END;
  IF n < 1 OR period < interval '1 second' THEN
    RAISE EXCEPTION 'pgrunner: queue limit: rate must allow at least 1 start in a period of at least 1 second, not "%"',
      rate USING ERRCODE = 'invalid_parameter_value';
  END IF;
  IF period > interval '24 hours' THEN
    RAISE EXCEPTION 'pgrunner: queue limit: the period of a rate is at most 24h, not "%"',
      rate USING ERRCODE = 'invalid_parameter_value';
  END IF;
END
$$;

-- Every change of limits starts here: a queue name, and the table lock
-- (see above) held to commit.
CREATE FUNCTION pgrunner.lock_queue_limits(queue text) RETURNS void
LANGUAGE plpgsql AS $$
BEGIN
  IF queue IS NULL OR queue = '' THEN
    RAISE EXCEPTION 'pgrunner: queue limit: a queue name is required'
      USING ERRCODE = 'invalid_parameter_value';
  END IF;
  LOCK TABLE pgrunner.queue_limits IN SHARE ROW EXCLUSIVE MODE;
END
$$;

-- Set the limits of a queue: max_running and rate replace the queue's
-- (NULL: no such limit); a pause stays as it is. Returns the queue's row.
CREATE FUNCTION pgrunner.set_queue_limit(queue text, max_running int DEFAULT NULL,
                                         rate text DEFAULT NULL)
RETURNS pgrunner.queue_limits
LANGUAGE plpgsql AS $$
#variable_conflict use_column
DECLARE
  cur pgrunner.queue_limits;
  r pgrunner.queue_limits;
  pn int;
  pp interval;
  secs bigint;
BEGIN
  PERFORM pgrunner.lock_queue_limits(set_queue_limit.queue);
  IF set_queue_limit.max_running < 1 THEN
    RAISE EXCEPTION 'pgrunner: queue limit: max_running must be at least 1, not %',
      set_queue_limit.max_running USING ERRCODE = 'invalid_parameter_value';
  END IF;
  IF set_queue_limit.rate IS NOT NULL THEN
    SELECT x.n, x.period INTO pn, pp FROM pgrunner.parse_rate(set_queue_limit.rate) x;
  END IF;
  SELECT * INTO cur FROM pgrunner.queue_limits l
   WHERE l.queue = set_queue_limit.queue;
  r.queue := set_queue_limit.queue;
  r.paused := coalesce(cur.paused, false);
  r.max_running := set_queue_limit.max_running;
  IF r.max_running IS NOT NULL THEN
    -- Counting starts now: what runs in the queue (every claim in flight
    -- has committed, see the lock above).
    r.running_ids := CASE WHEN cur.max_running IS NOT NULL THEN cur.running_ids
                          ELSE ARRAY(SELECT t.id FROM pgrunner.tasks t
                                      WHERE t.state = 'running'
                                        AND t.queue = set_queue_limit.queue)
                     END;
  END IF;
  IF pn IS NOT NULL THEN
    secs := extract(epoch FROM pp)::bigint;
    r.rate := pn || '/' || CASE WHEN secs % 3600 = 0 THEN secs / 3600 || 'h'
                                WHEN secs % 60 = 0 THEN secs / 60 || 'm'
                                ELSE secs || 's' END;
    r.rate_n := pn;
    r.rate_period := pp;
    IF cur.rate_period = pp THEN
      r.rate_base := cur.rate_base;
      r.rate_counts := cur.rate_counts;
    ELSE
      r.rate_base := pgrunner.rate_bucket(now(), pp);
      r.rate_counts := array_fill(0, ARRAY[42]);
    END IF;
  END IF;
  IF r.max_running IS NULL AND r.rate IS NULL AND NOT r.paused THEN
    DELETE FROM pgrunner.queue_limits l WHERE l.queue = r.queue;
  ELSE
    INSERT INTO pgrunner.queue_limits AS l
           (queue, max_running, rate, rate_n, rate_period, paused,
            running_ids, rate_base, rate_counts)
    VALUES (r.queue, r.max_running, r.rate, r.rate_n, r.rate_period, r.paused,
            r.running_ids, r.rate_base, r.rate_counts)
    ON CONFLICT (queue) DO UPDATE
       SET max_running = EXCLUDED.max_running, rate = EXCLUDED.rate,
           rate_n = EXCLUDED.rate_n, rate_period = EXCLUDED.rate_period,
           running_ids = EXCLUDED.running_ids,
           rate_base = EXCLUDED.rate_base, rate_counts = EXCLUDED.rate_counts,
           updated_at = now()
    RETURNING l.* INTO r;
  END IF;
  -- A raised or removed limit may let waiting tasks go.
  PERFORM pg_notify('pgrunner', r.queue);
  RETURN r;
END
$$;

-- Remove the max_running and rate limits of a queue (a pause stays); true
-- if it had any.
CREATE FUNCTION pgrunner.drop_queue_limit(queue text) RETURNS boolean
LANGUAGE plpgsql AS $$
#variable_conflict use_column
DECLARE
  had boolean;
BEGIN
  PERFORM pgrunner.lock_queue_limits(drop_queue_limit.queue);
  SELECT l.max_running IS NOT NULL OR l.rate IS NOT NULL INTO had
    FROM pgrunner.queue_limits l WHERE l.queue = drop_queue_limit.queue;
  PERFORM pgrunner.set_queue_limit(drop_queue_limit.queue);
  RETURN coalesce(had, false);
END
$$;

-- Pause: no task of the queue is claimed until resume_queue (running ones
-- finish). Once pause_queue has committed, no claim takes one. Both return
-- true when they changed something.
CREATE FUNCTION pgrunner.pause_queue(queue text) RETURNS boolean
LANGUAGE plpgsql AS $$
#variable_conflict use_column
BEGIN
  PERFORM pgrunner.lock_queue_limits(pause_queue.queue);
  INSERT INTO pgrunner.queue_limits AS l (queue, paused)
  VALUES (pause_queue.queue, true)
  ON CONFLICT (queue) DO UPDATE SET paused = true, updated_at = now()
   WHERE NOT l.paused;
  RETURN FOUND;
END
$$;

CREATE FUNCTION pgrunner.resume_queue(queue text) RETURNS boolean
LANGUAGE plpgsql AS $$
#variable_conflict use_column
DECLARE
  was boolean;
BEGIN
  PERFORM pgrunner.lock_queue_limits(resume_queue.queue);
  UPDATE pgrunner.queue_limits l SET paused = false, updated_at = now()
   WHERE l.queue = resume_queue.queue AND l.paused;
  was := FOUND;
  DELETE FROM pgrunner.queue_limits l
   WHERE l.queue = resume_queue.queue AND NOT l.paused
     AND l.max_running IS NULL AND l.rate IS NULL;
  IF was THEN
    PERFORM pg_notify('pgrunner', resume_queue.queue);
  END IF;
  RETURN was;
END
$$;

------------------------------------------------------------------------
-- Roles (0013): a producer may set serial_key; the new tables and
-- functions. setup_roles as 0013 defined it, plus those grants.
------------------------------------------------------------------------
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
                              pgrunner.retry_task(bigint)
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

-- The triggers run as their owner: a fixed search_path.
ALTER FUNCTION pgrunner.tasks_serial_join()
  SET search_path = pg_catalog, pg_temp;
ALTER FUNCTION pgrunner.tasks_serial_release()
  SET search_path = pg_catalog, pg_temp;

-- As 0005 and 0006 did for the others: index lookups only, no JIT.
DO $$
DECLARE
  f regprocedure;
BEGIN
  FOR f IN SELECT p.oid::regprocedure FROM pg_proc p
            WHERE p.pronamespace = 'pgrunner'::regnamespace
              AND p.proname IN ('add_task', 'serial_lock', 'tasks_serial_join',
                                'tasks_serial_release', 'claim_limits',
                                'set_queue_limit', 'drop_queue_limit',
                                'pause_queue', 'resume_queue')
  LOOP
    EXECUTE format('ALTER FUNCTION %s SET enable_seqscan = off', f);
    EXECUTE format('ALTER FUNCTION %s SET enable_bitmapscan = off', f);
    EXECUTE format('ALTER FUNCTION %s SET jit = off', f);
  END LOOP;
END
$$;
