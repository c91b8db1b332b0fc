"""The design kvstate replaces, built faithfully: an "Operation" HTTP service with one PostgreSQL row per operation.

``document``: the row's JSON shape and the one blind update rule every service applies;
``service``: the Litestar + asyncpg app (naive GET/PUT and careful SELECT ... FOR UPDATE);
``settings``: its environment; ``python -m bench.baseline`` runs it under uvicorn.
"""
