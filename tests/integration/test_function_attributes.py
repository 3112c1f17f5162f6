"""What the migrations leave on each of pgrunner's functions, against
tests/integration/function_attributes.txt: SECURITY DEFINER or not, the
settings it carries (the planner settings of 0005/0006/0011/0013/0014...)
and who may EXECUTE it (PUBLIC, pgrunner_producer, pgrunner_worker).

A migration that restates a function with CREATE OR REPLACE drops what an
earlier one set with ALTER FUNCTION or GRANT unless it sets it again; twice
a later migration has silently undone an earlier one's (0015/0016's
setup_roles). This test makes any such change show as a diff to review.
After checking that a change is meant, rewrite the file with
PGR_UPDATE_GOLDEN=1."""

import difflib
import os

GOLDEN = os.path.join(os.path.dirname(os.path.abspath(__file__)),
                      "function_attributes.txt")

ATTRIBUTES = r"""
SELECT p.oid::regprocedure::text
       || ' | ' || CASE WHEN p.prosecdef THEN 'definer' ELSE 'invoker' END
       || ' | ' || coalesce((SELECT string_agg(c, ' ' ORDER BY c)
                               FROM unnest(p.proconfig) c), '-')
       || ' | ' || coalesce((SELECT string_agg(
                                      CASE WHEN a.grantee = 0 THEN 'PUBLIC'
                                           ELSE r.rolname END, ' '
                                      ORDER BY 1)
                               FROM aclexplode(coalesce(p.proacl,
                                               acldefault('f', p.proowner))) a
                               LEFT JOIN pg_roles r ON r.oid = a.grantee
                              WHERE a.privilege_type = 'EXECUTE'
                                AND (a.grantee = 0
                                     OR r.rolname LIKE 'pgrunner\_%')), '-')
  FROM pg_proc p
 WHERE p.pronamespace = 'pgrunner'::regnamespace
 ORDER BY 1
"""


def test_each_function_keeps_its_definer_settings_and_grants(mdb):
    got = [r[0] for r in mdb.query(ATTRIBUTES)]
    assert got, "no functions in schema pgrunner"
    if os.environ.get("PGR_UPDATE_GOLDEN"):
        with open(GOLDEN, "w") as f:
            f.write("\n".join(got) + "\n")
    with open(GOLDEN) as f:
        want = f.read().splitlines()
    diff = list(difflib.unified_diff(want, got, "function_attributes.txt",
                                     "after the migrations", lineterm=""))
    assert not diff, ("functions changed (signature | definer | settings | "
                      "EXECUTE by); if meant, rerun with PGR_UPDATE_GOLDEN=1:"
                      "\n" + "\n".join(diff))
