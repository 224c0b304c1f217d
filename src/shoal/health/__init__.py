"""Application health checks: what a check is (:mod:`~shoal.health.spec`), how its results
become a verdict with rise, fall and flap damping (:mod:`~shoal.health.verdict`, pure), and
the probes themselves (:mod:`~shoal.health.probes`, asyncio)."""
