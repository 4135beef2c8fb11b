"""HTTP at both ends of the router: the client-facing HTTP/1.1 server (server, connection,
messages, asgi), what a request path means (paths) and CORS (cors), and the keep-alive client
the router sends requests to replicas with (upstream). No routing decisions are made here."""
