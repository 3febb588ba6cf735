"""A local Ray for the tests: started with what the test environment says (2 CPUs, no
dashboard, loopback only), its address printed, and shut down when stdin closes, which happens
when the test run ends however it ends. Only this Ray is stopped: never `ray stop`."""

import sys

import ray

ray.init(num_cpus=int(sys.argv[1]) if len(sys.argv) > 1 else 2, include_dashboard=False)
print(ray.get_runtime_context().gcs_address, flush=True)
sys.stdin.read()
ray.shutdown()
