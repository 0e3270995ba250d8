"""Root pytest configuration: the two longest notebooks run on request (`-m slow`), not in the default run.

`02_exact_score_sampling` and `03_coupling_schedules` take 1.5-2.5 minutes each on the 2-core CI machine, a fifth of
the default run's budget; what they show is tested piece by piece under `tests/` (sampling, schedules, optimisation).
"""

import pytest

SLOW_NOTEBOOKS = ("notebooks/02_exact_score_sampling.ipynb", "notebooks/03_coupling_schedules.ipynb")


@pytest.hookimpl(tryfirst=True)  # before the `-m` selection reads the marks
def pytest_collection_modifyitems(config, items):
    for item in items:
        if item.nodeid.startswith(SLOW_NOTEBOOKS):
            item.add_marker(pytest.mark.slow)
