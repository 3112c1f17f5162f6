"""Recurring tasks: pgrunner.add_schedule / remove_schedule / run_schedules
and the cron arithmetic behind them (pgrunner.cron_next), against a real
PostgreSQL migrated by the real `pgrunner migrate`.

The expected slots are computed here, independently of the SQL, by a small
Python reading of cron and a brute-force walk over the wall-clock minutes of
the candidate days, converted to instants with zoneinfo. A wall-clock time
that a time-zone change skips or repeats maps to the later of its two
possible instants (what PostgreSQL does, and what pgrunner documents).

No worker runs here: run_schedules and heartbeat are called directly.
"""

import random
import threading
from datetime import datetime, timedelta, timezone
from zoneinfo import ZoneInfo

import psycopg2
import pytest

UTC = timezone.utc

# --- the independent oracle -------------------------------------------------

MONTHS = "jan feb mar apr may jun jul aug sep oct nov dec".split()
DOWS = "sun mon tue wed thu fri sat".split()
MACROS = {
    "@yearly": "0 0 1 1 *", "@annually": "0 0 1 1 *",
    "@monthly": "0 0 1 * *", "@weekly": "0 0 * * 0",
    "@daily": "0 0 * * *", "@midnight": "0 0 * * *",
    "@hourly": "0 * * * *",
}


def _field(text, lo, hi, names=None, dow=False):
    star_hi = 6 if dow else hi

    def val(tok):
        return int(tok) if tok.isdigit() else names.index(tok) + lo

    out = set()
    for el in text.lower().split(","):
        rng, slash, step = el.partition("/")
        step = int(step) if slash else 1
        if rng == "*":
            a, b = lo, star_hi
        else:
            first, dash, last = rng.partition("-")
            a = val(first)
            if dash:
                b = val(last)
                if dow and b == 0 and a > 0:
                    b = 7
            else:
                b = star_hi if slash else a
        out.update(range(a, b + 1, step))
    if dow:
        out = {0 if v == 7 else v for v in out}
    return out


class Cron:
    def __init__(self, expr):
        e = expr.strip()
        e = MACROS.get(e.lower(), e)
        f = e.split()
        assert len(f) == 5, expr
        self.minutes = sorted(_field(f[0], 0, 59))
        self.hours = sorted(_field(f[1], 0, 23))
        self.doms = _field(f[2], 1, 31)
        self.months = _field(f[3], 1, 12, MONTHS)
        self.dows = _field(f[4], 0, 7, DOWS, dow=True)
        self.dom_star = f[2].startswith("*")
        self.dow_star = f[4].startswith("*")

    def day_ok(self, d):
        if d.month not in self.months:
            return False
        dom = d.day in self.doms
        dow = d.isoweekday() % 7 in self.dows
        if self.dom_star or self.dow_star:
            return dom and dow
        return dom or dow


def instant(wall, z):
    """The instant of a naive wall-clock time in zone z: the later of the
    two readings when the time is skipped or repeated."""
    return max(wall.replace(tzinfo=z, fold=0).astimezone(UTC),
               wall.replace(tzinfo=z, fold=1).astimezone(UTC))


def oracle_next(expr, tz, after):
    """First slot strictly after `after`: every matching wall-clock minute of
    every matching day near and after `after`, the smallest instant wins."""
    c = Cron(expr)
    z = ZoneInfo(tz)
    lo = after.astimezone(z).replace(tzinfo=None) - timedelta(hours=27)
    day = lo.date()
    end = day + timedelta(days=366 * 30)
    best = None
    stop = None
    while day <= end and (stop is None or day <= stop):
        if c.day_ok(day):
            for h in c.hours:
                for m in c.minutes:
                    wall = datetime(day.year, day.month, day.day, h, m)
                    if wall < lo:
                        continue
                    t = instant(wall, z)
                    if t > after and (best is None or t < best):
                        best = t
                        stop = (best.astimezone(z).replace(tzinfo=None)
                                + timedelta(hours=27)).date()
        day += timedelta(days=1)
    return best


# --- helpers ----------------------------------------------------------------

def utc(*a):
    return datetime(*a, tzinfo=UTC)


def sql_next(cur, expr, tz, after):
    cur.execute("SELECT pgrunner.cron_next(%s, %s, %s)", (expr, tz, after))
    return cur.fetchone()[0]


def compare(db, cases):
    """cases: iterable of (expr, tz, after). Returns the mismatches."""
    bad = []
    with db.conn.cursor() as cur:
        cur.execute("SET TimeZone = 'UTC'")
        for expr, tz, after in cases:
            got = sql_next(cur, expr, tz, after)
            want = oracle_next(expr, tz, after)
            if got != want:
                bad.append((expr, tz, after.isoformat(),
                            got and got.isoformat(), want and want.isoformat()))
    return bad


def add(db, name, cron, kind="noop", **kw):
    args = ", ".join(f"{k} => %({k})s" for k in kw)
    q = ("SELECT pgrunner.add_schedule(%(name)s, %(cron)s, %(kind)s"
         + (", " + args if args else "") + ")")
    return db.scalar(q, dict(name=name, cron=cron, kind=kind, **kw))


def add_error(db, *args, **kw):
    """add_schedule's error (message, sqlstate); the schedule must not exist."""
    with pytest.raises(psycopg2.Error) as ei:
        add(db, *args, **kw)
    e = ei.value
    n = db.scalar("SELECT count(*) FROM pgrunner.schedules")
    assert n == 0
    return e.diag.message_primary, e.pgcode


def set_next(db, name, t):
    db.query("UPDATE pgrunner.schedules SET next_run_at = %s WHERE name = %s",
             (t, name))


def run(db, at, conn=None):
    c = conn or db.conn
    with c.cursor() as cur:
        cur.execute("SELECT pgrunner.run_schedules(%s)", (at,))
        return cur.fetchone()[0]


def tasks(db):
    return db.query("SELECT kind, payload, queue, key, state"
                    " FROM pgrunner.tasks ORDER BY id")


# --- cron_next against the oracle -------------------------------------------

GENERIC = [
    "* * * * *", "*/15 * * * *", "5 4 * * *", "0 0 1 1 *", "59 23 31 12 *",
    "0 0 31 * *", "0 0 30 */2 *", "0 0 29 2 *", "0 12 * * 0", "0 12 * * 7",
    "0 9-17/2 * * 1-5", "0 12 * * mon-fri", "30 8 * * MON,wed,Fri",
    "15 10 * dec,jun sat", "0 0 13 * fri", "0 0 */2 * mon", "0 0 1-7 * mon",
    "0 0 1,15 * 3", "0 0 * * fri-sun", "0 0 * * 5-7", "*/7 */5 1/10 * *",
    "5-50/15 1-23/7 * * *", "0 0 1-31/10 jan-dec/3 *", "10 2/3 * * *",
    "0 0 */31 2 mon", "1,2,3 0 * * 6", "0 22 * * 1-5", "0 0 * * 0,7",
    "0-4,58-59 0 1 * *", "0 0 29 2 mon", "0 0 * JAN-Mar sun",
    "@hourly", "@daily", "@weekly", "@monthly", "@yearly", "@annually",
    "@midnight", "  0   0 *\t* *  ",
]

GENERIC_AFTERS = [
    utc(2024, 1, 1), utc(2024, 2, 28, 23, 59, 30), utc(2023, 2, 28, 12),
    datetime(2024, 12, 31, 23, 59, 59, 500000, tzinfo=UTC),
    utc(2023, 6, 15, 12, 34, 56), utc(2097, 3, 1), utc(2099, 12, 31, 23, 59),
    utc(2000, 2, 29, 0, 0, 1), utc(1999, 12, 31, 23, 59, 59),
]


def test_cron_next_matches_brute_force_utc(mdb):
    cases = [(e, "UTC", a) for e in GENERIC for a in GENERIC_AFTERS]
    assert compare(mdb, cases) == []


def test_cron_next_matches_brute_force_random(mdb):
    rng = random.Random(20240531)
    zones = ["UTC", "Europe/Berlin", "America/New_York", "Asia/Kolkata",
             "Australia/Sydney", "Australia/Lord_Howe", "America/Sao_Paulo"]
    cases = []
    for _ in range(300):
        t = utc(2017, 1, 1) + timedelta(seconds=rng.randrange(9 * 365 * 86400))
        cases.append((rng.choice(GENERIC), rng.choice(zones), t))
    assert compare(mdb, cases) == []


# Offset changes (UTC instant of the change): spring forward and fall back,
# northern and southern hemisphere, a 30-minute change, a change at
# midnight, and Samoa skipping 30 December 2011 altogether.
TRANSITIONS = [
    ("Europe/Berlin", utc(2024, 3, 31, 1)),
    ("Europe/Berlin", utc(2024, 10, 27, 1)),
    ("America/New_York", utc(2024, 3, 10, 7)),
    ("America/New_York", utc(2024, 11, 3, 6)),
    ("Australia/Sydney", utc(2024, 4, 6, 16)),
    ("Australia/Sydney", utc(2024, 10, 5, 16)),
    ("Australia/Lord_Howe", utc(2024, 4, 6, 15)),
    ("Australia/Lord_Howe", utc(2024, 10, 5, 15, 30)),
    ("America/Sao_Paulo", utc(2018, 11, 4, 3)),
    ("America/Sao_Paulo", utc(2019, 2, 17, 2)),
    ("Pacific/Apia", utc(2011, 12, 30, 10)),
]

DST_CRONS = [
    "* * * * *", "*/15 * * * *", "30 2 * * *", "0,30 1-3 * * *",
    "0 2 * * *", "0 3 * * *", "59 1 * * *", "10,35 2 * * *", "0 0 * * *",
    "45 23 * * *", "*/20 0-4 * * 0", "0 0 30 12 *",
]

DELTAS_MIN = [-26 * 60, -180, -90, -61, -60, -59, -31, -30, -29, -1, 0, 1,
              29, 30, 31, 59, 60, 61, 90, 180, 25 * 60]


@pytest.mark.parametrize("tz,change", TRANSITIONS,
                         ids=[f"{z}-{t:%Y%m%d}" for z, t in TRANSITIONS])
def test_cron_next_across_offset_changes(mdb, tz, change):
    cases = []
    for expr in DST_CRONS:
        for d in DELTAS_MIN:
            cases.append((expr, tz, change + timedelta(minutes=d)))
        cases.append((expr, tz, change + timedelta(seconds=-1)))
        cases.append((expr, tz, change + timedelta(seconds=1)))
    assert compare(mdb, cases) == []


def test_cron_next_walks_a_whole_dst_day(mdb):
    """Chained slots (each the next after the previous) through both Berlin
    changes of 2024: no slot lost, none repeated."""
    with mdb.conn.cursor() as cur:
        cur.execute("SET TimeZone = 'UTC'")
        for expr in ["*/10 * * * *", "30 2 * * *", "0 * * * *"]:
            for start in [utc(2024, 3, 30, 20), utc(2024, 10, 26, 20)]:
                t = start
                got, want = [], []
                for _ in range(40):
                    t = sql_next(cur, expr, "Europe/Berlin", t)
                    got.append(t)
                t = start
                for _ in range(40):
                    t = oracle_next(expr, "Europe/Berlin", t)
                    want.append(t)
                assert got == want, expr
                assert got == sorted(set(got))


def test_cron_next_explicit_values(mdb):
    """Hand-checked answers: the rules themselves, not just agreement."""
    berlin = ZoneInfo("Europe/Berlin")
    cases = [
        # 2024-01-01 is a Monday.
        ("0 0 13 * fri", utc(2024, 1, 1), utc(2024, 1, 5)),
        ("0 0 13 * fri", utc(2024, 1, 12), utc(2024, 1, 13)),
        ("0 0 13 * fri", utc(2024, 1, 13), utc(2024, 1, 19)),
        # '*/2' starts with '*': day-of-month AND day-of-week.
        ("0 0 */2 * mon", utc(2024, 1, 1), utc(2024, 1, 15)),
        ("0 0 1-7 * mon", utc(2024, 1, 7), utc(2024, 1, 8)),
        ("0 0 29 2 *", utc(2097, 3, 1), utc(2104, 2, 29)),
        ("0 12 * * 7", utc(2024, 1, 1), utc(2024, 1, 7, 12)),
        ("0 12 * * sun", utc(2024, 1, 1), utc(2024, 1, 7, 12)),
        ("@weekly", utc(2024, 1, 1), utc(2024, 1, 7)),
        ("@monthly", utc(2024, 1, 31, 5), utc(2024, 2, 1)),
        ("@yearly", utc(2024, 1, 1), utc(2025, 1, 1)),
        ("@hourly", utc(2024, 1, 1, 10, 59, 59), utc(2024, 1, 1, 11)),
        ("* * * * *", utc(2024, 1, 1, 10), utc(2024, 1, 1, 10, 1)),
        ("* * * * *", utc(2024, 1, 1, 10, 0, 0, 1), utc(2024, 1, 1, 10, 1)),
        ("*/15 * * * *", utc(2024, 1, 1, 10, 15), utc(2024, 1, 1, 10, 30)),
        ("0 9-17/4 * * *", utc(2024, 1, 1, 9), utc(2024, 1, 1, 13)),
        ("0 9-17/4 * * *", utc(2024, 1, 1, 17), utc(2024, 1, 2, 9)),
        ("0 0 * jan-mar/2 *", utc(2024, 1, 31, 1), utc(2024, 3, 1)),
        ("0 0 * * fri-sun", utc(2024, 1, 1), utc(2024, 1, 5)),
        ("0 0 31 * *", utc(2024, 1, 31), utc(2024, 3, 31)),
    ]
    with mdb.conn.cursor() as cur:
        cur.execute("SET TimeZone = 'UTC'")
        for expr, after, want in cases:
            assert sql_next(cur, expr, "UTC", after) == want, (expr, after)
        # Berlin, spring forward: 02:30 does not exist on 2024-03-31 and runs
        # at 03:30 CEST. Fall back: 02:30 comes twice on 2024-10-27 and runs
        # once, at the second (CET).
        t = sql_next(cur, "30 2 * * *", "Europe/Berlin", utc(2024, 3, 30, 12))
        assert t == datetime(2024, 3, 31, 3, 30, tzinfo=berlin)
        assert t == utc(2024, 3, 31, 1, 30)
        t = sql_next(cur, "30 2 * * *", "Europe/Berlin", t)
        assert t == datetime(2024, 4, 1, 2, 30, tzinfo=berlin)
        t = sql_next(cur, "30 2 * * *", "Europe/Berlin", utc(2024, 10, 26, 12))
        assert t == utc(2024, 10, 27, 1, 30)
        t = sql_next(cur, "30 2 * * *", "Europe/Berlin", t)
        assert t == utc(2024, 10, 28, 1, 30)
        # A zone half an hour off UTC.
        t = sql_next(cur, "0 9 * * *", "Asia/Kolkata", utc(2024, 1, 1))
        assert t == utc(2024, 1, 1, 3, 30)


# --- validation -------------------------------------------------------------

INVALID_CRONS = [
    ("", ["5 fields", "got 0"]),
    ("   ", ["5 fields", "got 0"]),
    ("* * * *", ["5 fields", "got 4"]),
    ("* * * * * *", ["5 fields", "got 6"]),
    ("60 * * * *", ["minute field", "60", "0-59"]),
    ("x * * * *", ["minute field", "unknown name"]),
    ("*/0 * * * *", ["minute field", "step 0"]),
    ("*/61 * * * *", ["minute field", "step 61"]),
    ("5-1 * * * *", ["minute field", "backwards"]),
    ("1,,2 * * * *", ["minute field"]),
    ("-1 * * * *", ["minute field"]),
    ("*-5 * * * *", ["minute field"]),
    ("1-2-3 * * * *", ["minute field"]),
    ("99999999999 * * * *", ["minute field", "out of range"]),
    ("0 24 * * *", ["hour field", "24", "0-23"]),
    ("0 1-24 * * *", ["hour field", "24"]),
    ("0 */25 * * *", ["hour field", "step 25"]),
    ("0 0 0 * *", ["day-of-month field", "0", "1-31"]),
    ("0 0 32 * *", ["day-of-month field", "32"]),
    ("0 0 L * *", ["day-of-month field", "unknown name"]),
    ("0 0 ? * *", ["day-of-month field"]),
    ("0 0 * 13 *", ["month field", "13", "1-12"]),
    ("0 0 * 0 *", ["month field", "0"]),
    ("0 0 * foo *", ["month field", "unknown name \"foo\"", "jan"]),
    ("0 0 * january *", ["month field", "january"]),
    ("0 0 * * 8", ["day-of-week field", "8", "0-7"]),
    ("0 0 * * mon-foo", ["day-of-week field", "foo", "sun"]),
    ("0 0 * * sat-mon", ["day-of-week field", "backwards"]),
    ("0 0 * * */8", ["day-of-week field", "step 8"]),
    ("0 0 31 2 *", ["never fires"]),
    ("0 0 30,31 2 *", ["never fires"]),
    ("0 0 31 apr,jun,sep,nov *", ["never fires"]),
    ("@reboot", ["unknown macro"]),
    ("@every 5m", ["unknown macro"]),
]


def test_invalid_cron_rejected(mdb):
    """Each bad expression is refused with a message that names the field
    (or says it never fires); nothing is stored."""
    bad = []
    for cron, words in INVALID_CRONS:
        msg, code = add_error(mdb, "s", cron)
        if (code != "22023"
                or not msg.startswith(
                    f'pgrunner: invalid cron expression "{cron}"')
                or any(w not in msg for w in words)):
            bad.append((cron, code, msg))
    assert bad == []


def test_invalid_arguments_rejected(mdb):
    for name in ["", "   ", None]:
        msg, code = add_error(mdb, name, "* * * * *")
        assert code == "22023" and "schedule name" in msg, msg
    msg, code = add_error(mdb, "s", None)
    assert code == "22023" and "cron expression" in msg
    for kind in ["", " noop", "noop\n", "tab\there", None]:
        msg, code = add_error(mdb, "s", "* * * * *", kind=kind)
        assert code == "22023" and "invalid kind" in msg, msg
    msg, code = add_error(mdb, "s", "* * * * *", queue="")
    assert code == "22023" and "queue" in msg
    for tz in ["Mars/Olympus_Mons", "UTC+2", "+02:00", "CEST", ""]:
        msg, code = add_error(mdb, "s", "* * * * *", timezone=tz)
        assert code == "22023" and "invalid timezone" in msg, msg
        assert tz in msg


def test_valid_spellings_accepted(mdb):
    exprs = ["*/5 * * * *", "0 9-17 * * MON-FRI", "0 0 1 JAN,jul *",
             "@Daily", "0 0 * * 7", "0 0 29 2 *",
             "5/10 * * * *", "0 0 * * 1/2", "00 09 01 01 00"]
    for i, e in enumerate(exprs):
        t = add(mdb, f"s{i}", e)
        assert t is not None
    assert mdb.scalar("SELECT count(*) FROM pgrunner.schedules") == len(exprs)


# --- add / replace / remove -------------------------------------------------

def test_add_schedule_stores_and_returns_first_slot(mdb):
    t = add(mdb, "nightly", "30 3 * * *", kind="cleanup",
            payload='{"days": 30}', queue="maintenance",
            timezone="europe/berlin")
    row = mdb.query("SELECT cron, kind, payload, queue, timezone, next_run_at,"
                    " last_run_at, now() FROM pgrunner.schedules"
                    " WHERE name = 'nightly'")[0]
    cron, kind, payload, queue, tz, nxt, last, now = row
    assert (cron, kind, payload, queue) == ("30 3 * * *", "cleanup",
                                            {"days": 30}, "maintenance")
    assert tz == "Europe/Berlin"   # canonical spelling
    assert last is None
    assert nxt == t
    assert nxt == oracle_next("30 3 * * *", "Europe/Berlin", now)
    local = nxt.astimezone(ZoneInfo("Europe/Berlin"))
    assert local.strftime("%H:%M") == "03:30"
    # Defaults.
    add(mdb, "d", "@hourly")
    assert mdb.query("SELECT kind, payload, queue, timezone FROM"
                     " pgrunner.schedules WHERE name = 'd'")[0] == \
        ("noop", {}, "default", "UTC")


def test_add_schedule_replaces_by_name(mdb):
    add(mdb, "job", "0 0 * * *", kind="a", payload='{"v": 1}')
    created = mdb.scalar("SELECT created_at FROM pgrunner.schedules")
    t = add(mdb, "job", "*/5 * * * *", kind="b", payload='{"v": 2}',
            queue="q2", timezone="Asia/Tokyo")
    rows = mdb.query("SELECT name, cron, kind, payload, queue, timezone,"
                     " next_run_at, created_at FROM pgrunner.schedules")
    assert rows == [("job", "*/5 * * * *", "b", {"v": 2}, "q2", "Asia/Tokyo",
                     t, created)]


def test_failed_replace_keeps_old_schedule(mdb):
    add(mdb, "job", "0 0 * * *")
    with pytest.raises(psycopg2.Error):
        add(mdb, "job", "0 0 31 2 *")
    assert mdb.query("SELECT cron FROM pgrunner.schedules") == [("0 0 * * *",)]


def test_remove_schedule(mdb):
    add(mdb, "gone", "* * * * *")
    set_next(mdb, "gone", utc(2030, 1, 1))
    assert mdb.scalar("SELECT pgrunner.remove_schedule('gone')") is True
    assert mdb.scalar("SELECT pgrunner.remove_schedule('gone')") is False
    assert mdb.scalar("SELECT pgrunner.remove_schedule('never')") is False
    assert run(mdb, utc(2031, 1, 1)) == 0
    assert tasks(mdb) == []


# --- firing -----------------------------------------------------------------

def test_run_schedules_fires_due_slot_once(mdb):
    add(mdb, "s", "*/5 * * * *", kind="report", payload='{"x": 1}', queue="q")
    t0 = utc(2030, 1, 1, 12, 0)
    set_next(mdb, "s", t0)
    assert run(mdb, t0 - timedelta(seconds=1)) == 0
    assert run(mdb, t0) == 1
    assert run(mdb, t0) == 0
    assert run(mdb, t0 + timedelta(minutes=4, seconds=59)) == 0
    assert tasks(mdb) == [("report", {"x": 1}, "q",
                           "schedule:s:2030-01-01T12:00:00Z", "queued")]
    nxt, last = mdb.query("SELECT next_run_at, last_run_at FROM"
                          " pgrunner.schedules")[0]
    assert (nxt, last) == (t0 + timedelta(minutes=5), t0)
    assert run(mdb, t0 + timedelta(minutes=5)) == 1
    assert [r[3] for r in tasks(mdb)] == [
        "schedule:s:2030-01-01T12:00:00Z", "schedule:s:2030-01-01T12:05:00Z"]


def test_missed_slots_add_one_catch_up_task(mdb):
    add(mdb, "s", "* * * * *")
    t0 = utc(2030, 1, 1, 0, 0)
    set_next(mdb, "s", t0)
    # Three hours (180 slots) without a worker: one task, then on schedule.
    late = t0 + timedelta(hours=3, seconds=30)
    assert run(mdb, late) == 1
    assert run(mdb, late) == 0
    nxt, last = mdb.query("SELECT next_run_at, last_run_at FROM"
                          " pgrunner.schedules")[0]
    assert last == t0
    assert nxt == t0 + timedelta(hours=3, minutes=1)
    assert run(mdb, nxt) == 1
    assert len(tasks(mdb)) == 2


def test_run_schedules_fires_each_due_schedule(mdb):
    for i in range(5):
        add(mdb, f"s{i}", "0 * * * *", kind=f"k{i}")
    t0 = utc(2030, 1, 1, 5)
    mdb.query("UPDATE pgrunner.schedules SET next_run_at = %s", (t0,))
    set_next(mdb, "s4", t0 + timedelta(hours=1))   # not due yet
    assert run(mdb, t0) == 4
    assert sorted(r[0] for r in tasks(mdb)) == ["k0", "k1", "k2", "k3"]


def test_concurrent_callers_do_not_block_or_duplicate(mdb):
    add(mdb, "s", "* * * * *")
    t0 = utc(2030, 1, 1)
    set_next(mdb, "s", t0)
    a = mdb.connect(autocommit=False)
    b = mdb.connect()
    try:
        with b.cursor() as cur:
            cur.execute("SET statement_timeout = '20s'")
        assert run(mdb, t0, conn=a) == 1       # a holds the row, uncommitted
        assert run(mdb, t0, conn=b) == 0       # b skips it, does not wait
        a.commit()
        assert run(mdb, t0, conn=b) == 0       # and sees it moved on
    finally:
        a.close()
        b.close()
    assert len(tasks(mdb)) == 1


def test_racing_callers_add_exactly_one_task_per_slot(mdb):
    """8 connections call run_schedules together for each of 60 minutes:
    every slot of every schedule adds exactly one task. The tasks are born
    finished, so the key de-duplication (queued/running tasks only) cannot
    help: the row locks alone must hold."""
    mdb.query("""
        CREATE FUNCTION public.born_done() RETURNS trigger
        LANGUAGE plpgsql AS $$
        BEGIN
          NEW.state := 'succeeded';
          NEW.finished_at := now();
          RETURN NEW;
        END $$;
        -- Before tasks_dedup: BEFORE triggers fire in name order.
        CREATE TRIGGER a_born_done BEFORE INSERT ON pgrunner.tasks
          FOR EACH ROW EXECUTE FUNCTION public.born_done();
    """)
    crons = {"every": "* * * * *", "even": "*/2 * * * *",
             "half": "0,30 * * * *", "odd": "1-59/2 * * * *"}
    t0 = utc(2030, 1, 1)
    for n, c in crons.items():
        add(mdb, n, c)
        mdb.query("UPDATE pgrunner.schedules SET next_run_at ="
                  " pgrunner.cron_next(cron, timezone, %s) WHERE name = %s",
                  (t0 - timedelta(seconds=1), n))
    nthreads, minutes = 8, 60
    barrier = threading.Barrier(nthreads)
    added = [0] * nthreads
    errors = []

    def body(k):
        c = mdb.connect()
        try:
            for i in range(minutes):
                barrier.wait(timeout=60)
                added[k] += run(mdb, t0 + timedelta(minutes=i, seconds=10),
                                conn=c)
        except Exception as e:  # noqa: BLE001 - reported below
            errors.append(e)
            barrier.abort()
        finally:
            c.close()

    threads = [threading.Thread(target=body, args=(k,))
               for k in range(nthreads)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    want = {n: 0 for n in crons}
    for n, c in crons.items():
        cr = Cron(c)
        want[n] = sum(1 for i in range(minutes) if i in cr.minutes)
    keys = [r[3] for r in tasks(mdb)]
    assert len(keys) == len(set(keys))
    got = {n: sum(1 for k in keys if k.startswith(f"schedule:{n}:"))
           for n in crons}
    assert got == want
    assert sum(added) == len(keys) == sum(want.values())


def test_failing_schedule_does_not_stop_the_others(mdb):
    mdb.query("""
        CREATE FUNCTION public.refuse() RETURNS trigger LANGUAGE plpgsql AS $$
        BEGIN
          IF NEW.kind = 'boom' THEN RAISE EXCEPTION 'refused'; END IF;
          RETURN NEW;
        END $$;
        CREATE TRIGGER refuse BEFORE INSERT ON pgrunner.tasks
          FOR EACH ROW EXECUTE FUNCTION public.refuse();
    """)
    add(mdb, "bad", "* * * * *", kind="boom")
    add(mdb, "good", "* * * * *", kind="fine")
    t0 = utc(2030, 1, 1)
    mdb.query("UPDATE pgrunner.schedules SET next_run_at = %s", (t0,))
    assert run(mdb, t0) == 1
    assert [r[0] for r in tasks(mdb)] == ["fine"]
    # The failing one is tried again a minute later.
    assert mdb.scalar("SELECT next_run_at FROM pgrunner.schedules"
                      " WHERE name = 'bad'") == t0 + timedelta(minutes=1)


def test_heartbeat_fires_due_schedules(mdb):
    add(mdb, "hb", "* * * * *", kind="tick")
    mdb.query("UPDATE pgrunner.schedules"
              " SET next_run_at = now() - interval '1 minute'")
    mdb.scalar("SELECT pgrunner.heartbeat(42, 'test-worker', 'host', 1,"
               " '{default}', 1)")
    rows = tasks(mdb)
    assert len(rows) == 1 and rows[0][0] == "tick"
    assert rows[0][3].startswith("schedule:hb:")
    assert mdb.scalar("SELECT next_run_at > now() FROM pgrunner.schedules")


def test_idle_run_schedules_uses_the_index(mdb):
    mdb.query("""
        INSERT INTO pgrunner.schedules (name, cron, kind, next_run_at)
        SELECT 's' || i, '0 0 * * *', 'noop',
               '2100-01-01'::timestamptz + i * interval '1 minute'
          FROM generate_series(1, 20000) i;
        ANALYZE pgrunner.schedules;
    """)
    plan = "\n".join(r[0] for r in mdb.query(
        "EXPLAIN SELECT * FROM pgrunner.schedules sc"
        " WHERE sc.next_run_at <= now() ORDER BY sc.next_run_at"
        " FOR UPDATE SKIP LOCKED"))
    assert "schedules_next_run_at_idx" in plan, plan
    assert run(mdb, utc(2030, 1, 1)) == 0
