"""The fleet's router: one OpenAI-compatible endpoint in front of many replicas.

It balances by health, queue depth and prefix-cache affinity, streams SSE through untouched,
retries only before the first byte reached the client, and enforces the control plane's API keys
and limits. It imports fleet.control (membership, keys, errors) and never the replica package.

The folders are the design:

    router/             the request path and the process
      __main__.py         `python -m router` / `fleet router`: flags -> RouterConfig (config.py)
      serve.py            runs one process: the HTTP server on uvloop until SIGTERM
      app.py              RouterApp: builds the parts; the handlers each path is dispatched to
      keyed.py            a fleet key's request until its exchange: plan, admission (callbacks)
      plan.py             what a proxied request is (model, body, prompt units, reservation)
      proxy.py            what every exchange shares: pool, policies, client, queue, budget
      exchange.py         one request's state machine, replica to client, retries included
      stream_resume.py    a stream whose replica died, carried on by another of ours
      accounting.py       where every request ends: metrics, token learning, key settlement
      usage.py, usage_tap.py   the replica's `usage`, from a whole answer or a stream
      auth.py             which keys may call (static keys or the fleet's KeyStore)
      side_app.py, admin.py    the router's own routes (health, metrics, models, admin)
      metrics.py          counters kept in dicts, turned into Prometheus families on scrape
    router/http/        HTTP at both ends: the client-facing server (server, connection,
                        messages, asgi), paths and CORS, and the upstream client to replicas
    router/routing/     choosing a replica: pick (candidates, session, policy), policies/,
                        prompt units, prefix index, token estimates, sticky sessions, exact
                        affinity (prompts hashed as replicas hash them, for their KV events)
    router/backends/    the replicas: pool (membership, probes), backend state, load reports,
                        circuit breaker, watchdog (timeouts), retry budget
    router/queueing/    requests no replica can take now wait here (bounded, with a deadline),
                        per-key sub-queues served round-robin, instead of a 503

One chat request, in order (each file entered once):

    http/connection.py  ClientConnection parses the request whole and calls the handler
    app.py              RouterApp.handle -> _proxied: the caller's key (auth.py), then
    plan.py             Planner.plan: parse the body once, the model, prompt units and token
                        estimate -> Plan (a fleet key: keyed.py checks its model and admits
                        it against its limits, Redis answering on a callback)
    proxy.py            Proxy.start builds the exchange from the plan
    exchange.py         Exchange.dispatch asks
    routing/pick.py     for the replica: the pool's routable ones of the task with room, then
    routing/policies/   the session's or the policy's choice (none: queueing/ holds the
                        exchange until one has); the exchange sends the request and relays
                        the answer from callbacks
    http/upstream.py    HttpClient: a keep-alive connection to the replica, the answer parsed
    accounting.py       Accounting.ended: counted, token ratio learnt; a fleet key settled
"""
