"""One rank of tests/test_netlab.py, started inside its lab namespace with ``ip netns exec``: joins the
gloo group over the lab link (env:// from NetLab.rank_env), allreduces a tensor and writes what it saw."""

import datetime
import json
import os
import socket
import sys

import torch
import torch.distributed as dist


def main(out_path: str) -> None:
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method="env://", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=60))
    try:
        # 1 MiB of fp32 per rank, values that identify the rank: the sum is known exactly
        x = torch.arange(1 << 18, dtype=torch.float32) + 1000.0 * (rank + 1)
        dist.all_reduce(x)
        expected = world * torch.arange(1 << 18, dtype=torch.float32) + 1000.0 * world * (world + 1) / 2
        addrs = [line.split()[3] for line in os.popen("ip -o -4 addr show").read().splitlines()]
        dist.barrier()
        with open(out_path, "w") as f:
            json.dump({"rank": rank, "world_size": world, "max_abs_err": float((x - expected).abs().max()),
                       "ifname": os.environ.get("GLOO_SOCKET_IFNAME"), "addresses": addrs,
                       "hostname": socket.gethostname(), "netns": os.readlink("/proc/self/ns/net")}, f)
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
