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
