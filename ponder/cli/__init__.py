"""`ponder`, the command line: models, the service's processes, database and keys, and a REST client."""
