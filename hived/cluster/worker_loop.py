"""What every Ray Train worker runs: the same Trainer and step loop as `hived train`.

Each worker builds the model from the daemon's tokenizer and shape (so all hold the same
vocabulary however the corpus was found on their node), restores Ray's latest checkpoint if the
group was restarted (or the run's own checkpoint when it continues one), wraps the model for
gradient averaging and trains its share of every global batch. Checkpoints go through
``ray.train.report``, which every worker calls at the same steps: the step loop decides them from
figures that are the same on every rank (the step, and a validation loss summed over ranks).
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import tempfile
import time
from pathlib import Path
from typing import Any

import ray
import ray.train
import ray.train.torch
import torch
from torch.nn.parallel import DistributedDataParallel

from .. import checkpoint
from ..config import RunConfig
from ..events import Events
from ..loop import checkpoint_state, run_steps
from ..trainer import Trainer, build_trainer
from .mailbox import Forwarder

STATE_FILE = "checkpoint.pt"  # the one file in each checkpoint Ray stores


@dataclasses.dataclass
class Job:
    """Everything a worker needs, sent once through ``train_loop_config``."""

    run: RunConfig
    base: dict[str, Any]  # tokenizer and model_config: the same model on every worker
    mailbox: Any  # the Mailbox actor's handle
    state: Any = None  # ObjectRef of a checkpoint to start from when Ray's storage has none
    threads: int = 0
    peer: Any = None  # PeerOptions: train as one peer of a hive instead


def weights_digest(state: dict[str, torch.Tensor]) -> str:
    """A hash of a model's weights: every rank of a data-parallel group must end with the same."""
    digest = hashlib.sha256()
    for name in sorted(state):
        digest.update(name.encode())
        digest.update(state[name].detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def data_parallel(trainer: Trainer, rank: int, world_size: int) -> None:
    """Make ``trainer`` one of ``world_size``: its gradients averaged with the others' (DDP also
    copies rank 0's weights to every rank), its batches a share of each global batch."""
    trainer.rank, trainer.world_size = rank, world_size
    device = trainer.device
    # LayerDrop leaves a skipped block without gradients, which DDP must be told to expect (every
    # rank draws the same skips: they share the seed).
    ddp = DistributedDataParallel(trainer.model, device_ids=[device.index] if device.type == "cuda" else None,
                                  find_unused_parameters=trainer.cfg.layer_drop > 0)
    trainer.forward = torch.compile(ddp) if trainer.cfg.compile else ddp


def restored(job: Job) -> dict[str, Any] | None:
    """The newest of Ray's latest registered checkpoint (after a restart, or a daemon that came
    back) and the run's own ``latest.pt`` the daemon started with: Ray registers a reported
    checkpoint a little after the report, so a daemon killed in between holds a newer one."""
    found = []
    saved = ray.train.get_checkpoint()
    if saved is not None:
        with saved.as_directory() as folder:
            found.append(checkpoint.load(Path(folder) / STATE_FILE))
    if job.state is not None:
        found.append(ray.get(job.state))
    return max(found, key=lambda state: state["step"], default=None)


def train_loop(config: dict[str, Any]) -> None:
    job: Job = config["job"]
    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    if job.threads:
        torch.set_num_threads(job.threads)
    me = {"rank": rank, "world_size": world, "pid": os.getpid(), "node": ray.util.get_node_ip_address()}
    job.mailbox.post.remote([("worker", me)])
    device = ray.train.torch.get_device()
    if job.peer is not None:
        from .hive_peer import serve

        return serve(job.peer, device, rank, world, job.mailbox)
    events = Events()
    if rank == 0:
        events.subscribe(Forwarder(job.mailbox))
    run = dataclasses.replace(job.run, train=dataclasses.replace(job.run.train, device=str(device)))
    trainer, data_key = build_trainer(run, job.base, events)
    state = restored(job)
    if state is not None:
        trainer.load_state_dict(state)
    data_parallel(trainer, rank, world)

    def save(names: tuple[str, ...]) -> None:
        """Rank 0 writes the state; every rank reports (a barrier), so Ray registers the
        checkpoint once all have reached the step; then the daemon is told where it is."""
        with tempfile.TemporaryDirectory() as folder:
            saved, name = None, None
            if rank == 0:
                checkpoint.save(checkpoint_state(trainer, data_key), Path(folder) / STATE_FILE)
                saved, name = ray.train.Checkpoint.from_directory(folder), f"step{trainer.step:08d}_{time.time_ns()}"
            ray.train.report({"step": trainer.step, "saved_as": list(names)}, checkpoint=saved,
                             checkpoint_dir_name=name)
        if rank == 0:
            events.emit("saved", step=trainer.step, names=list(names), dir=name)

    cfg = run.train
    events.emit("start", step=trainer.step, steps=cfg.steps, params=trainer.model.num_params(),
                world_size=world, device=str(device), config=dataclasses.asdict(cfg),
                model=dataclasses.asdict(trainer.model_cfg))
    run_steps(trainer, save, stop=lambda: False, sample=rank == 0)
    save(("latest.pt", "final.pt"))
    # Every rank's hash is in the mailbox before rank 0 says done, so the daemon can compare them.
    ray.get(job.mailbox.post.remote([("worker", {**me, "weights": weights_digest(trainer.model.state_dict())})]))
    torch.distributed.barrier()
    events.emit("done", step=trainer.step, best_val=trainer.best_val)
