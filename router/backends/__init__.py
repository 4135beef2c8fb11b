"""The replicas behind the router and what keeps them honest: the pool (membership and probes),
each backend's state, load reports, the circuit breaker, the timeouts of requests in flight
(watchdog) and the retry budget that bounds how much extra work failures may add."""
