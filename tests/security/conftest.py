"""The security suite: attacks found on the running system, replayed against real processes.

Router attacks reuse the router tests' harness (fake replicas as real processes, routers as real
servers on loopback) and replica attacks the replica tests' live server, both in tests/support.
"""
