"""The store: where session rows live (`handlers`: database and memory, one class per database),
the schema and its migrations, and what serves the store to many requests at once: batching, worker
threads, fair share of the pool, blocking requests' locks, the async bridge. Imports the core only."""
