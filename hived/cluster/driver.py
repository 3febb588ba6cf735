"""The daemon's side of `hived cluster`: Ray attached or started, the run handed to Ray Train,
and what rank 0 reports turned into the dashboard, ``metrics.jsonl`` and checkpoints in --out.

``fit()`` blocks, so it runs on a thread while the event loop serves the dashboard and takes the
mailbox's events with awaited calls. Ray decides everything about workers: where they run, when
a lost one is replaced and from which checkpoint the group starts again. The daemon only notices
(a second "start" from rank 0) and rewinds its records to that checkpoint's step, so each step
is in ``metrics.jsonl`` once.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
from collections.abc import Awaitable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

import ray

from .. import checkpoint
from ..config import RunConfig, resolve
from ..events import Events
from ..inference import model_from_state
from ..metrics import MetricsLog
from ..progress import Progress
from ..tokenizer import save as save_tokenizer
from ..trainer import build_trainer
from .mailbox import create as create_mailbox
from .options import ClusterError, ClusterOptions
from .worker_loop import STATE_FILE, Job, train_loop

log = logging.getLogger("hived.cluster")
POLL_SECONDS = 0.5  # how often the mailbox is emptied: the dashboard lags the workers by about this


@dataclass
class Plan:
    """A run resolved before Ray starts, so that a mistake costs no cluster time."""

    run: RunConfig
    opts: ClusterOptions
    out: Path
    base: dict[str, Any]  # tokenizer and model_config, the same for every worker
    state: dict[str, Any] | None  # the run's latest.pt, when it continues one
    summary: str


def plan(flags: dict[str, Any], model: dict[str, Any], opts: ClusterOptions) -> Plan:
    """The run's config (a run already in --out continues), its tokenizer and model shape built
    here once, and the data paths made absolute (workers do not share this working directory)."""
    out = Path(flags.get("out") or "runs/default")
    latest = out / "latest.pt"
    state = checkpoint.load(latest) if latest.exists() else None
    run = resolve(flags, model, resumed=state)
    run.train.data = [str(Path(d).resolve()) if Path(d).exists() else d for d in run.train.data]
    if opts.join:
        return Plan(run, opts, out, {}, None, f"joining {opts.join} as one peer")
    trainer, _ = build_trainer(dataclasses.replace(run, train=dataclasses.replace(run.train, device="cpu")), state)
    base = {"tokenizer": trainer.tokenizer.to_json(), "model_config": dataclasses.asdict(trainer.model_cfg)}
    summary = (f"preset {run.train.preset}, {trainer.model.num_params():,} parameters, {trainer.tokenizer.kind} "
               f"tokenizer (vocab {trainer.tokenizer.vocab_size}), {len(trainer.data.train):,} train tokens")
    out.mkdir(parents=True, exist_ok=True)
    save_tokenizer(trainer.tokenizer, out / "tokenizer.json")
    if state is not None:
        summary += f"; continuing the run in {out} from step {state['step']}"
    return Plan(run, opts, out, base, state, summary)


def connect(address: str) -> bool:
    """Attach to a running Ray (``address`` or RAY_ADDRESS), or start one sized to this machine;
    True when started here. Only what was started here is shut down: never `ray stop`."""
    address = address or os.environ.get("RAY_ADDRESS", "")
    if address:
        try:
            ray.init(address=address)
        except ConnectionError as exc:
            raise ClusterError(
                f"could not join the Ray cluster at {address} ({str(exc).splitlines()[0][:200]}). Is it running "
                "(`ray status` on its head)? Ray's token authentication is on by default: set RAY_AUTH_MODE=token "
                "here and give this machine the cluster's token, as ~/.ray/auth_token or RAY_AUTH_TOKEN "
                "(`ray get-auth-token` on the head prints it)") from None
        return False
    # Ray starts its workers at nice 15, below its own processes and this daemon, which then
    # pause ranks that must move in lockstep: two CPU workers ran at 0.88x torchrun's tokens/s,
    # and at 0.97x at nice 0, the priority `hived train` and torchrun run at.
    os.environ.setdefault("RAY_worker_niceness", "0")
    ray.init(address="local")  # a new one, even beside a `ray start` on this machine
    return True


class ClusterDriver:
    def __init__(self, plan: Plan, events: Events, stream: TextIO | None = None):
        self.plan = plan
        self.events = events
        self.stream = stream
        self.storage = plan.opts.storage_for(plan.out)
        self.name = plan.out.resolve().name or "hived"  # the run's folder in the storage
        self.metrics: MetricsLog | None = None
        self.progress: Progress | None = None
        self.workers: dict[int, dict[str, Any]] = {}
        self.starts = 0
        self.last_step = -1
        self.saved_step = plan.state["step"] if plan.state is not None else 0  # of --out/latest.pt
        self.status_code = 0
        self.ray_address = ""
        self.started_ray = False
        events.subscribe(self._echo)

    def _echo(self, kind: str, data: dict[str, Any]) -> None:
        """Messages, while there is no progress line to print them (before the first step, and
        on a cluster that trains as a hive's peer)."""
        if kind == "message" and self.progress is None:
            log.info("%s", data["text"])

    def status(self) -> dict[str, Any]:
        opts = self.plan.opts
        return {"cluster": {
            "address": self.ray_address, "storage": f"{self.storage}/{self.name}", "join": opts.join,
            "workers": [self.workers[r] for r in sorted(self.workers)],
            "requested": list(opts.workers), "restarts": max(0, self.starts - 1),
        }}

    def say(self, text: str) -> None:
        self.events.emit("message", text=text)

    # ----------------------------------------------------------------- Ray

    def _trainer(self, mailbox: Any) -> Any:
        from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
        from ray.train.torch import TorchTrainer

        opts, plan = self.plan.opts, self.plan
        low, high = opts.workers
        resources = {"CPU": opts.cpus_per_worker, **({"GPU": opts.gpus_per_worker} if opts.gpus_per_worker else {})}
        state = ray.put(plan.state) if plan.state is not None else None
        peer = None
        if opts.join:
            from ..hive.peer import PeerOptions

            peer = PeerOptions(opts.join, opts.key, opts.name or f"cluster-{self.name}", max_rounds=opts.max_rounds)
        job = Job(plan.run, plan.base, mailbox, state, opts.threads or max(1, int(opts.cpus_per_worker)), peer)
        return TorchTrainer(
            train_loop, train_loop_config={"job": job},
            scaling_config=ScalingConfig(num_workers=low if low == high else (low, high),
                                         use_gpu=opts.gpus_per_worker > 0, resources_per_worker=resources,
                                         elastic_resize_monitor_interval_s=opts.resize_every),
            run_config=RunConfig(name=self.name, storage_path=self.storage,
                                 failure_config=FailureConfig(max_failures=opts.max_failures),
                                 checkpoint_config=CheckpointConfig(num_to_keep=3)),
        )

    async def run(self, stop: asyncio.Event) -> int:
        """Train to the end (0), until the run fails (1) or until ``stop`` (130); the run then
        continues from its last checkpoint when the same command runs again."""
        loop = asyncio.get_running_loop()
        self.say(f"hived cluster: {self.plan.summary}; starting Ray")
        # The workers must not change directory: --data paths relative to a job's working
        # directory then mean the same on every node.
        os.environ.setdefault("RAY_CHDIR_TO_TRIAL_DIR", "0")
        self.started_ray = await loop.run_in_executor(None, connect, self.plan.opts.address)
        stopping = asyncio.ensure_future(stop.wait())
        try:
            context = ray.get_runtime_context()
            self.ray_address = context.gcs_address
            mailbox = create_mailbox(context.get_node_id())
            trainer = self._trainer(mailbox)
            low, high = self.plan.opts.workers
            self.say(f"Ray at {self.ray_address} ({'started here' if self.started_ray else 'attached'}); "
                     f"{low if low == high else f'{low} to {high}'} worker(s); checkpoints in {self.storage}/{self.name}")
            fit = loop.run_in_executor(None, trainer.fit)
            # Stopped, Ray is shut down under the fit thread, which then ends with SystemExit:
            # expected, so taken here rather than logged as never retrieved.
            fit.add_done_callback(lambda done: done.cancelled() or done.exception())
            while not fit.done():
                await self._drain(mailbox)
                await asyncio.wait([fit, stopping], timeout=POLL_SECONDS, return_when=asyncio.FIRST_COMPLETED)
                if stopping.done() and not fit.done():
                    self.say(f"stopped by a signal; run the same command to continue from the last checkpoint "
                             f"(step {self.saved_step})")
                    return 130
            await self._drain(mailbox)
            try:
                fit.result()
            except Exception as exc:  # Ray's TrainingFailedError and what a worker raised inside it
                self.say(f"the run failed after {max(0, self.starts - 1)} restart(s): {str(exc)[:2000]}\n"
                         f"Run the same command to continue from the last checkpoint (step {self.saved_step}).")
                return 1
            return self.status_code
        finally:
            stopping.cancel()
            if self.progress is not None:
                self.progress.close()
            if self.metrics is not None:
                self.metrics.close()
            await loop.run_in_executor(None, ray.shutdown)  # stops the local Ray only if it started here

    # ----------------------------------------------------------------- rank 0's events

    async def _drain(self, mailbox: Any) -> None:
        for kind, data in await mailbox.take.remote():
            handled = self._handle(kind, data)
            if handled is not None:
                await handled

    def _handle(self, kind: str, data: dict[str, Any]) -> Awaitable[None] | None:
        if kind == "worker":
            self.workers = {r: w for r, w in self.workers.items() if r < data["world_size"]}
            fresh = self.workers.get(data["rank"], {}).get("pid") != data["pid"]
            self.workers[data["rank"]] = data
            pids = {w["pid"] for w in self.workers.values()}
            if fresh and len(self.workers) == data["world_size"] and len(pids) == data["world_size"]:
                nodes = sorted({w["node"] for w in self.workers.values()})
                self.say(f"{data['world_size']} worker(s) up on {', '.join(nodes)}: process group ready")
            return None
        if kind == "start":
            self._start(data)
        elif kind in ("step", "eval") and self.metrics is None:  # a hive's peer sends no start
            self.metrics = MetricsLog(self.plan.out)
            self.events.subscribe(self.metrics)
        if kind == "step":
            self.last_step = data["step"]
        if kind == "saved":
            return asyncio.get_running_loop().run_in_executor(None, self._fetch, data)
        if kind == "done":
            self.status_code = data.get("status", 0)
            self._done(data)
        self.events.emit(kind, **data)
        return None

    def _done(self, data: dict[str, Any]) -> None:
        """The run's end: and whether every worker ended with the same weights, as data
        parallelism promises (each posted a hash of its own before rank 0 said done)."""
        if "best_val" not in data:  # a hive's peer leaving
            self.say(f"left the hive after {data['rounds']} round(s)" if data["status"] == 0
                     else "the coordinator refused the key (see the log above); nothing more to do")
            return
        digests = {r: w.get("weights") for r, w in sorted(self.workers.items())}
        for rank, digest in digests.items():
            self.say(f"rank {rank} weights sha256 {digest}")
        same = len(set(digests.values())) == 1
        self.say(f"done: step {data['step']}, best val loss {data['best_val']:.4f}; checkpoints in {self.plan.out}"
                 + ("" if same else "; warning: the workers' weights differ"))

    def _start(self, data: dict[str, Any]) -> None:
        """The worker group began: at first, the run's records start (or continue); later, Ray
        restarted the group from a checkpoint, and what came after it is forgotten."""
        self.starts += 1
        step = data["step"]
        if self.metrics is None:
            self.metrics = MetricsLog(self.plan.out, resume_step=step if step else None)
            self.progress = Progress(data["steps"], step, self.plan.run.train.log_interval, self.stream)
            for listener in (self.metrics, self.progress):
                self.events.subscribe(listener)
            self.say(f"{data['world_size']} worker(s) on {data['device']}, from step {step}")
            return
        rewound = max(0, self.last_step - step)
        self.metrics.rewind(step)
        self.events.emit("restart", step=step, rewound=rewound, world_size=data["world_size"])
        self.say(f"Ray restarted the workers ({data['world_size']} now) from the checkpoint at step {step}; "
                 f"{rewound} step(s) after it are trained again")
        self.last_step = step

    def _fetch(self, data: dict[str, Any]) -> None:
        """Copy a checkpoint Ray stored into --out under each name it was saved as (checked, and
        written atomically), and give its weights to the chat."""
        from ray.train import Checkpoint

        saved = Checkpoint(f"{self.storage}/{self.name}/{data['dir']}")
        try:
            with saved.as_directory() as folder:
                path = Path(folder) / STATE_FILE
                state = checkpoint.load(path)
                raw = path.read_bytes()
        except (OSError, checkpoint.CheckpointError) as exc:  # already replaced by a newer one
            log.warning("could not copy the checkpoint of step %s: %s", data["step"], exc)
            return
        for name in data["names"]:
            checkpoint.atomic_write_bytes(self.plan.out / name, raw)
        if "latest.pt" in data["names"]:
            self.saved_step = state["step"]
        model, tok = model_from_state(state, self.plan.out / data["names"][0], device="cpu")
        self.events.emit("weights", model=model, tokenizer=tok, label=f"step {state['step']}")

