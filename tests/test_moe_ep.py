"""Expert parallelism on CPU (gloo, 2 ranks): each rank holds half of the physical expert slots;
greedy outputs equal one process and transformers for Qwen3-MoE, Mixtral and Qwen2-MoE
(batching, chunked prefill, preemption); placements that move experts between the ranks
(forced, and EPLB with redundant experts) change no output; the recorder's slot counts give each
rank's tokens; bad EP settings exit 2 before the model loads."""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
import torch
from fixtures.tiny_moe import build_tiny_moe
from pegboard.core.cli.main import main
from pegboard.core.config import EngineConfig
from pegboard.core.llm import LLM
from pegboard.core.models.moe import MoEExperts, moe_blocks
from pegboard.core.moe.expert_parallel import ExpertParallel, transfer_plan
from pegboard.core.moe.flags import MoEFlagError, check_moe
from pegboard.sdk.expert_placement import ExpertPlacement
from pegboard.sdk.types import Request, SamplingParams
from test_engine_parity import hf_reference, make_prompts
from test_server_process import ServerProcess, offline_texts
from test_tensor_parallel import agreeing_steps

MAX_NEW = 8
#: Chunked prefill (16 tokens a step) and a pool of 16 pages of 4 tokens: less than the prompts
#: need at once, so requests are preempted and recomputed.
SETTINGS = dict(
    dtype="float32", device="cpu", max_num_batched_tokens=16, page_size=4, kv_cache_tokens=64
)


@pytest.fixture(scope="module")
def moe_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("moe-ep")
    return {
        arch: build_tiny_moe(root / arch, arch) for arch in ("qwen3_moe", "mixtral", "qwen2_moe")
    }


def run(llm: LLM, prompts: list[list[int]], at_step=None) -> list[Request]:
    """Greedy requests stepped to the end; `at_step(step)` runs between two steps."""
    params = SamplingParams(max_tokens=MAX_NEW, temperature=0.0)
    requests = [Request(p, params) for p in prompts]
    for r in requests:
        llm.engine.add_request(r)
    step = 0
    while llm.engine.has_work():
        if at_step is not None:
            at_step(step)
        llm.engine.step()
        step += 1
    assert all(r.error is None for r in requests), [r.error for r in requests]
    return requests


def transfers(llm: LLM) -> int:
    """Expert tensors rank 0 sent to or received from the other rank."""
    return sum(block.ep.transfers for block in moe_blocks(llm.engine.runner.model))


@pytest.mark.slow
@pytest.mark.parametrize("arch", ["qwen3_moe", "mixtral", "qwen2_moe"])
def test_ep2_greedy_equals_one_process_and_transformers(moe_dirs, arch):
    model_dir = moe_dirs[arch]
    prompts = make_prompts(512)[:6]
    reference = [t for t, _ in hf_reference(model_dir, prompts, MAX_NEW)]
    with LLM(str(model_dir), ep_size=2, **SETTINGS) as llm:
        experts = moe_blocks(llm.engine.runner.model)[0].experts
        total = llm.engine.runner.model.config.moe.num_experts
        assert experts.w13.shape[0] == total // 2, "rank 0 holds all the experts"
        requests = run(llm, prompts)
    assert sum(r.num_preemptions for r in requests) > 0, "the KV pool was not small enough"
    with LLM(str(model_dir), **SETTINGS) as llm:
        one = [r.output_token_ids for r in run(llm, prompts)]
    assert [r.output_token_ids for r in requests] == one == reference


def test_ep2_placements_moving_experts_between_ranks_change_no_output(moe_dirs, tmp_path):
    """Qwen2-MoE (6 experts, a shared expert split over the ranks) with 2 redundant slots: the
    first placement comes from `--init-expert-location`, at step 3 a placement is forced that
    sends most experts to the other rank, and EPLB places again every 3 steps from the
    recorded load."""
    model_dir = moe_dirs["qwen2_moe"]
    static = torch.arange(8) % 6  # as loaded: rank 0 holds experts 0-3, rank 1: 4, 5, 0, 1
    location = tmp_path / "location.json"
    location.write_text(json.dumps({"physical_to_logical": [((static + 3) % 6).tolist()] * 2}))
    prompts = make_prompts(512)[:6]
    reference = [t for t, _ in hf_reference(model_dir, prompts, MAX_NEW)]
    settings = dict(
        SETTINGS,
        expert_placement="eplb",
        ep_num_redundant_experts=2,
        eplb_rebalance_num_iterations=3,
        init_expert_location=str(location),
    )
    with LLM(str(model_dir), ep_size=2, **settings) as llm:
        runtime = llm.engine.moe
        assert transfers(llm) > 0, "the initial location moved nothing between the ranks"
        assert runtime.current().physical_to_logical[0].tolist() == [3, 4, 5, 0, 1, 2, 3, 4]
        flipped = ExpertPlacement(static.flip(0).repeat(runtime.topology.num_layers, 1), 6)

        def force(step: int) -> None:
            if step == 3:
                runtime._apply(flipped, "test")

        before = transfers(llm)
        requests = run(llm, prompts, force)
        assert transfers(llm) > before, "no expert moved between the ranks"
        assert runtime.rebalances >= 3, "EPLB never placed the experts again"
        assert int(runtime.current().replica_count.max()) > 1
        assert sum(r.num_preemptions for r in requests) > 0, "the KV pool was not small enough"
        slots = runtime.recorder.slot_load()
        ranks = slots.view(slots.shape[0], 2, 4).sum(dim=2)
        assert bool((ranks > 0).all()), f"a rank computed no tokens: {ranks}"
        assert torch.equal(slots.sum(dim=1), runtime.recorder.load().sum(dim=1))
        assert 0 < runtime.balancedness <= 1
    assert [r.output_token_ids for r in requests] == reference


@pytest.mark.slow
def test_ep2_skewed_router_is_balanced_by_eplb_and_routes_alike_on_both_ranks(moe_dirs):
    """`--moe-router-skew` on both ranks (else their routing and the outputs would differ);
    EPLB's placement spreads the skewed load over the ranks better than static."""
    model_dir = moe_dirs["qwen3_moe"]
    prompts = make_prompts(512, seed=1)[:8]
    skew = dict(SETTINGS, moe_router_skew=3.0, expert_distribution_recorder_mode="stat")
    results = {}
    for placement in ("static", "eplb"):
        settings = dict(skew, expert_placement=placement, eplb_rebalance_num_iterations=4)
        with LLM(str(model_dir), ep_size=2, ep_num_redundant_experts=2, **settings) as llm:
            tokens = [r.output_token_ids for r in run(llm, prompts)]
            results[placement] = (tokens, llm.engine.moe.balancedness)
    with LLM(str(model_dir), **skew) as llm:
        one = [r.output_token_ids for r in run(llm, prompts)]
    assert results["static"][0] == results["eplb"][0] == one
    assert results["eplb"][1] > results["static"][1], results


@pytest.mark.slow
def test_ep2_server_answers_like_one_process_while_eplb_moves_experts(moe_dirs, tmp_path):
    """`pegboard serve --ep-size 2 --enable-eplb` driven by the openai client: concurrent
    completions equal the one-process engine's while EPLB places 6 + 2 slots every 2 steps;
    /metrics exports the measured balancedness."""
    model_dir = moe_dirs["qwen2_moe"]
    flags = ["--ep-size", "2", "--enable-eplb", "--ep-num-redundant-experts", "2"]
    flags += ["--eplb-rebalance-num-iterations", "2", "--served-model-name", "tiny"]
    prompts = ["the quick brown fox", "a tiny mixture of experts", "hello"]
    expected = offline_texts(model_dir, prompts, 12)
    server = ServerProcess(model_dir, tmp_path, *flags)
    try:
        server.wait_ready()
        client = server.client()
        with ThreadPoolExecutor(len(prompts)) as pool:
            replies = pool.map(
                lambda p: client.completions.create(
                    model="tiny", prompt=p, max_tokens=12, temperature=0
                ),
                prompts,
            )
            texts = {p: r.choices[0].text for p, r in zip(prompts, replies)}
        assert texts == expected
        metrics = httpx.get(server.url + "/metrics", timeout=10).text
        (line,) = [m for m in metrics.splitlines() if m.startswith("pegboard:eplb_balancedness")]
        assert 0 < float(line.split()[-1]) <= 1
    finally:
        server.stop()


# ---------------------------------------------------------------------- one process


@pytest.mark.parametrize("pairs", [4, 200], ids=["gathered-decode", "sorted-prefill"])
def test_two_ranks_partial_outputs_sum_to_the_whole_layer(pairs):
    """What each rank computes on its half of the slots (-1 for the other half's pairs) adds up
    to the whole layer's output, on both paths of the expert computation."""
    torch.manual_seed(0)
    slots, hidden, size, k = 8, 16, 12, 2
    whole = MoEExperts(slots, hidden, size, {}, "experts")
    whole.w13.data.normal_()
    whole.w2.data.normal_()
    x = torch.randn(pairs // k, hidden)
    chosen = torch.stack([torch.randperm(slots)[:k] for _ in range(pairs // k)])
    weights = torch.rand(pairs // k, k)
    expected = whole(x, chosen, weights)
    total = torch.zeros_like(expected)
    for rank in range(2):
        ep = ExpertParallel(rank, 2, slots, communicate=None)
        part = MoEExperts(slots // 2, hidden, size, {}, "experts")
        part.w13.data.copy_(whole.w13.data[ep.first : ep.first + 4])
        part.w2.data.copy_(whole.w2.data[ep.first : ep.first + 4])
        total += part(x, *ep.localize(chosen, weights))
    torch.testing.assert_close(total, expected)


def test_transfer_plan_copies_locally_when_it_can_and_spreads_sends_over_replicas():
    old = [0, 1, 2, 3, 4, 4, 5, 0]  # rank 1 holds expert 4 twice; expert 0 is on both ranks
    new = [4, 4, 5, 0, 0, 1, 2, 3]
    plan = transfer_plan(old, new, size=2)
    # rank 0 takes 4 from both of its holders, 5 from rank 1 and copies 0 locally; rank 1
    # copies its own 0 and takes 1, 2, 3 from rank 0
    assert plan == [(4, 0), (5, 1), (6, 2), (0, 3), (7, 4), (1, 5), (2, 6), (3, 7)]


def test_ep_settings_are_checked_before_loading(moe_dirs, tiny_llama_dir, monkeypatch):
    qwen3 = str(moe_dirs["qwen3_moe"])
    assert EngineConfig(ep_size=2).tp_size == 2  # --ep-size alone starts that many ranks
    with pytest.raises(ValueError, match="--ep-size 2 must equal --tp-size 4"):
        EngineConfig(ep_size=2, tp_size=4)
    with pytest.raises(MoEFlagError, match="--ep-size 3 does not divide the 8 experts"):
        check_moe(EngineConfig(model=qwen3, ep_size=3))
    with pytest.raises(MoEFlagError, match="8 experts \\+ 1 redundant"):
        check_moe(EngineConfig(model=qwen3, ep_size=2, ep_num_redundant_experts=1))
    with pytest.raises(MoEFlagError, match="needs a mixture-of-experts model; LlamaForCausalLM"):
        check_moe(EngineConfig(model=str(tiny_llama_dir), ep_size=2))
    with pytest.raises(MoEFlagError, match="with --tp-size 2 add --ep-size 2"):
        check_moe(EngineConfig(model=qwen3, tp_size=2))
    check_moe(EngineConfig(model=qwen3, ep_size=2, ep_num_redundant_experts=2, device="cpu"))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    with pytest.raises(
        MoEFlagError, match="--ep-size 2 over 1 node.s. needs 2 GPU.*only 1 are visible"
    ):
        check_moe(EngineConfig(model=qwen3, ep_size=2, device="cuda"))


@pytest.mark.parametrize(
    "arch, flags, message",
    [
        ("qwen3_moe", ["--ep-size", "3"], "--ep-size 3 does not divide the 8 experts"),
        ("qwen3_moe", ["--ep-size", "2", "--device", "cuda"], "CUDA is not available"),
        ("llama", ["--enable-eplb"], "needs a mixture-of-experts model"),
    ],
    ids=["not-dividing", "more-ranks-than-devices", "eplb-on-dense"],
)
def test_bad_ep_flags_exit_2_before_the_model_loads(
    moe_dirs, tiny_llama_dir, arch, flags, message, capsys
):
    model_dir = tiny_llama_dir if arch == "llama" else moe_dirs[arch]
    status, stderr = generate_exit(capsys, "--model", str(model_dir), "--device", "cpu", *flags)
    assert status == 2, stderr
    assert message in stderr
    assert "Loading weights" not in stderr


def generate_exit(capsys, *args: str) -> tuple[int, str]:
    """`pegboard generate hello ARGS` run in this process (a usage error is found before any
    model loads, as in a process of its own; a check that let it through would load the tiny
    model and answer, not hang): the exit status and stderr."""
    try:
        status = main(["generate", "hello", *args])
    except SystemExit as e:  # argparse's own errors
        status = e.code
    return status, capsys.readouterr().err


# ---------------------------------------------------------------------- GPU (2 devices)


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 GPUs")
def test_ep2_on_two_gpus_agrees_with_one_gpu_through_eplb_moves(moe_dirs):
    """NCCL all-reduces and point-to-point expert moves, CUDA graphs and overlap on: with EPLB
    placing 8 + 4 slots every 2 steps, the EP=2 greedy tokens equal one GPU's up to the first
    step where one GPU's top-2 logprobs are within 0.01 (sums in another order)."""
    model_dir = moe_dirs["qwen3_moe"]
    prompts = make_prompts(512)[:8]
    params = SamplingParams(max_tokens=16, temperature=0.0, logprobs=2)
    settings = dict(
        dtype="float32",
        device="cuda",
        kv_cache_tokens=4096,
        cuda_graph_max_bs=8,
        expert_placement="eplb",
        ep_num_redundant_experts=4,
        eplb_rebalance_num_iterations=2,
    )
    with LLM(str(model_dir), **settings) as llm:
        one = llm.generate(prompts, params)
    with LLM(str(model_dir), ep_size=2, **settings) as llm:
        assert llm.engine.runner.cuda_graphs is not None, llm.engine.runner.cuda_graph_off_reason
        two = llm.generate(prompts, params)
        assert transfers(llm) > 0, "no expert moved between the GPUs"
    assert agreeing_steps(one, two, margin=0.01) > len(one) * 8  # most had a clear winner


def test_llm_refuses_an_ep_size_not_dividing_the_experts_before_starting_ranks(moe_dirs):
    from pegboard.core.distributed import check_tensor_parallel

    config = EngineConfig(model=str(moe_dirs["qwen3_moe"]), device="cpu", ep_size=3)
    with pytest.raises(MoEFlagError, match="--ep-size 3 does not divide the 8 experts"):
        check_tensor_parallel(config)  # `LLM(...)`'s first step, before any rank is spawned
