"""Workers join a running Ray job: a cluster of one 1-CPU node asked for 2 workers runs one; a node added while
the job runs places the second, which takes shards from then on."""

import pytest

from mmdiff_gen.io.dataset import GeneratedDataset
from mmdiff_gen.jobs.dataset_job import GenerateJob
from mmdiff_gen.jobs.generator import GenerateConfig, generate_dataset

PROMPTS = ["a large red circle on the left", "a small blue star on the right", "a large yellow square in the center",
           "a small white cross in the center", "a small green ring on the left", "a large purple star in the center"]


@pytest.fixture
def one_node_cluster():
    import ray
    from ray.cluster_utils import Cluster

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False})
    ray.init(address=cluster.address, log_to_driver=False, configure_logging=False)
    yield cluster
    ray.shutdown()
    cluster.shutdown()


def test_a_node_that_joins_takes_shards(one_node_cluster, tmp_path):
    said, joined = [], []

    def say(line):
        said.append(line)
        if "ready (1 working)" in line and not joined:  # the job runs on one worker: a node joins
            joined.append(one_node_cluster.add_node(num_cpus=1))

    job = GenerateJob(out=tmp_path / "ds", tasks=("seg",), images_per_prompt=2, shard_size=1, batch_size=1)
    config = GenerateConfig(prompts=PROMPTS, job=job, device="cpu", engine="ray", workers=2)
    rep = generate_dataset(config, progress=False, say=say)
    assert joined and any("ready (2 working)" in line for line in said), said
    per_worker = next(line for line in said if line.startswith("ray: shards per worker: ")).split(": ", 2)[2]
    assert len(per_worker.split("; ")) == 2, said  # both wrote shards
    assert (rep.shards_written, rep.samples_written, rep.workers_lost) == (12, 12, 0)
    assert [s.key for s in GeneratedDataset(tmp_path / "ds")] == [f"{i:09d}" for i in range(12)]
