"""`bench prefix` workloads: SGLang's generated-shared-prefix shape is the default, `--shape
small` the earlier one, flags override a shape; and the router mode, which runs the workload
through `pegboard serve --dp-size 2` once per routing policy."""

from __future__ import annotations

from collections import Counter

import pytest
from pegboard.core.bench.prefix import SHAPES, PrefixWorkload, workload_from_args
from pegboard.core.bench.routing import run_router_bench, serve_command
from pegboard.core.cli.main import build_parser


def test_the_default_is_sglangs_generated_shared_prefix_shape():
    w = PrefixWorkload()
    assert (w.num_groups, w.per_group, w.prefix_len) == (64, 16, 2048)
    assert (w.min_suffix, w.max_suffix, w.output_len, w.order) == (128, 128, 256, "shuffled")
    assert SHAPES["generated-shared-prefix"] == w


def test_shuffled_order_keeps_the_groups_and_mixes_them():
    kw = dict(num_groups=4, per_group=4, prefix_len=8, min_suffix=2, max_suffix=2)
    shuffled, _ = PrefixWorkload(**kw).build()
    interleaved, _ = PrefixWorkload(**kw, order="interleaved").build()
    assert sorted(map(tuple, shuffled)) == sorted(map(tuple, interleaved))
    assert Counter(tuple(p[:8]) for p in shuffled) == Counter({tuple(p[:8]): 4 for p in shuffled})
    assert shuffled != interleaved  # same prompts, another order


def test_flags_override_the_chosen_shape():
    args = build_parser().parse_args(
        ["bench", "prefix", "--shape", "small", "--groups", "3", "--order", "grouped"]
    )
    w = workload_from_args(args)
    assert (w.num_groups, w.per_group, w.prefix_len, w.order) == (3, 16, 512, "grouped")
    default = workload_from_args(build_parser().parse_args(["bench", "prefix"]))
    assert default == PrefixWorkload()


@pytest.mark.slow
def test_router_mode_compares_cache_aware_with_round_robin(tiny_llama_dir):
    """SGLang's router benchmark in small: 2 replicas, 4 groups x 6 prompts sharing 96-token
    prefixes, shuffled. One request is admitted per step (token budget), so later requests of
    a group can hit the prefix cache of the replica its group went to."""
    workload = PrefixWorkload(
        num_groups=4, per_group=6, prefix_len=96, min_suffix=4, max_suffix=8, output_len=2,
        max_token_id=300,
    )  # fmt: skip
    args = build_parser().parse_args(
        ["bench", "prefix", "--model", str(tiny_llama_dir), "--dtype", "float32",
         "--device", "cpu", "--max-num-batched-tokens", "112",
         "--router-server-args", "--log-level warning"]
    )  # fmt: skip
    serve = serve_command(args, str(tiny_llama_dir), dummy=False)
    assert serve[serve.index("--kv-cache") + 1] == "radix"
    result = run_router_bench(workload, ["cache_aware", "round_robin"], serve, 2, 600)
    cache_aware, round_robin = result["policies"]["cache_aware"], result["policies"]["round_robin"]
    for r in (cache_aware, round_robin):
        assert r["completed"] == 24 and r["failed"] == 0
        assert sum(r["routed"]) == 24 and min(r["routed"]) > 0  # both replicas served
    # Cache-aware misses once per group; round robin about once per group per replica.
    assert cache_aware["hit_rate"] > round_robin["hit_rate"]
    assert cache_aware["router_hit_estimate"] > 0.5
    assert "cache_aware_vs_round_robin" in result
