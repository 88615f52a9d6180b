"""The HTTP front door: the app, its one route table, the order route and what it needs."""
