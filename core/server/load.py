"""`GET /load`: what this server holds now, for a router in front of several replicas
(`pegboard router`, `pegboard serve --dp-size N`) to balance by — requests in the engine
(waiting and running), the tokens they occupy, KV usage and prefix-cache counters."""

from __future__ import annotations

from fastapi import APIRouter, Request

router = APIRouter()


@router.get("/load", tags=["server"])
async def load(http: Request) -> dict:
    """Requests and tokens in flight (0 while the model loads)."""
    state = http.app.state.server
    if state.engine is None:
        return {"num_requests": 0, "num_waiting": 0, "num_running": 0, "num_tokens": 0}
    engine = state.engine.engine
    requests = list(engine.requests.values())  # a snapshot: the step loop runs on its thread
    stats = engine.kv.stats()
    return {
        "num_requests": len(requests),
        "num_waiting": len(engine.waiting),
        "num_running": len(engine.running),
        "num_tokens": sum(r.num_tokens for r in requests),
        "kv_usage": round(engine.kv.usage(), 4),
        "prefix_hit_tokens": int(stats.get("prefix_hit_tokens", 0)),
        "prefix_query_tokens": int(stats.get("prefix_query_tokens", 0)),
    }
