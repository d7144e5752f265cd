"""Test-suite settings.

In CI (``CI`` set, as .ci/run's environment has it) hypothesis draws the same
examples on every run, so a green suite stays green for the same code; locally
it keeps exploring new examples and saves failures in .hypothesis/.
"""

import os

from hypothesis import settings

settings.register_profile("ci", derandomize=True, deadline=None, print_blob=True)
if os.environ.get("CI"):
    settings.load_profile("ci")
