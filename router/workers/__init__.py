"""`fleet router --workers N`: one router made of N processes on one port.

    supervisor.py   the parent: forks the workers (each today's router, router.serve, on its own
                    SO_REUSEPORT socket), forwards SIGTERM/SIGINT, restarts the dead with backoff
    shared.py       the folder the workers share: each one's metrics, the drains of `--replica` URLs
    metrics.py      a worker's metrics answered for the whole router (/metrics, admin stats, page)
    sync.py         a worker's side of the folder: its metrics written, others' drains applied

What each worker keeps to itself, and why that holds for the router as a whole:
- the fleet's membership, API keys, rate limits, key concurrency and usage: in Redis, as for
  several routers (each worker caches keys and hears revocations on its own subscription);
- drains: a membership replica's drain is in Redis; a `--replica` URL's is in the shared folder;
- prefix placement: each worker's own record of the prefixes it sent, the replicas' reported
  load, and a process-independent hash (router.routing.policies.prefix);
- `--replica-max-in-flight` is divided among the workers; `--queue-size` and `--queue-per-key`
  bound each worker's queue; the retry budget, circuit breakers, health and load probes (N
  times the probes of one router) and learnt token estimates are per worker, like routers'.
"""
