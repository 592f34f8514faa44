"""How ranks are numbered, named, split into stages and placed on machines."""

from loupe.config import ServerArgs
from loupe.distributed.parallel import Ranks, stage_layers
from loupe.launch_server import replica_address, replica_ranks


def test_stages_split_the_layers_evenly_first_stages_taking_the_rest():
    stages = [stage_layers(30, 4, p) for p in range(4)]
    assert [len(s) for s in stages] == [8, 8, 7, 7]
    assert [i for s in stages for i in s] == list(range(30))


def test_names_and_labels_show_the_ranks_that_exist():
    assert Ranks().process_name() == "scheduler" and Ranks().labels() == {"TP": 0}
    ranks = Ranks(tp_rank=1, tp_size=2, pp_rank=1, pp_size=2, dp_rank=0, dp_size=2)
    assert ranks.process_name() == "scheduler [TP 1] [PP 1] [DP 0]"
    assert ranks.labels() == {"TP": 1, "PP": 1, "DP": 0}
    assert ranks.world_rank == 3 and not ranks.is_driver and ranks.is_last_stage
    assert Ranks(dp_rank=1, dp_size=2).process_name() == "scheduler [DP 1]"
    assert [Ranks.of_world_rank(w, 2, 3).world_rank for w in range(6)] == list(range(6))
    assert Ranks.of_world_rank(3, 2, 2, dp_rank=0, dp_size=2) == ranks


def test_each_node_runs_its_share_of_every_replicas_ranks():
    args = ServerArgs(tp_size=2, pp_size=2, dp_size=2, nnodes=2, node_rank=1, dist_init_addr="10.0.0.1:29500")
    placed = [(r.dp_rank, r.pp_rank, r.tp_rank) for d in range(2) for r in replica_ranks(args, d)]
    assert placed == [(0, 1, 0), (0, 1, 1), (1, 1, 0), (1, 1, 1)]
    assert [replica_address(args, d) for d in range(2)] == ["10.0.0.1:29500", "10.0.0.1:29501"]
    assert replica_address(ServerArgs(), 0) is None  # one rank: nothing to meet
