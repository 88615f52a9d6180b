"""Load tests: locust scenarios and the wrk script `flashsale bench` drives (package data)."""
