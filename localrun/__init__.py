"""Run it on one machine: local Redis, Postgres and localstripe servers, and the demo sale."""
