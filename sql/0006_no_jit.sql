-- 0006: no JIT compilation in pgrunner's own functions.
--
-- 0005 priced whole-table reads out of these functions (enable_seqscan =
-- off). A statement that has no index to use keeps its sequential scan at
-- the penalty price (10^10), far above jit_above_cost, so the server
-- compiled it with LLVM at every call: the heartbeat's look at the tiny
-- workers table took over 100 ms of CPU a second on a busy server. Their
-- statements are index lookups or reads of a few rows; compiling never
-- pays.
DO $$
DECLARE
  f regprocedure;
BEGIN
  FOR f IN SELECT p.oid::regprocedure FROM pg_proc p
            WHERE p.pronamespace = 'pgrunner'::regnamespace
              AND EXISTS (SELECT 1 FROM unnest(p.proconfig) c
                           WHERE c = 'enable_seqscan=off')
  LOOP
    EXECUTE format('ALTER FUNCTION %s SET jit = off', f);
  END LOOP;
END
$$;
