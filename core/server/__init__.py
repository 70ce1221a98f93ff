"""`pegboard serve`'s HTTP layer: an OpenAI-compatible API over the async engine.

`create_app(ServerState(...))` builds the FastAPI app; `run_server` runs it under uvicorn with
a graceful drain on SIGTERM.
"""
