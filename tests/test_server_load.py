"""A real server under concurrent load: many streaming clients at once, and a scheduler swap
through the admin API while requests run."""

from __future__ import annotations

import asyncio

import httpx
import pytest
import yaml
from test_server_process import ADMIN_TOKEN, ServerProcess, offline_texts, stream_completion

PROMPTS = [
    "The capital of France is",
    "Once upon a time",
    "Plugins extend the engine:",
    "def add(a, b):",
    "Mountains, oceans, forests",
    "She sells sea shells",
    "Numbers like 12, 345",
    "Attention lets every token",
]
MAX_TOKENS = 32


@pytest.fixture(scope="module")
def server(tiny_llama_dir, tmp_path_factory):
    # Settings from a YAML file, one of them overridden by a flag.
    root = tmp_path_factory.mktemp("serve")
    config = root / "serve.yaml"
    config.write_text(
        yaml.safe_dump(
            {"served-model-name": "tiny", "admin_token": ADMIN_TOKEN, "scheduler": "sjf",
             "max-running-requests": 48}
        )
    )  # fmt: skip
    proc = ServerProcess(tiny_llama_dir, root, "--config", str(config), "--scheduler", "fcfs")
    try:
        yield proc.wait_ready()
    finally:
        assert proc.stop() == 0, proc.log()


@pytest.fixture(scope="module")
def reference(tiny_llama_dir) -> dict[str, str]:
    return offline_texts(tiny_llama_dir, PROMPTS, MAX_TOKENS)


@pytest.mark.slow
def test_64_concurrent_streaming_clients_all_get_the_right_output(server, reference):
    prompts = [PROMPTS[i % len(PROMPTS)] for i in range(64)]

    async def main():
        client = server.async_client(timeout=120)
        try:
            return await asyncio.gather(
                *(
                    stream_completion(client, p, max_tokens=MAX_TOKENS, temperature=0)
                    for p in prompts
                )
            )
        finally:
            await client.close()

    results = asyncio.run(main())
    assert [text for text, _ in results] == [reference[p] for p in prompts]
    assert all(reason in ("stop", "length") for _, reason in results)


@pytest.mark.slow
def test_scheduler_swaps_under_load_lose_no_request(server, reference):
    prompts = [PROMPTS[i % len(PROMPTS)] for i in range(32)]

    async def main():
        client = server.async_client(timeout=120)
        admin = httpx.AsyncClient(
            base_url=server.url, headers={"Authorization": f"Bearer {ADMIN_TOKEN}"}, timeout=60
        )
        try:
            tasks = [
                asyncio.create_task(
                    stream_completion(client, p, max_tokens=MAX_TOKENS, temperature=0)
                )
                for p in prompts
            ]
            swaps = []
            for name in ("sjf", "priority", "fcfs"):
                await asyncio.sleep(0.05)
                in_flight = sum(not t.done() for t in tasks)
                r = await admin.post("/admin/plugins/scheduler", json={"name": name})
                swaps.append((r.status_code, r.json(), in_flight))
            return await asyncio.gather(*tasks), swaps
        finally:
            await client.close()
            await admin.aclose()

    results, swaps = asyncio.run(main())
    assert [s[1]["active"] for s in swaps] == ["sjf", "priority", "fcfs"]
    assert all(status == 200 for status, _, _ in swaps)
    assert swaps[0][2] > 0  # the first swap happened while requests were running
    assert [text for text, _ in results] == [reference[p] for p in prompts]


def test_settings_come_from_the_config_file_and_flags_win(server):
    report = server.admin("GET", "/admin/plugins").json()
    assert report["active"]["scheduler"] == "fcfs"  # --scheduler beat the file's sjf
    assert [m.id for m in server.client().models.list().data] == ["tiny"]
