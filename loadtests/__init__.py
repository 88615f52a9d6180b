"""Load and speed: ``flashsale bench`` (bench, its ceiling and baseline apps, the report, the CPU
meter, the wrk driver), the cost program (``python -m loadtests.costs``), the locust scenarios
and the wrk script."""
