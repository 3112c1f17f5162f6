-- 0002_schedules: recurring tasks. A schedule adds one task of its kind at
-- each slot of a 5-field cron expression, evaluated in the schedule's time
-- zone. Workers fire due schedules from their heartbeat (one worker at a
-- time, under the heartbeat's advisory lock); row locks make each slot add
-- exactly one task however many callers race.
--
-- pgrunner migrate runs this inside one transaction, under an advisory lock,
-- and records it in pgrunner.migrations.

-- A parsed cron expression. The *_next arrays answer "the first allowed
-- value at or after x" with one subscript (-1: none left), so the search in
-- cron_next_local jumps instead of stepping minute by minute.
CREATE TYPE pgrunner.cron_spec AS (
  minute_next int[],  -- [1..60]: for minute x at subscript x + 1
  hour_next   int[],  -- [1..24]: for hour x at subscript x + 1
  dom_next    int[],  -- [1..31]: for day x at subscript x
  month_next  int[],  -- [1..12]: for month x at subscript x
  dom_bits    bigint, -- bit d set: day-of-month d allowed
  dow_bits    int,    -- bit w set: weekday w allowed (0 = Sunday)
  dom_star    boolean, -- the day-of-month field starts with '*'
  dow_star    boolean  -- the day-of-week field starts with '*'
);

-- One field of a cron expression -> a bitmask of its allowed values (bit v
-- for value v). `cron` and `what` only make the error messages.
CREATE FUNCTION pgrunner.cron_field(cron text, field text, what text,
                                    lo int, hi int, names text[])
RETURNS bigint
LANGUAGE plpgsql IMMUTABLE AS $$
DECLARE
  elem text;
  m text[];
  p int;
  tok text;
  bits bigint := 0;
  is_dow boolean := what = 'day-of-week';
  -- '*' spans lo..star_hi; the day-of-week field also takes 7 for Sunday.
  star_hi int := CASE WHEN what = 'day-of-week' THEN 6 ELSE hi END;
  a int;
  b int;
  step int;
  v int;
  prefix text := format('pgrunner: invalid cron expression "%s": %s field "%s"',
                        cron, what, field);
BEGIN
  FOREACH elem IN ARRAY string_to_array(lower(field), ',') LOOP
    -- (A match test, then plain string cuts: regexp_match with capture
    -- groups costs about a millisecond a call.)
    IF elem !~ '^(\*|[a-z0-9]+(-[a-z0-9]+)?)(/[0-9]+)?$' THEN
      RAISE EXCEPTION '%: "%" is not a value, a range a-b, * or a step */n',
                      prefix, elem
        USING ERRCODE = 'invalid_parameter_value',
              HINT = 'fields: minute hour day-of-month month day-of-week, '
                     'e.g. "*/15 9-17 * * mon-fri"';
    END IF;
    -- m: {start, end or NULL, step or NULL}
    m := ARRAY[elem, NULL, NULL];
    p := strpos(elem, '/');
    IF p > 0 THEN
      m[1] := left(elem, p - 1);
      m[3] := substr(elem, p + 1);
    END IF;
    p := strpos(m[1], '-');
    IF p > 0 THEN
      m[2] := substr(m[1], p + 1);
      m[1] := left(m[1], p - 1);
    END IF;

    -- The values of the element's start and end (names or numbers).
    FOR i IN 1..2 LOOP
      tok := m[i];
      CONTINUE WHEN tok IS NULL OR tok = '*';
      IF tok ~ '^[0-9]+$' THEN
        v := CASE WHEN length(tok) > 4 THEN 99999 ELSE tok::int END;
        IF v < lo OR v > hi THEN
          RAISE EXCEPTION '%: % is out of range %-%', prefix, tok, lo, hi
            USING ERRCODE = 'invalid_parameter_value';
        END IF;
      ELSE
        v := array_position(names, tok);
        IF v IS NULL THEN
          RAISE EXCEPTION '%: unknown name "%"%', prefix, tok,
                          CASE WHEN names IS NULL THEN ' (numbers only here)'
                               ELSE ' (use ' || array_to_string(names, ', ')
                                    || ')' END
            USING ERRCODE = 'invalid_parameter_value';
        END IF;
        v := v - 1 + lo;
      END IF;
      IF i = 1 THEN a := v; ELSE b := v; END IF;
    END LOOP;

    step := 1;
    IF m[3] IS NOT NULL THEN
      step := CASE WHEN length(m[3]) > 4 THEN 99999 ELSE m[3]::int END;
      IF step < 1 OR step > star_hi - lo + 1 THEN
        RAISE EXCEPTION '%: step % is out of range 1-%', prefix, m[3],
                        star_hi - lo + 1
          USING ERRCODE = 'invalid_parameter_value';
      END IF;
    END IF;

    IF m[1] = '*' THEN
      a := lo;
      b := star_hi;
    ELSIF m[2] IS NULL THEN
      -- "a/n" means "a-max/n"; a plain "a" is itself.
      b := CASE WHEN m[3] IS NOT NULL THEN star_hi ELSE a END;
    ELSIF is_dow AND b = 0 AND a > 0 THEN
      -- "fri-sun": a range may end on Sunday, read as 7.
      b := 7;
    END IF;
    IF a > b THEN
      RAISE EXCEPTION '%: range "%" runs backwards', prefix, elem
        USING ERRCODE = 'invalid_parameter_value';
    END IF;

    v := a;
    WHILE v <= b LOOP
      bits := bits
              | (1::bigint << CASE WHEN is_dow AND v = 7 THEN 0 ELSE v END);
      v := v + step;
    END LOOP;
  END LOOP;
  RETURN bits;
END
$$;

-- Parse and validate a cron expression: 5 fields (minute hour day-of-month
-- month day-of-week) or a macro. Raises invalid_parameter_value with a
-- message naming the bad field, or saying that the expression never fires.
-- As in Vixie cron, a day-of-month or day-of-week field that starts with '*'
-- is unrestricted; when both are restricted a day matches if either does.
CREATE FUNCTION pgrunner.cron_parse(cron text) RETURNS pgrunner.cron_spec
LANGUAGE plpgsql IMMUTABLE STRICT AS $$
DECLARE
  expr text := btrim(cron, E' \t\r\n');
  f text[];
  bits bigint[] := '{}';
  spec pgrunner.cron_spec;
  lens int[] := '{31,29,31,30,31,30,31,31,30,31,30,31}';
  nxt int;
  mday int;
  ok boolean := false;
BEGIN
  IF expr LIKE '@%' THEN
    expr := CASE lower(expr)
              WHEN '@yearly' THEN '0 0 1 1 *'
              WHEN '@annually' THEN '0 0 1 1 *'
              WHEN '@monthly' THEN '0 0 1 * *'
              WHEN '@weekly' THEN '0 0 * * 0'
              WHEN '@daily' THEN '0 0 * * *'
              WHEN '@midnight' THEN '0 0 * * *'
              WHEN '@hourly' THEN '0 * * * *'
            END;
    IF expr IS NULL THEN
      RAISE EXCEPTION 'pgrunner: invalid cron expression "%": unknown macro '
                      '(use @yearly, @annually, @monthly, @weekly, @daily, '
                      '@midnight or @hourly)', cron
        USING ERRCODE = 'invalid_parameter_value';
    END IF;
  END IF;

  f := CASE WHEN expr = '' THEN '{}'::text[]
            ELSE regexp_split_to_array(expr, '\s+') END;
  IF cardinality(f) <> 5 THEN
    RAISE EXCEPTION 'pgrunner: invalid cron expression "%": expected 5 fields '
                    '(minute hour day-of-month month day-of-week), got %',
                    cron, cardinality(f)
      USING ERRCODE = 'invalid_parameter_value',
            HINT = 'e.g. "*/15 9-17 * * mon-fri" or "@daily"';
  END IF;

  bits := ARRAY[
    pgrunner.cron_field(cron, f[1], 'minute', 0, 59, NULL),
    pgrunner.cron_field(cron, f[2], 'hour', 0, 23, NULL),
    pgrunner.cron_field(cron, f[3], 'day-of-month', 1, 31, NULL),
    pgrunner.cron_field(cron, f[4], 'month', 1, 12,
      '{jan,feb,mar,apr,may,jun,jul,aug,sep,oct,nov,dec}'),
    pgrunner.cron_field(cron, f[5], 'day-of-week', 0, 7,
      '{sun,mon,tue,wed,thu,fri,sat}')];

  spec.dom_bits := bits[3];
  spec.dow_bits := bits[5]::int;
  spec.dom_star := f[3] LIKE '*%';
  spec.dow_star := f[5] LIKE '*%';

  -- The "next allowed value" tables, filled from the top down.
  spec.minute_next := array_fill(-1, ARRAY[60]);
  spec.hour_next := array_fill(-1, ARRAY[24]);
  spec.dom_next := array_fill(-1, ARRAY[31]);
  spec.month_next := array_fill(-1, ARRAY[12]);
  nxt := -1;
  FOR v IN REVERSE 59..0 LOOP
    IF (bits[1] >> v) & 1 = 1 THEN nxt := v; END IF;
    spec.minute_next[v + 1] := nxt;
  END LOOP;
  nxt := -1;
  FOR v IN REVERSE 23..0 LOOP
    IF (bits[2] >> v) & 1 = 1 THEN nxt := v; END IF;
    spec.hour_next[v + 1] := nxt;
  END LOOP;
  nxt := -1;
  FOR v IN REVERSE 31..1 LOOP
    IF (bits[3] >> v) & 1 = 1 THEN nxt := v; END IF;
    spec.dom_next[v] := nxt;
  END LOOP;
  nxt := -1;
  FOR v IN REVERSE 12..1 LOOP
    IF (bits[4] >> v) & 1 = 1 THEN nxt := v; END IF;
    spec.month_next[v] := nxt;
  END LOOP;

  -- Only a restricted day-of-month with an unrestricted day-of-week can
  -- never fire: then some allowed month must be long enough (February has
  -- 29 days in leap years). Otherwise every weekday occurs in every month,
  -- and a '*' day-of-month field always allows the 1st.
  IF spec.dow_star AND NOT spec.dom_star THEN
    mday := spec.dom_next[1];
    FOR mo IN 1..12 LOOP
      IF (bits[4] >> mo) & 1 = 1 AND lens[mo] >= mday THEN
        ok := true;
      END IF;
    END LOOP;
    IF NOT ok THEN
      RAISE EXCEPTION 'pgrunner: invalid cron expression "%": it never fires '
                      '(no month in "%" has a day in "%")', cron, f[4], f[3]
        USING ERRCODE = 'invalid_parameter_value';
    END IF;
  END IF;
  RETURN spec;
END
$$;

-- The first wall-clock time at or after `start` (rounded up to the minute)
-- that the expression allows, as a timestamp without time zone; NULL if
-- there is none within 400 years (a full cycle of the Gregorian calendar).
-- Iterates months, then days, then hours, then minutes, jumping over the
-- values the fields exclude.
CREATE FUNCTION pgrunner.cron_next_local(spec pgrunner.cron_spec,
                                         start timestamp)
RETURNS timestamp
LANGUAGE plpgsql IMMUTABLE STRICT AS $$
DECLARE
  s timestamp := date_trunc('minute', start);
  y int;
  mo int;
  d int;
  h int;
  mi int;
  ylimit int;
  last int;
  v int;
  w int;
  dd int;
BEGIN
  IF s < start THEN
    s := s + interval '1 minute';
  END IF;
  y := extract(year FROM s)::int;
  mo := extract(month FROM s)::int;
  d := extract(day FROM s)::int;
  h := extract(hour FROM s)::int;
  mi := extract(minute FROM s)::int;
  ylimit := y + 400;
  LOOP
    IF y > ylimit THEN
      RETURN NULL;
    END IF;

    v := spec.month_next[mo];
    IF v < 0 THEN
      y := y + 1; mo := 1; d := 1; h := 0; mi := 0;
      CONTINUE;
    END IF;
    IF v <> mo THEN
      mo := v; d := 1; h := 0; mi := 0;
    END IF;
    last := CASE
              WHEN mo = 2 THEN
                CASE WHEN (y % 4 = 0 AND y % 100 <> 0) OR y % 400 = 0
                     THEN 29 ELSE 28 END
              WHEN mo IN (4, 6, 9, 11) THEN 30
              ELSE 31
            END;

    dd := NULL;
    IF spec.dom_star OR spec.dow_star THEN
      -- Both fields must match: walk the allowed days of the month.
      v := CASE WHEN d <= 31 THEN spec.dom_next[d] ELSE -1 END;
      WHILE v > 0 AND v <= last LOOP
        IF spec.dow_star
           OR (spec.dow_bits >> extract(dow FROM make_date(y, mo, v))::int)
              & 1 = 1 THEN
          dd := v;
          EXIT;
        END IF;
        v := CASE WHEN v < 31 THEN spec.dom_next[v + 1] ELSE -1 END;
      END LOOP;
    ELSIF d <= last THEN
      -- Both restricted: either may match.
      v := d;
      w := extract(dow FROM make_date(y, mo, d))::int;
      WHILE v <= last LOOP
        IF (spec.dom_bits >> v) & 1 = 1 OR (spec.dow_bits >> w) & 1 = 1 THEN
          dd := v;
          EXIT;
        END IF;
        v := v + 1;
        w := (w + 1) % 7;
      END LOOP;
    END IF;
    IF dd IS NULL THEN
      mo := mo + 1; d := 1; h := 0; mi := 0;
      IF mo > 12 THEN
        y := y + 1; mo := 1;
      END IF;
      CONTINUE;
    END IF;
    IF dd <> d THEN
      d := dd; h := 0; mi := 0;
    END IF;

    v := spec.hour_next[h + 1];
    IF v < 0 THEN
      d := d + 1; h := 0; mi := 0;
      CONTINUE;
    END IF;
    IF v <> h THEN
      h := v; mi := 0;
    END IF;

    v := spec.minute_next[mi + 1];
    IF v < 0 THEN
      h := h + 1; mi := 0;
      IF h > 23 THEN
        d := d + 1; h := 0;
      END IF;
      CONTINUE;
    END IF;
    RETURN make_timestamp(y, mo, d, h, v, 0);
  END LOOP;
END
$$;

-- cron_next: the first slot strictly after `after`, for an expression read
-- in the time zone `tz`. Slots are wall-clock times in tz. A wall-clock time
-- that a spring-forward change skips runs at the instant it maps to (02:30
-- on a day when 02:00 jumps to 03:00 runs at 03:30); one that a fall-back
-- change repeats runs once, at its second occurrence. (PostgreSQL's reading
-- of such times: the later of the two instants.)
CREATE FUNCTION pgrunner.cron_next(cron text, tz text, after timestamptz)
RETURNS timestamptz
LANGUAGE plpgsql STABLE STRICT AS $$
DECLARE
  spec pgrunner.cron_spec := pgrunner.cron_parse(cron);
  lw timestamp := after AT TIME ZONE tz;
  off interval := lw - (after AT TIME ZONE 'UTC');
  back interval;
  s timestamp;
  w timestamp;
  i timestamptz;
  j timestamptz;
BEGIN
  -- Near a change of the zone's offset, wall-clock times before `lw` may map
  -- to instants after `after`: start that much earlier. The offset a day
  -- before and after tells how much (26 hours covers any real change).
  back := greatest(
    interval '0',
    off - (((after - interval '26 hours') AT TIME ZONE tz)
           - ((after - interval '26 hours') AT TIME ZONE 'UTC')),
    off - (((after + interval '26 hours') AT TIME ZONE tz)
           - ((after + interval '26 hours') AT TIME ZONE 'UTC')));
  s := date_trunc('minute', lw) + interval '1 minute' - back;
  LOOP
    w := pgrunner.cron_next_local(spec, s);
    IF w IS NULL THEN
      RETURN NULL;
    END IF;
    i := w AT TIME ZONE tz;
    EXIT WHEN i > after;
    s := w + interval '1 minute';
  END LOOP;

  -- w was skipped by a spring-forward change and maps to i, after the change:
  -- a real wall-clock time between w and i's own may come earlier.
  lw := i AT TIME ZONE tz;
  IF lw <> w THEN
    s := w + interval '1 minute';
    LOOP
      w := pgrunner.cron_next_local(spec, s);
      EXIT WHEN w IS NULL OR w >= lw;
      j := w AT TIME ZONE tz;
      IF j > after AND j < i THEN
        i := j;
      END IF;
      s := w + interval '1 minute';
    END LOOP;
  END IF;
  RETURN i;
END
$$;

CREATE TABLE pgrunner.schedules (
  name        text PRIMARY KEY,
  cron        text NOT NULL,
  kind        text NOT NULL,
  payload     jsonb NOT NULL DEFAULT '{}',
  queue       text NOT NULL DEFAULT 'default',
  timezone    text NOT NULL DEFAULT 'UTC',
  -- The next slot to fire; NULL: never again.
  next_run_at timestamptz,
  -- The slot of the last task added (the first one, for a catch-up).
  last_run_at timestamptz,
  created_at  timestamptz NOT NULL DEFAULT now(),
  updated_at  timestamptz NOT NULL DEFAULT now(),
  CONSTRAINT schedules_name_check CHECK (btrim(name) <> ''),
  CONSTRAINT schedules_kind_check CHECK (kind <> ''),
  CONSTRAINT schedules_queue_check CHECK (queue <> '')
);

-- run_schedules looks up due schedules once a second: keep it an index probe.
CREATE INDEX schedules_next_run_at_idx ON pgrunner.schedules (next_run_at);

-- add_schedule: create or replace (by name) a recurring task. Every argument
-- is validated here, so a bad one never reaches the workers. Returns the
-- first slot.
CREATE FUNCTION pgrunner.add_schedule(
  name text,
  cron text,
  kind text,
  payload jsonb DEFAULT '{}',
  queue text DEFAULT 'default',
  timezone text DEFAULT 'UTC'
) RETURNS timestamptz
LANGUAGE plpgsql AS $$
DECLARE
  tz text;
  q text := coalesce(add_schedule.queue, 'default');
  nxt timestamptz;
BEGIN
  IF add_schedule.name IS NULL OR btrim(add_schedule.name) = '' THEN
    RAISE EXCEPTION 'pgrunner: invalid schedule name: it must not be empty'
      USING ERRCODE = 'invalid_parameter_value';
  END IF;
  IF add_schedule.cron IS NULL THEN
    RAISE EXCEPTION 'pgrunner: invalid cron expression: it must not be null'
      USING ERRCODE = 'invalid_parameter_value';
  END IF;
  -- A kind is matched exactly against the handlers: a stray space or
  -- newline would make one no handler has.
  IF add_schedule.kind IS NULL OR add_schedule.kind = ''
     OR add_schedule.kind ~ '^[[:space:]]|[[:space:]]$|[[:cntrl:]]' THEN
    RAISE EXCEPTION 'pgrunner: invalid kind "%": it must be non-empty, '
                    'without control characters or surrounding spaces',
                    coalesce(add_schedule.kind, 'NULL')
      USING ERRCODE = 'invalid_parameter_value';
  END IF;
  IF q = '' THEN
    RAISE EXCEPTION 'pgrunner: invalid queue: it must not be empty'
      USING ERRCODE = 'invalid_parameter_value';
  END IF;
  -- Only IANA names (case-insensitive, stored as spelled there): PostgreSQL
  -- would also take POSIX strings such as 'UTC+2', which mean UTC-2.
  SELECT z.name INTO tz FROM pg_timezone_names z
   WHERE lower(z.name) = lower(coalesce(add_schedule.timezone, 'UTC'))
   ORDER BY z.name = add_schedule.timezone DESC
   LIMIT 1;
  IF tz IS NULL THEN
    RAISE EXCEPTION 'pgrunner: invalid timezone "%": not a time zone name',
                    add_schedule.timezone
      USING ERRCODE = 'invalid_parameter_value',
            HINT = 'use a name from pg_timezone_names, e.g. '
                   '''Europe/Berlin'' or ''UTC''';
  END IF;

  nxt := pgrunner.cron_next(add_schedule.cron, tz, now());

  INSERT INTO pgrunner.schedules AS s
         (name, cron, kind, payload, queue, timezone, next_run_at)
  VALUES (add_schedule.name, add_schedule.cron, add_schedule.kind,
          coalesce(add_schedule.payload, '{}'), q, tz, nxt)
  ON CONFLICT ON CONSTRAINT schedules_pkey DO UPDATE
     SET cron = EXCLUDED.cron, kind = EXCLUDED.kind,
         payload = EXCLUDED.payload, queue = EXCLUDED.queue,
         timezone = EXCLUDED.timezone, next_run_at = EXCLUDED.next_run_at,
         updated_at = now();
  RETURN nxt;
END
$$;

-- remove_schedule: true if the schedule existed. Tasks it already added
-- stay.
CREATE FUNCTION pgrunner.remove_schedule(name text) RETURNS boolean
LANGUAGE plpgsql AS $$
BEGIN
  DELETE FROM pgrunner.schedules s WHERE s.name = remove_schedule.name;
  RETURN FOUND;
END
$$;

-- run_schedules: add one task for every schedule due at `at`, and move it
-- to its first slot after `at`, so slots missed while no worker ran add one
-- catch-up task between them. A schedule another transaction is firing is
-- locked, and skipped here: each slot adds exactly one task. Returns the
-- number of tasks added.
--
-- The task's key, 'schedule:NAME:SLOT' (SLOT in UTC), tells where it came
-- from. A schedule whose firing fails (a trigger on tasks raised, say) is
-- logged and tried again a minute later; it never fails the caller, which is
-- usually a worker's heartbeat.
CREATE FUNCTION pgrunner.run_schedules(at timestamptz DEFAULT now())
RETURNS int
LANGUAGE plpgsql AS $$
DECLARE
  s record;
  n int := 0;
  k int;
BEGIN
  FOR s IN SELECT sc.name, sc.cron, sc.kind, sc.payload, sc.queue,
                  sc.timezone, sc.next_run_at
             FROM pgrunner.schedules sc
            WHERE sc.next_run_at <= run_schedules.at
            ORDER BY sc.next_run_at
              FOR UPDATE SKIP LOCKED LOOP
    BEGIN
      INSERT INTO pgrunner.tasks (kind, payload, queue, key)
      VALUES (s.kind, s.payload, s.queue,
              'schedule:' || s.name || ':'
              || to_char(s.next_run_at AT TIME ZONE 'UTC',
                         'YYYY-MM-DD"T"HH24:MI:SS"Z"'));
      GET DIAGNOSTICS k = ROW_COUNT;
      UPDATE pgrunner.schedules sc
         SET next_run_at = pgrunner.cron_next(s.cron, s.timezone,
                                              run_schedules.at),
             last_run_at = s.next_run_at
       WHERE sc.name = s.name;
      n := n + k;
    EXCEPTION WHEN OTHERS THEN
      RAISE WARNING 'pgrunner: schedule "%" could not add its task: %; '
                    'trying again in a minute', s.name, SQLERRM;
      UPDATE pgrunner.schedules sc
         SET next_run_at = run_schedules.at + interval '1 minute'
       WHERE sc.name = s.name;
    END;
  END LOOP;
  RETURN n;
END
$$;

-- heartbeat (as in 0001), now also firing the due schedules: whichever
-- worker holds the lock does it, so a due slot fires within about a second
-- while any worker runs.
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
    RETURN pgrunner.recover();
  END IF;
  RETURN 0;
END
$$;
