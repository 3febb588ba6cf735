"""Run folders side by side (`hived serve --runs runs/`): every folder below with a
``metrics.jsonl`` is a run; the dashboard lists them and overlays the curves of those ticked.

``GET /api/runs`` lists them (name, last step, best validation loss, parameters);
``GET /api/runs/{name}`` is one run's history, thinned as the live dashboard's is, with its
configuration (the ``start`` record its metrics keep, or else a checkpoint of the run's).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from aiohttp import web

from . import checkpoint
from .dashboard import replay

RUNS_DIR = web.AppKey("runs_dir", Path)


def runs(root: Path) -> list[Path]:
    return sorted(p for p in root.iterdir() if (p / "metrics.jsonl").is_file()) if root.is_dir() else []


def history(folder: Path) -> dict[str, Any]:
    """One run's curves, samples and configuration."""
    state = replay(folder)
    info = state.info
    if "config" not in info:  # metrics written before they kept the run's start
        saved = next((p for p in (folder / n for n in ("latest.pt", "final.pt", "best.pt")) if p.is_file()), None)
        if saved is not None:
            try:
                state_dict = checkpoint.load(saved)
                info.update(config=state_dict.get("train_config"), model=state_dict.get("model_config"))
            except checkpoint.CheckpointError:
                pass
    evals = [p["val_loss"] for p in state.points["eval"]]
    steps = state.points["step"]
    return {**state.history(), "config": info.get("config"), "model": info.get("model"), "params": info.get("params"),
            "last_step": steps[-1]["step"] if steps else None,
            "best_val": min(evals) if evals else None}


async def list_runs(request: web.Request) -> web.Response:
    summary = []
    for folder in runs(request.app[RUNS_DIR]):
        h = history(folder)
        summary.append({"name": folder.name, "step": h["last_step"], "best_val": h["best_val"], "params": h["params"]})
    return web.json_response(summary)


async def one_run(request: web.Request) -> web.Response:
    name = request.match_info["name"]
    folder = next((p for p in runs(request.app[RUNS_DIR]) if p.name == name), None)  # never a path built from input
    if folder is None:
        raise web.HTTPNotFound(text=f"no run {name!r} in {request.app[RUNS_DIR]}")
    return web.json_response(history(folder))


def add_routes(app: web.Application, root: Path) -> None:
    app[RUNS_DIR] = root
    app.router.add_get("/api/runs", list_runs)
    app.router.add_get("/api/runs/{name}", one_run)
