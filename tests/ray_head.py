"""A local Ray for the tests, built with Ray's own `ray.cluster_utils.Cluster`: a head with the
CPUs given (2 by default, no dashboard, loopback only) whose address is printed, and worker nodes
of one CPU each, added and lost on command, so that tests see a cluster grow and lose a node.

Commands on stdin, one a line, each answered on stdout: ``add`` starts a node (answer: its
raylet's pid); ``kill`` SIGKILLs the newest node's processes, as a machine lost would be (answer:
``killed``). End of stdin, which comes when the test run ends however it ends, shuts down this
Ray and only this one: never `ray stop`."""

import os
import sys

import ray
from ray.cluster_utils import Cluster

cluster = Cluster(initialize_head=True,
                  head_node_args={"num_cpus": int(sys.argv[1]) if len(sys.argv) > 1 else 2,
                                  "include_dashboard": False})
# The Cluster leaves its address where a bare `ray.init()` would attach to it; the tests start
# Rays of their own beside it.
os.remove(ray._private.utils.get_ray_address_file(None))
print(cluster.address, flush=True)
nodes = []
for line in sys.stdin:
    if line.strip() == "add":
        nodes.append(cluster.add_node(num_cpus=1))
        print(nodes[-1].all_processes[ray._private.ray_constants.PROCESS_TYPE_RAYLET][0].process.pid, flush=True)
    elif line.strip() == "kill":
        cluster.remove_node(nodes.pop(), allow_graceful=False)
        print("killed", flush=True)
cluster.shutdown()
