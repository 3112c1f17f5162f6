-- 0003_attempt_end_time: a task's finished_at is when its attempt ended.
--
-- Until now the success mark ran first in the attempt's transaction (so the
-- whole transaction of a SQL task could travel as one pipeline) and took
-- now(), the transaction's start: finished_at - started_at said nothing
-- about how long the handler ran. The attempt now locks and checks its row
-- first, runs the handler, and marks success last, with clock_timestamp().
-- The pipeline stays one round trip: BEGIN; lock_attempt; the handler's
-- call; complete_attempt; COMMIT.
--
-- pgrunner migrate runs this inside one transaction, under an advisory lock,
-- and records it in pgrunner.migrations.

-- Lock the task row and check the attempt is still the caller's; raise
-- PR001 if not, PR003 if someone asked to cancel it meanwhile. Nothing is
-- written: the row lock alone keeps recovery (SKIP LOCKED) and other
-- transitions away until COMMIT or ROLLBACK.
CREATE FUNCTION pgrunner.lock_attempt(task bigint, attempt int, worker bigint)
RETURNS void
LANGUAGE plpgsql AS $$
BEGIN
  PERFORM 1 FROM pgrunner.tasks t
   WHERE t.id = task AND t.state = 'running' AND t.attempts = attempt
     AND t.worker_id = worker
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

-- Mark a locked attempt succeeded, after its handler ran. PR001 if the row
-- is not the caller's attempt (cannot happen under lock_attempt's lock, but
-- a caller that skipped it must not succeed by accident).
CREATE FUNCTION pgrunner.complete_attempt(task bigint, attempt int,
                                          worker bigint)
RETURNS void
LANGUAGE plpgsql AS $$
BEGIN
  UPDATE pgrunner.tasks t
     SET state = 'succeeded', finished_at = clock_timestamp(),
         last_error = NULL
   WHERE t.id = task AND t.state = 'running' AND t.attempts = attempt
     AND t.worker_id = worker;
  IF NOT FOUND THEN
    RAISE EXCEPTION 'pgrunner: attempt % of task % is no longer this worker''s',
      attempt, task USING ERRCODE = 'PR001';
  END IF;
END
$$;

-- mark_succeeded (0001) is what workers older than this migration call. It
-- becomes the two steps above, so the checks and the mark live in one place.
CREATE OR REPLACE FUNCTION pgrunner.mark_succeeded(task bigint, attempt int,
                                                   worker bigint)
RETURNS void
LANGUAGE plpgsql AS $$
BEGIN
  PERFORM pgrunner.lock_attempt(task, attempt, worker);
  PERFORM pgrunner.complete_attempt(task, attempt, worker);
END
$$;
