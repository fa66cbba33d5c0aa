"""Makes tests/helpers importable as `helpers` from every test folder, and makes property
tests reproducible: Hypothesis draws the same examples on every run (a property that can
fail fails every time, and the database of failures a local run keeps changes nothing in
CI), with no per-example deadline on a loaded 2-core machine. ``HYPOTHESIS_PROFILE=explore``
draws fresh examples, for looking for new failures."""

import os
import sys
from pathlib import Path

from hypothesis import settings

sys.path.insert(0, str(Path(__file__).resolve().parent))

settings.register_profile("repeatable", derandomize=True, deadline=None, database=None)
settings.register_profile("explore", deadline=None)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "repeatable"))
