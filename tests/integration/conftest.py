import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)),
                                "..", "support"))

pytest_plugins = ["pgr_fixtures", "smtp_fixtures", "pgbouncer_fixtures"]
