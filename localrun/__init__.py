"""Run it on one machine: local Redis and Postgres servers (``python -m localrun.servers
up|down|env``), and the demo sale (``flashsale demo``)."""
