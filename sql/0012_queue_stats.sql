-- 0012: per-minute task outcomes per queue, for the dashboard's charts.
--
-- Counting finished tasks in pgrunner.tasks reads every task of the last
-- hour (millions on a busy queue). Instead each worker adds what its threads
-- finished to one row per (minute, queue) every ten seconds, so a chart of
-- the last hour reads at most 60 rows per queue, and the writes are a few
-- upserts a minute per worker, never one per task.
CREATE TABLE pgrunner.queue_stats (
  minute    timestamptz NOT NULL,
  queue     text NOT NULL,
  succeeded bigint NOT NULL DEFAULT 0,
  failed    bigint NOT NULL DEFAULT 0, -- failed for good
  retried   bigint NOT NULL DEFAULT 0, -- failed attempts queued again
  PRIMARY KEY (minute, queue)
);

-- Add a worker's counts since its last report to the current minute, and
-- forget minutes older than a day.
CREATE FUNCTION pgrunner.record_stats(queues text[], succeeded bigint[],
                                      failed bigint[], retried bigint[])
RETURNS void
LANGUAGE sql
SET jit = off
AS $$
  INSERT INTO pgrunner.queue_stats AS s (minute, queue, succeeded, failed,
                                         retried)
  SELECT date_trunc('minute', now()), x.q, x.su, x.fa, x.re
    FROM unnest(queues, succeeded, failed, retried) AS x(q, su, fa, re)
  ON CONFLICT (minute, queue) DO UPDATE
     SET succeeded = s.succeeded + EXCLUDED.succeeded,
         failed = s.failed + EXCLUDED.failed,
         retried = s.retried + EXCLUDED.retried;
  DELETE FROM pgrunner.queue_stats s
   WHERE s.minute < date_trunc('minute', now()) - interval '1 day';
$$;
