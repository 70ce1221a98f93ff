"""Mixture-of-experts flags (SGLang's names) and the checks they get before the model loads.

--ep-size N                            experts spread over N ranks (the tensor-parallel ranks)
--enable-eplb                          -> --expert-placement eplb
--ep-num-redundant-experts R           R extra physical slots per layer for hot replicas
--eplb-rebalance-num-iterations N      ask the placement plugin again every N steps
--expert-distribution-recorder-mode M  stat (sliding window) | per_pass
--init-expert-location trivial|FILE    the first placement: the plugin's, or a JSON file's
--moe-kernel auto|triton|torch         the routed experts' computation (core/moe/kernel.py)
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from pegboard.core.models.errors import ModelLoadError


class MoEFlagError(ModelLoadError):
    """MoE flags the model cannot run with (a user error: exit 2 before the model loads)."""


def add_moe_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("mixture of experts (SGLang's flags; docs/moe.md)")
    g.add_argument(
        "--ep-size",
        "--expert-parallel-size",
        type=int,
        dest="ep_size",
        metavar="N",
        help="ranks the experts are spread over, the tensor-parallel ranks (alone it sets "
        "--tp-size; attention is split over them) (default 1)",
    )
    g.add_argument(
        "--enable-eplb",
        action="store_true",
        default=None,
        help="balance expert load with EPLB (--expert-placement eplb)",
    )
    g.add_argument(
        "--ep-num-redundant-experts",
        type=int,
        metavar="R",
        help="extra physical expert slots per layer for replicas of hot experts (default 0)",
    )
    g.add_argument(
        "--eplb-rebalance-num-iterations",
        type=int,
        metavar="N",
        help="steps between two placements from the recorded load (default 1000)",
    )
    g.add_argument(
        "--expert-distribution-recorder-mode",
        choices=["stat", "per_pass"],
        help="record expert load: stat (sliding window) or per_pass (default: stat "
        "when the placement is not static, else off)",
    )
    g.add_argument(
        "--moe-router-skew",
        type=float,
        metavar="S",
        help="benchmarks: add -S*log(rank) to each layer's router logits (a Zipf-like skew over "
        "a per-layer random order of the experts) (default 0: off)",
    )
    g.add_argument(
        "--moe-kernel",
        choices=["auto", "triton", "torch"],
        help="the routed experts' computation: the fused Triton MoE kernel (grouped GEMMs) or "
        "the PyTorch reference path (default auto: triton on CUDA where the fused kernels run, "
        "else torch)",
    )
    g.add_argument(
        "--init-expert-location",
        metavar="trivial|FILE",
        help="the first placement: trivial (the placement plugin's) or a JSON file "
        "with physical_to_logical [layers][slots] (default trivial)",
    )


def moe_settings(args: argparse.Namespace, settings: dict[str, Any]) -> None:
    """`--enable-eplb` selects the `eplb` placement plugin."""
    if getattr(args, "enable_eplb", None):
        settings["expert_placement"] = "eplb"
    settings.pop("enable_eplb", None)


def check_moe(config, model_config=None) -> None:
    """Raise `MoEFlagError` for MoE settings the model cannot run with: EP or EPLB on a dense
    model, an EP size that does not divide the experts (+ redundant) or the shared expert, more
    EP ranks than GPUs, an MoE model over tensor-parallel ranks without EP, a missing location
    file. `model_config` (a `ModelConfig`) is read from `config.model` when not given."""
    wants_moe = (
        config.ep_size > 1
        or config.ep_num_redundant_experts > 0
        or config.expert_placement not in (None, "static")
        or config.expert_distribution_recorder_mode is not None
        or config.init_expert_location != "trivial"
        or config.moe_router_skew > 0
    )
    if not wants_moe and config.tp_size == 1:
        return
    if model_config is None:
        model_config = _model_config(config) if wants_moe or config.model else None
    if model_config is None:
        return
    if model_config.moe is not None and config.tp_size > 1 and config.ep_size == 1:
        raise MoEFlagError(
            f"{model_config.architecture} is a mixture-of-experts model: with --tp-size "
            f"{config.tp_size} add --ep-size {config.tp_size} (experts spread over the ranks); "
            "experts split by tensor parallelism are not implemented (docs/moe.md)"
        )
    if not wants_moe:
        return
    what = (
        "--enable-eplb"
        if config.expert_placement == "eplb"
        else "--ep-size"
        if config.ep_size > 1
        else "expert placement flags"
    )
    if model_config.moe is None:
        raise MoEFlagError(
            f"{what} needs a mixture-of-experts model; {model_config.architecture} is dense"
        )
    physical = model_config.moe.num_experts + config.ep_num_redundant_experts
    if physical % config.ep_size:
        raise MoEFlagError(
            f"--ep-size {config.ep_size} does not divide the {model_config.moe.num_experts} "
            f"experts + {config.ep_num_redundant_experts} redundant ({physical} slots per layer)"
        )
    # (a rank's loaded config holds its share of the shared expert: the width times the ranks)
    shared = model_config.moe.shared_expert_size * model_config.moe.ep_size
    if shared % config.ep_size:
        raise MoEFlagError(
            f"--ep-size {config.ep_size} does not divide the shared expert's width {shared}"
        )
    check_ep_devices(config.ep_size, config.device, config.nnodes)
    location = config.init_expert_location
    if location != "trivial":
        try:
            raw = json.loads(Path(location).read_text())
            assert isinstance(raw["physical_to_logical"], list)
        except (OSError, ValueError, KeyError, TypeError, AssertionError) as e:
            raise MoEFlagError(
                f"--init-expert-location {location}: not a JSON file with "
                f"physical_to_logical [layers][slots] ({e!r})"
            ) from e


def check_ep_devices(ep_size: int, device: str, nnodes: int = 1) -> None:
    """One GPU per expert-parallel rank of this node (on the CPU, each rank is a process)."""
    # not at import: the CLI's parser imports this module, and topology imports torch
    from pegboard.core.distributed.topology import DistributedConfigError, Topology, check_devices

    try:
        check_devices(Topology(0, ep_size, 0, nnodes, 0, ""), device, flag="--ep-size")
    except DistributedConfigError as e:
        raise MoEFlagError(str(e)) from e


def _model_config(config):
    from pegboard.core.models.config import ModelConfig

    if config.model is None:
        raise MoEFlagError(
            "MoE flags need a mixture-of-experts --model; the default model is dense"
        )
    try:
        return ModelConfig.from_dir(config.model)
    except ModelLoadError:
        return None  # the loader reports it
