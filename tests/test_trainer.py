import copy
import math

import numpy as np
import torch

from hived.config import ModelConfig, TrainConfig
from hived.data import TokenData
from hived.events import Events
from hived.tokenizer import CharTokenizer
from hived.trainer import Trainer, lr_at

from conftest import make_corpus


def make_trainer(**train) -> Trainer:
    text = make_corpus()
    tok = CharTokenizer.train([text])
    data = TokenData(tok.encode(text).astype(np.uint16), block_size=32, val_fraction=0.1, seed=0)
    cfg = TrainConfig(**{**dict(batch_size=8, steps=60, lr=3e-3, warmup_steps=5, eval_tokens=4096), **train})
    mc = ModelConfig(vocab_size=tok.vocab_size, block_size=32, n_layer=2, n_head=2, n_embd=32)
    return Trainer(mc, cfg, data, tok, Events())


def test_schedules():
    wsd = TrainConfig(steps=100, lr=1.0, warmup_steps=10, lr_schedule="wsd", decay_fraction=0.2)
    assert lr_at(wsd, 0) == 0.1 and lr_at(wsd, 9) == 1.0
    assert lr_at(wsd, 50) == 1.0 and lr_at(wsd, 79) == 1.0
    assert 0 < lr_at(wsd, 90) < 1.0 and lr_at(wsd, 100) == 0.0
    cos = TrainConfig(steps=100, lr=1.0, warmup_steps=10, lr_schedule="cosine", min_lr_ratio=0.1)
    assert math.isclose(lr_at(cos, 55), 0.55) and math.isclose(lr_at(cos, 100), 0.1)


def test_training_lowers_validation_loss_and_publishes_events():
    trainer = make_trainer()
    seen: list[str] = []
    trainer.events.subscribe(lambda kind, data: seen.append(kind))
    before = trainer.evaluate()["val_loss"]
    for _ in range(60):
        m = trainer.train_step()
    after = trainer.evaluate()["val_loss"]
    assert after < before - 1.0
    assert m["step"] == 60 and m["tokens"] == 60 * 8 * 32 and m["tokens_per_sec"] > 0
    assert seen.count("step") == 60 and seen.count("eval") == 2
    text = trainer.sample(max_tokens=30)
    assert len(text) == 30 and seen[-1] == "sample"


def test_grad_accumulation_matches_one_large_batch():
    a = make_trainer(batch_size=8, grad_accum=1, steps=10)
    b = make_trainer(batch_size=4, grad_accum=2, steps=10)
    a.train_step()
    b.train_step()  # reads the same 8 windows as two micro-batches of 4
    for p, q in zip(a.model.parameters(), b.model.parameters()):
        assert torch.allclose(p, q, atol=1e-6)


def test_a_nan_step_is_skipped_and_leaves_the_weights_untouched():
    trainer = make_trainer()
    trainer.train_step()
    before = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    hook = trainer.model.wte.register_forward_hook(lambda m, i, o: o * float("nan"))
    m = trainer.train_step()
    hook.remove()
    assert math.isnan(m["loss"]) and trainer.skipped_steps == 1
    for k, v in trainer.model.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert math.isfinite(trainer.train_step()["loss"])  # and training goes on


def test_device_auto_selection_and_a_clear_error_for_a_missing_gpu():
    import pytest

    from hived.device import pick_device, pick_dtype

    expected = "cuda" if torch.cuda.is_available() else "cpu"
    if not torch.cuda.is_available() and torch.backends.mps.is_available():
        expected = "mps"
    assert pick_device("auto").type == expected
    assert pick_dtype(torch.device("cpu")) == torch.float32
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="--device cpu"):
            pick_device("cuda")


def test_compiled_model_trains_like_the_eager_one():
    eager = make_trainer(steps=3)
    compiled = make_trainer(steps=3, compile=True)
    for _ in range(2):
        a, b = eager.train_step(), compiled.train_step()
        assert math.isclose(a["loss"], b["loss"], rel_tol=1e-4)


def test_a_non_finite_gradient_step_is_skipped_in_sync_mode():
    """gradients() (the hive's sync mode) skips a step whose loss or gradient is not finite, as
    train_step does, instead of handing NaN to the peer's error feedback."""
    trainer = make_trainer()
    weight = trainer.model.lm_head.weight
    saved = weight.detach().clone()
    with torch.no_grad():
        weight[0, 0] = float("inf")
    grads, loss = trainer.gradients()
    assert grads is None and trainer.skipped_steps == 1
    with torch.no_grad():
        weight.copy_(saved)
    grads, loss = trainer.gradients()
    assert grads is not None and math.isfinite(loss) and all(torch.isfinite(g).all() for g in grads.values())


def test_muon_orthogonalises_the_hidden_matrices_and_adamw_takes_the_rest():
    """With --optimizer muon a hidden matrix's first step is an orthogonalised momentum: its
    singular values all near one size (Newton-Schulz's band), where AdamW's first step is a sign
    matrix whose singular values spread. Embeddings and gains keep AdamW's sign-like step."""
    trainer = make_trainer(optimizer="muon", lr=1e-2, warmup_steps=1, weight_decay=0.0, grad_clip=0.0)
    adamw = make_trainer(lr=1e-2, warmup_steps=1, weight_decay=0.0, grad_clip=0.0)
    spreads = {}
    for name, t in (("muon", trainer), ("adamw", adamw)):
        before = {n: p.detach().clone() for n, p in t.model.named_parameters()}
        t.train_step()
        step = {n: p.detach() - before[n] for n, p in t.model.named_parameters()}
        s = torch.linalg.svdvals(step["blocks.0.mlp.up.weight"])
        spreads[name] = (s.min() / s.max()).item()
        gain = step["blocks.0.norm1.weight"].abs()  # Adam's first step: lr times the gradient's sign
        assert torch.allclose(gain[gain > 0], torch.full_like(gain[gain > 0], 1e-2), rtol=1e-3), name
    assert spreads["muon"] > 0.5 > spreads["adamw"], spreads
    for _ in range(40):
        trainer.train_step()
    assert trainer.evaluate()["val_loss"] < 2.2


def test_a_muon_trainer_resumes_exactly_from_its_state():
    a = make_trainer(optimizer="muon", steps=6)
    for _ in range(3):
        a.train_step()
    b = make_trainer(optimizer="muon", steps=6)
    b.load_state_dict(copy.deepcopy(a.state_dict()))  # as from disk: optimizers load state by reference
    for _ in range(3):
        assert a.train_step()["loss"] == b.train_step()["loss"]
    for p, q in zip(a.model.parameters(), b.model.parameters()):
        assert torch.equal(p, q)


def test_ema_weights_are_the_running_average_and_what_a_checkpoint_serves():
    from hived.checkpoint import served_weights

    trainer = make_trainer(ema_decay=0.8)
    expected = None
    for _ in range(6):
        trainer.train_step()
        now = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
        expected = now if expected is None else {n: 0.8 * expected[n] + 0.2 * now[n] for n in now}
    for n, p in trainer.ema.module.named_parameters():
        assert torch.allclose(p, expected[n], atol=1e-6), n
    metrics = trainer.evaluate()
    assert metrics["ema_val_loss"] != metrics["val_loss"] and trainer.best_val == metrics["ema_val_loss"]
    state = trainer.state_dict()
    assert served_weights(state) is state["ema"] and torch.allclose(state["ema"]["wte.weight"], expected["wte.weight"])
    resumed = make_trainer(ema_decay=0.8)
    resumed.load_state_dict(copy.deepcopy(state))
    assert int(resumed.ema.n_averaged) == 6
    assert torch.equal(resumed.served.wte.weight, trainer.ema.module.wte.weight)


def test_the_curriculum_trains_short_contexts_first_on_the_same_tokens():
    from hived.trainer import context_at

    cfg = TrainConfig(steps=32, curriculum_fraction=0.25)  # 8 steps
    assert [context_at(cfg, s, 64) for s in range(10)] == [8, 8, 16, 16, 32, 32, 64, 64, 64, 64]
    assert [context_at(cfg, s, 48) for s in range(8)] == [12, 12, 12, 24, 24, 24, 48, 48]  # halvings that divide
    assert context_at(TrainConfig(), 0, 64) == 64
    trainer = make_trainer(steps=40, curriculum_fraction=0.1)  # 4 steps; block 32: 8, 16, 32
    shapes = []
    trainer.model.register_forward_hook(lambda m, args, out: shapes.append(tuple(args[0].shape)))
    for _ in range(5):
        trainer.train_step()
    assert shapes == [(32, 8), (32, 8), (16, 16), (8, 32), (8, 32)]


def test_a_run_saved_with_a_curriculum_step_count_resumes_on_the_same_schedule():
    from hived.config import resolve

    saved = {"train_config": {"preset": "1m", "steps": 1000, "curriculum_steps": 300}, "model_config": {}}
    assert resolve({}, resumed=saved).train.curriculum_fraction == 0.3


def test_label_smoothing_and_z_loss_train_but_validation_stays_plain_cross_entropy():
    plain, shaped = make_trainer(), make_trainer(label_smoothing=0.1, z_loss=1e-3)
    first = plain.train_step()["loss"], shaped.train_step()["loss"]
    assert first[1] > first[0]  # the same weights and batch: the shaped loss is the larger
    plain.load_state_dict(copy.deepcopy(shaped.state_dict()))
    assert plain.evaluate()["val_loss"] == shaped.evaluate()["val_loss"]


def test_layer_drop_steps_and_hands_the_hive_zero_for_a_skipped_block():
    trainer = make_trainer(layer_drop=0.5)
    seed = next(s for s in range(100) if torch.manual_seed(s) and (torch.rand(2) < 0.5).tolist() == [True, False])
    torch.manual_seed(seed)  # a draw that skips block 0 and keeps block 1
    grads, loss = trainer.gradients()
    assert math.isfinite(loss)
    assert not grads["blocks.0.attn.qkv.weight"].any() and grads["blocks.1.attn.qkv.weight"].any()


def test_layer_drop_and_muon_train_under_data_parallel(tmp_path):
    """A block LayerDrop skips has no gradients; the Ray workers' DDP must expect that, and Muon
    (the presets' optimizer) must step the wrapped model. One real gloo process group (its own
    process, so the suite's own state is untouched)."""
    import json
    import subprocess
    import sys
    from pathlib import Path

    from conftest import free_port

    script = tmp_path / "ddp.py"
    script.write_text(f"""
import json, os, sys
sys.path.insert(0, {str(Path(__file__).parent)!r})
import torch.distributed as dist
from test_trainer import make_trainer
from hived.cluster.worker_loop import data_parallel
os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT="{free_port()}")
dist.init_process_group("gloo", rank=0, world_size=1)
trainer = make_trainer(layer_drop=0.5, optimizer="muon")
data_parallel(trainer, 0, 1)
print(json.dumps([trainer.train_step()["loss"] for _ in range(4)]))
dist.destroy_process_group()
""")
    proc = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    losses = json.loads(proc.stdout.strip().splitlines()[-1])
    assert len(losses) == 4 and all(math.isfinite(x) for x in losses)
