-- 0011_retry_policies: how often and how patiently a task is retried is a
-- policy per kind and per queue, not a constant.
--
-- Until now every task got max_attempts = 5 (the column's default) and the
-- backoff 1, 2, 4, 8 s: a queued email failed for good after a 15-second
-- outage of its mail server, where MTAs retry for days.
--
-- A policy gives max_attempts, the first delay (base, doubled after each
-- failed attempt), the longest delay (cap) and the jitter (each delay is
-- multiplied by a random factor in [1 - jitter, 1 + jitter)). It applies to
-- a kind, a queue, both, or (both NULL) to every task; the most specific
-- one that matches a task wins: kind and queue, then kind, then queue, then
-- the catch-all row, then the built-in 5 attempts, 1 s, 1 h, 0.5, which is
-- the backoff of every release before this one.
--
-- max_attempts is fixed when the task is inserted: the column's default is
-- gone, and a BEFORE INSERT trigger (it fires for COPY too) fills it in
-- from the policy when the inserter left it NULL. A task whose inserter
-- set it keeps its own. The delays are read from the policy when a retry is
-- scheduled, so a changed policy applies to the next retry of every task.
--
-- pgrunner migrate runs this inside one transaction, under an advisory lock,
-- and records it in pgrunner.migrations.

CREATE TABLE pgrunner.retry_policies (
  kind         text,             -- NULL: any kind
  queue        text,             -- NULL: any queue
  max_attempts int NOT NULL,
  base         interval NOT NULL,
  cap          interval NOT NULL,
  jitter       double precision NOT NULL,
  updated_at   timestamptz NOT NULL DEFAULT now(),
  CONSTRAINT retry_policies_kind_check CHECK (kind <> ''),
  CONSTRAINT retry_policies_queue_check CHECK (queue <> ''),
  CONSTRAINT retry_policies_max_attempts_check CHECK (max_attempts >= 1),
  CONSTRAINT retry_policies_base_check CHECK (base > interval '0'),
  CONSTRAINT retry_policies_cap_check
    CHECK (cap >= base AND cap <= interval '1 year'),
  CONSTRAINT retry_policies_jitter_check CHECK (jitter >= 0 AND jitter <= 1)
);

-- One policy per scope; NULL (any) is stored as itself but indexed as ''
-- (no kind or queue is '', see the CHECKs of both tables). The look-up of a
-- task's policy reads at most the four entries of its scopes here.
CREATE UNIQUE INDEX retry_policies_scope_idx
  ON pgrunner.retry_policies ((coalesce(kind, '')), (coalesce(queue, '')));

-- The email kind's default outlasts a day-long outage of the mail server.
-- Delays 30 s, 1 min, 2 min ... 32 min (7 of them, 3,810 s), then 1 h for
-- each of the 32 retries after those: 39 delays between 40 attempts,
-- 119,010 s (33 h) without jitter and, with every factor at its low end
-- (0.8), 95,208 s (26.4 h) between the first attempt and the last.
INSERT INTO pgrunner.retry_policies (kind, queue, max_attempts, base, cap,
                                     jitter)
VALUES ('email', NULL, 40, interval '30 seconds', interval '1 hour', 0.2);

-- The policy that applies to a task of this kind in this queue, the scope
-- of the row it came from, and built_in = true when no row matches. kind
-- or queue NULL matches only the rows for any kind or any queue.
CREATE FUNCTION pgrunner.retry_policy(kind text, queue text,
  OUT max_attempts int, OUT base interval, OUT cap interval,
  OUT jitter double precision, OUT policy_kind text, OUT policy_queue text,
  OUT built_in boolean)
LANGUAGE plpgsql STABLE
SET enable_seqscan = off SET enable_bitmapscan = off SET jit = off
AS $$
BEGIN
  SELECT p.max_attempts, p.base, p.cap, p.jitter, p.kind, p.queue, false
    INTO max_attempts, base, cap, jitter, policy_kind, policy_queue, built_in
    FROM pgrunner.retry_policies p
   WHERE coalesce(p.kind, '') = ANY (ARRAY[retry_policy.kind, ''])
     AND coalesce(p.queue, '') = ANY (ARRAY[retry_policy.queue, ''])
   ORDER BY p.kind IS NULL, p.queue IS NULL
   LIMIT 1;
  IF NOT FOUND THEN
    max_attempts := 5;
    base := interval '1 second';
    cap := interval '1 hour';
    jitter := 0.5;
    built_in := true;
  END IF;
END
$$;

-- Fills in max_attempts of a row inserted without one (plain INSERT, COPY,
-- add_task and schedules without it). It fires after tasks_dedup (row
-- triggers fire in name order), so a row skipped for its key costs nothing.
--
-- A look-up per row (pgrunner.retry_policy(), an index scan) would make a
-- bulk insert of 100,000 rows three to four times slower (measured: 0.6 s
-- -> 2.3-3 s on the development machine). The answer for the last (kind,
-- queue) is kept for the rest of the statement in a transaction-local
-- setting instead, which the statement trigger below empties before each
-- INSERT or COPY: one look-up per statement and run of rows of one kind
-- and queue. The key is length(kind) kind queue,
-- so no other (kind, queue) can read as it. Neither function may carry SET
-- clauses: a function's SET clause undoes set_config(.., true) at its exit.
CREATE FUNCTION pgrunner.tasks_policy() RETURNS trigger
LANGUAGE plpgsql AS $$
DECLARE
  scope text := length(NEW.kind) || ' ' || NEW.kind || NEW.queue || ' ';
  cached text := current_setting('pgrunner.retry_policy_cache', true);
BEGIN
  IF starts_with(cached, scope) THEN
    NEW.max_attempts := substr(cached, length(scope) + 1);
    RETURN NEW;
  END IF;
  SELECT r.max_attempts INTO NEW.max_attempts
    FROM pgrunner.retry_policy(NEW.kind, NEW.queue) r;
  PERFORM set_config('pgrunner.retry_policy_cache',
                     scope || NEW.max_attempts, true);
  RETURN NEW;
END
$$;

CREATE FUNCTION pgrunner.tasks_policy_reset() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
  PERFORM set_config('pgrunner.retry_policy_cache', '', true);
  RETURN NULL;
END
$$;

ALTER TABLE pgrunner.tasks ALTER COLUMN max_attempts DROP DEFAULT;

CREATE TRIGGER tasks_policy_reset
  BEFORE INSERT ON pgrunner.tasks
  FOR EACH STATEMENT EXECUTE FUNCTION pgrunner.tasks_policy_reset();

CREATE TRIGGER tasks_policy
  BEFORE INSERT ON pgrunner.tasks
  FOR EACH ROW WHEN (NEW.max_attempts IS NULL)
  EXECUTE FUNCTION pgrunner.tasks_policy();

-- set_retry_policy: create or change the policy of a scope (kind and/or
-- queue; both NULL: every task). An argument left out (NULL) keeps the
-- scope's current value, or for a new scope the value that applies to it
-- now (copied: a later change of the broader policy does not flow into
-- it). Bad values raise invalid_parameter_value and change nothing.
-- Returns the scope's row as it now is.
CREATE FUNCTION pgrunner.set_retry_policy(
  kind text DEFAULT NULL,
  queue text DEFAULT NULL,
  max_attempts int DEFAULT NULL,
  base interval DEFAULT NULL,
  cap interval DEFAULT NULL,
  jitter double precision DEFAULT NULL
) RETURNS pgrunner.retry_policies
LANGUAGE plpgsql
SET enable_seqscan = off SET enable_bitmapscan = off SET jit = off
AS $$
#variable_conflict use_column
DECLARE
  cur record;
  r pgrunner.retry_policies;
BEGIN
  IF kind = '' OR queue = '' THEN
    RAISE EXCEPTION 'pgrunner: retry policy: kind and queue are NULL (any) or a name, not an empty string'
      USING ERRCODE = 'invalid_parameter_value';
  END IF;
  -- Changes of policies wait for each other (readers do not wait), so
  -- that the values kept below are the ones the upsert overwrites.
  LOCK TABLE pgrunner.retry_policies IN SHARE ROW EXCLUSIVE MODE;
  SELECT * INTO cur
    FROM pgrunner.retry_policy(set_retry_policy.kind, set_retry_policy.queue);
  r.kind := set_retry_policy.kind;
  r.queue := set_retry_policy.queue;
  r.max_attempts := coalesce(set_retry_policy.max_attempts, cur.max_attempts);
  r.base := coalesce(set_retry_policy.base, cur.base);
  r.cap := coalesce(set_retry_policy.cap, cur.cap);
  r.jitter := coalesce(set_retry_policy.jitter, cur.jitter);
  IF r.max_attempts < 1 THEN
    RAISE EXCEPTION 'pgrunner: retry policy: max_attempts must be at least 1, not %',
      r.max_attempts USING ERRCODE = 'invalid_parameter_value';
  END IF;
  IF r.base <= interval '0' THEN
    RAISE EXCEPTION 'pgrunner: retry policy: base must be a positive interval, not %',
      r.base USING ERRCODE = 'invalid_parameter_value';
  END IF;
  IF r.cap < r.base THEN
    RAISE EXCEPTION 'pgrunner: retry policy: cap (%) must be at least base (%)',
      r.cap, r.base USING ERRCODE = 'invalid_parameter_value';
  END IF;
  IF r.cap > interval '1 year' THEN
    RAISE EXCEPTION 'pgrunner: retry policy: cap must be at most 1 year, not %',
      r.cap USING ERRCODE = 'invalid_parameter_value';
  END IF;
  IF NOT (r.jitter >= 0 AND r.jitter <= 1) THEN
    RAISE EXCEPTION 'pgrunner: retry policy: jitter must be between 0 and 1, not %',
      r.jitter USING ERRCODE = 'invalid_parameter_value';
  END IF;
  INSERT INTO pgrunner.retry_policies AS p
         (kind, queue, max_attempts, base, cap, jitter)
  VALUES (r.kind, r.queue, r.max_attempts, r.base, r.cap, r.jitter)
  ON CONFLICT ((coalesce(kind, '')), (coalesce(queue, ''))) DO UPDATE
     SET max_attempts = excluded.max_attempts, base = excluded.base,
         cap = excluded.cap, jitter = excluded.jitter, updated_at = now()
  RETURNING p.* INTO r;
  RETURN r;
END
$$;

-- drop_retry_policy: remove the policy of a scope; true if there was one.
-- Its tasks fall back to the next policy that matches them (for the email
-- kind's built-in row: the built-in 5 attempts).
CREATE FUNCTION pgrunner.drop_retry_policy(kind text DEFAULT NULL,
                                           queue text DEFAULT NULL)
RETURNS boolean
LANGUAGE plpgsql
SET enable_seqscan = off SET enable_bitmapscan = off SET jit = off
AS $$
BEGIN
  DELETE FROM pgrunner.retry_policies p
   WHERE coalesce(p.kind, '') = coalesce(drop_retry_policy.kind, '')
     AND coalesce(p.queue, '') = coalesce(drop_retry_policy.queue, '');
  RETURN FOUND;
END
$$;

-- add_task (0001): max_attempts defaults to NULL, so that the policy fills
-- it in; a value given is kept. Same signature, so every call that worked
-- still does.
CREATE OR REPLACE FUNCTION pgrunner.add_task(
  kind text,
  payload jsonb DEFAULT '{}',
  queue text DEFAULT 'default',
  run_at timestamptz DEFAULT now(),
  priority int DEFAULT 0,
  max_attempts int DEFAULT NULL,
  key text DEFAULT NULL
) RETURNS bigint
LANGUAGE plpgsql
SET enable_seqscan = off SET enable_bitmapscan = off SET jit = off
AS $$
DECLARE
  new_id bigint;
BEGIN
  -- The existing task may finish between our skipped insert and the look-up;
  -- then the next round's insert goes through.
  FOR i IN 1..3 LOOP
    INSERT INTO pgrunner.tasks AS t
           (kind, payload, queue, run_at, priority, max_attempts, key)
    VALUES (add_task.kind, coalesce(add_task.payload, '{}'),
            coalesce(add_task.queue, 'default'), coalesce(add_task.run_at, now()),
            coalesce(add_task.priority, 0), add_task.max_attempts,
            add_task.key)
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

-- finish_attempt (0005): a retry's delay comes from the task's policy:
-- least(base * 2^(attempt - 1), cap) times a factor in
-- [1 - jitter, 1 + jitter). The built-in policy gives what 0005 did.
CREATE OR REPLACE FUNCTION pgrunner.finish_attempt(task bigint, attempt int,
                                                   worker bigint, outcome text,
                                                   error text)
RETURNS TABLE (new_state text, run_at_ms bigint)
LANGUAGE plpgsql
SET enable_seqscan = off SET enable_bitmapscan = off SET jit = off
AS $$
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
  st := CASE
          WHEN outcome = 'cancel' THEN 'cancelled'
          WHEN outcome = 'requeue' THEN 'queued'
          WHEN outcome = 'permanent' OR t.attempts >= t.max_attempts THEN 'failed'
          ELSE 'queued' END;
  IF outcome = 'cancel' THEN
    DELETE FROM pgrunner.cancel_requests c WHERE c.task_id = task;
  END IF;
  IF st = 'queued' AND outcome <> 'requeue' THEN
    SELECT * INTO pol FROM pgrunner.retry_policy(t.kind, t.queue);
    -- The exponent is bounded so that 2^n stays a finite double whatever
    -- max_attempts a task has; the cap is reached long before.
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
