"""What the router and replicas import from the control plane: Redis access, membership, API keys,
and the OpenAI error bodies both servers speak. Nothing here imports router/ or replica/."""
