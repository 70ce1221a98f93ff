"""The router: one address in front of several engine replicas (workers).

`pegboard router --worker URL ...` runs it standalone; `pegboard serve --dp-size N` starts N
replicas and runs it on the serve port. Per request the active `router` plugin's `route` hook
picks the worker (`pool.py` keeps the workers' health and load, `proxy.py` forwards and
retries, `metrics.py` counts, `app.py` is the HTTP application).
"""
