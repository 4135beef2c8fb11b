"""Choosing a replica for a request: the policies, and what they weigh without a tokenizer (the
prompt in hashable units, token estimates learnt from usage, the prefix index of what each
replica has cached, sticky sessions)."""
