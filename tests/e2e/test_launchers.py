"""Other launchers: a two-node torchrun simulation on loopback, and torchrun / plain python for train.py."""
from __future__ import annotations

import json
import subprocess
import tarfile

from launch import BIN, REPO, env, free_port, losses, run, tiny_run_config, write_config


def test_two_nodes_split_the_shards_without_overlap(digits, tmp_path):
    pattern = str(digits / "train" / "{00000..00003}.tar")
    port = str(free_port())
    agents = [
        subprocess.Popen([str(BIN / "torchrun"), "--nnodes", "2", "--nproc_per_node", "1", "--node_rank", str(node),
                          "--master_addr", "127.0.0.1", "--master_port", port,
                          str(REPO / "tests" / "e2e" / "node_split.py"), pattern, str(tmp_path)],
                         cwd=REPO, env=env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for node in (0, 1)
    ]
    for agent in agents:
        output, _ = agent.communicate(timeout=180)
        assert agent.returncode == 0, output[-3000:]
    per_node = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert all(node["world_size"] == 2 for node in per_node)
    every_key = []
    for shard in sorted((digits / "train").glob("*.tar")):
        with tarfile.open(shard) as tar:
            every_key += sorted({m.name.split(".")[0] for m in tar.getmembers()})
    first, second = (set(node["keys"]) for node in per_node)
    assert not first & second
    assert sorted(first | second) == sorted(every_key)
    assert abs(len(first) - len(second)) <= 8 * 2  # balanced to within a batch per worker


def test_torchrun_and_plain_python_run_the_same_training(digits, tmp_path):
    config = write_config(tmp_path / "run.yaml", tiny_run_config(digits, tmp_path / "torchrun", steps=3))
    result = run([str(BIN / "torchrun"), "--nproc_per_node", "2", "--master_port", str(free_port()),
                  str(REPO / "train.py"), "--config", str(config)])
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert sorted(losses(tmp_path / "torchrun")) == [1, 2, 3]
    single = run([str(BIN / "python"), str(REPO / "train.py"), "--config", str(config),
                  f"output_dir={tmp_path / 'single'}", "train.steps=2"])
    assert single.returncode == 0, single.stdout[-3000:] + single.stderr[-3000:]
    assert sorted(losses(tmp_path / "single")) == [1, 2]
