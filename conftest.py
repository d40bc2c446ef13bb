"""Test-wide settings.

Hypothesis: the suite runs in parallel on small machines (CI has 2 cores), where a single
example can take far longer than Hypothesis' default 200 ms deadline. Timing is not what
these properties check, so the deadline and the too-slow health check are off.
"""

from hypothesis import HealthCheck, settings

settings.register_profile(
    "overlay",
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    print_blob=True,
)
settings.load_profile("overlay")
