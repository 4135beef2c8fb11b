"""What the router and replicas import from the control plane: Redis access, membership, API keys,
and the OpenAI error bodies both servers speak (as plain data: no HTTP framework here; see
fleet/web_errors.py and fleet/web_security.py). Nothing here imports router/ or replica/."""
