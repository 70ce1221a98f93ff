"""Leaving a tensor-parallel group (core/distributed/tensor_parallel.py `close`): rank 0 marks
its children's exit as expected, tells them to stop, leaves the groups together with them and
only then waits for them. On two GPUs the old order (wait for the children first) hung: NCCL's
teardown waits for every rank, and the children sat in it waiting for rank 0."""

from pegboard.core.distributed.tensor_parallel import TensorParallel
from pegboard.core.distributed.topology import Topology


class _Log:
    def __init__(self):
        self.calls = []


class _Groups:
    def __init__(self, log):
        self.log = log
        self.device = "cpu"

    def broadcast_objects(self, objects):
        self.log.calls.append(("send", objects[0][0]))
        return objects

    def destroy(self):
        self.log.calls.append(("destroy",))


class _Children:
    def __init__(self, log):
        self.log = log
        self.procs = {}

    def expect_exit(self):
        self.log.calls.append(("expect_exit",))

    def close(self):
        self.log.calls.append(("wait_children",))


def test_rank_0_leaves_the_group_before_waiting_for_its_children():
    log = _Log()
    top = Topology(0, 2, 0, 1, 0, "127.0.0.1:1")
    tp = TensorParallel(top, _Groups(log), _Children(log))
    tp.close()
    assert log.calls == [("expect_exit",), ("send", "stop"), ("destroy",), ("wait_children",)]


class _Runner:
    """A follower's model runner: logs what the follower asks of it."""

    def __init__(self, log):
        import torch

        self.log, self.device, self.info, self.model = log, torch.device("cpu"), None, None

    def set_attention(self, backend, **graphs):
        self.log.calls.append(("set_attention",))

    def forward(self, batch):
        self.log.calls.append(("forward", batch))

    def release_graphs(self):
        self.log.calls.append(("release_graphs",))


class _Plugin:
    def setup(self, ctx):
        pass

    def attention_kernel(self, model, pool):
        return object()

    def close(self):
        pass


class _Plugins:
    def create(self, slot, name, options):
        return _Plugin()


class _Messages:
    def __init__(self, messages):
        self.messages = list(messages)

    def receive(self):
        return self.messages.pop(0)

    def receive_batch(self, payload):
        return payload


def test_a_follower_keeps_its_graphs_until_rank_0_says_stop(monkeypatch):
    """The graphs a follower captures when it binds its attention backend serve every step;
    they are released once, after "stop" (before NCCL's teardown). Session 9 released them
    right after each capture too, so every follower decoded eagerly."""
    import torch
    from pegboard.core.config import EngineConfig
    from pegboard.core.distributed import follower as follower_module
    from pegboard.core.moe import kernel as moe_kernel

    monkeypatch.setattr(moe_kernel, "select_moe_kernel", lambda model, choice: None)
    log = _Log()
    f = follower_module.Follower.__new__(follower_module.Follower)
    f.config = EngineConfig(gc_freeze=False)
    f.runner, f.plugins, f.attention, f.pool = _Runner(log), _Plugins(), None, None
    layout = (1, (2, 4, 1, 8), str(torch.float32), 4, None, None, "nhd")
    f.tp = _Messages(
        [("bind", ("triton", {}, layout, False, {})), ("forward", "step 1"), ("stop", None)]
    )
    f.run()
    assert log.calls == [("set_attention",), ("forward", "step 1"), ("release_graphs",)]
