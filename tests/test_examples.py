"""The integration examples run: ``examples/hf_trainer.py`` (Hugging Face Trainer) and
``examples/lightning_module.py`` (PyTorch Lightning), each optimizer choice, in-process on CPU with a fixed seed.

The frameworks are optional extras (``pip install ".[hf]"`` / ``".[lightning]"``); without them these tests skip.
Each run must lower the held-out loss by a clear margin with finite losses throughout, and show that the part of
``optim`` it demonstrates acted (curvature refreshed through the Trainer, refactorizations fired, W stayed on the
Stiefel manifold).
"""

from __future__ import annotations

import importlib.util
import math
import pathlib

import pytest

EXAMPLES = pathlib.Path(__file__).resolve().parents[1] / "examples"


@pytest.fixture(autouse=True)
def _one_thread():
    """One intra-op thread: these tiny models gain nothing from two, and multi-threaded kernels on a busy 2-core
    machine stall (the same run took 4 s or 80 s depending on the load)."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def load_example(name: str):
    spec = importlib.util.spec_from_file_location(f"optim_example_{name}", EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def require_lightning():
    """The Lightning package (``lightning``, else ``pytorch_lightning``); the test skips without either."""
    try:
        import lightning
    except ImportError:
        return pytest.importorskip("pytorch_lightning", reason="needs the lightning extra: pip install '.[lightning]'")
    return lightning


def check_losses(result: dict, steps: int, margin: float) -> None:
    losses = result["train_losses"]
    assert len(losses) == steps, f"{len(losses)} training losses recorded for {steps} steps"
    assert all(math.isfinite(x) for x in losses + [result["initial_loss"], result["final_loss"]]), result
    assert result["optimizer_steps"] == steps
    assert result["final_loss"] < result["initial_loss"] - margin, (
        f"{result['optimizer']}: held-out loss {result['initial_loss']:.4f} -> {result['final_loss']:.4f}, expected "
        f"a drop of more than {margin}")


HF_STEPS = 16


@pytest.mark.parametrize("optimizer", ["adamw", "sophia", "adahessian", "lowrank"])
def test_hf_trainer_example(optimizer):
    pytest.importorskip("transformers", reason="needs the hf extra: pip install '.[hf]'")
    pytest.importorskip("accelerate", reason="needs the hf extra: pip install '.[hf]'")
    example = load_example("hf_trainer")
    result = example.main(optimizer, steps=HF_STEPS, seed=0, batch_size=16, verbose=False)
    # From ln 256 ≈ 5.55 (uniform bytes); every optimizer reaches < 4.2 in 16 steps with this seed.
    check_losses(result, HF_STEPS, margin=1.0)
    if optimizer in ("sophia", "adahessian"):
        # Refresh steps took Hessian-vector products through the Trainer's create_graph backward.
        assert result["curvature_norm"] is not None and 0.0 < result["curvature_norm"] < math.inf
    else:
        assert result["curvature_norm"] is None
    if optimizer == "lowrank":
        assert result["low_rank_layers"] == 2 * 7  # q/k/v/o_proj and gate/up/down_proj of both layers
        every = max(HF_STEPS // 3, 1)
        assert result["refactorizations"] == HF_STEPS // every  # the callback's step() fired on schedule
    else:
        assert result["low_rank_layers"] == 0 and result["refactorizations"] is None


def test_hf_trainer_example_monitors_the_preconditioned_sharpness():
    pytest.importorskip("transformers", reason="needs the hf extra: pip install '.[hf]'")
    pytest.importorskip("accelerate", reason="needs the hf extra: pip install '.[hf]'")
    result = load_example("hf_trainer").main("adamw", steps=6, seed=0, batch_size=8, verbose=False, monitor_every=3)
    records = result["sharpness"]
    assert [r["step"] for r in records] == [3, 6]
    for record in records:  # AdamW: P⁻¹H against (2 + 2β1)/(lr(1 − β1)) at the scheduled lr (0 at the end)
        assert record["preconditioned"] and math.isfinite(record["lambda_max"]) and record["lambda_max"] > 0
        expected = (2 + 2 * 0.9) / (record["lr"] * 0.1) if record["lr"] > 0 else math.inf
        assert record["stability_limit"] == pytest.approx(expected)


def test_hf_trainer_example_rejects_unknown_optimizer():
    pytest.importorskip("transformers", reason="needs the hf extra: pip install '.[hf]'")
    with pytest.raises(ValueError, match="optimizer must be one of"):
        load_example("hf_trainer").main("sgd", steps=1, verbose=False)


LIGHTNING_STEPS = 40


@pytest.mark.parametrize("optimizer", ["adamw", "rsdm", "sophia", "adahessian"])
def test_lightning_example(optimizer):
    require_lightning()
    example = load_example("lightning_module")
    result = example.main(optimizer, steps=LIGHTNING_STEPS, seed=0, verbose=False)
    # From about 1.48 (4 classes, random student); every optimizer reaches < 0.62 in 40 steps with this seed.
    check_losses(result, LIGHTNING_STEPS, margin=0.5)
    if optimizer == "rsdm":
        assert result["stiefel_distance"] < 1e-4  # ‖WᵀW − I‖ of the constrained encoder weight
    else:
        assert result["stiefel_distance"] > 1e-2  # unconstrained: W leaves the manifold it started on


def test_hf_trainer_resumes_the_low_rank_run_from_its_checkpoint(tmp_path):
    """The Trainer checkpoints the optimizer, not the callback that steps the Refactorizer: the optimizer's state
    dict carries the refactorizer's schedule, so a run resumed mid-ramp from ``checkpoint-3`` refactorizes on the
    same steps and ends where the uninterrupted run does (it refactorized 2 of 3 times before the fix)."""
    pytest.importorskip("transformers", reason="needs the hf extra: pip install '.[hf]'")
    pytest.importorskip("accelerate", reason="needs the hf extra: pip install '.[hf]'")
    import torch
    from transformers import Trainer, TrainerCallback, TrainingArguments

    example = load_example("hf_trainer")
    _, RefactorizerCallback, _, _ = example._trainer_classes()
    steps, batch_size = 6, 4  # refactorizations after steps 2, 4, 6; the checkpoint after 3 is inside a ramp
    train_set = example.ByteWindows(example.corpus(), count=steps * batch_size, seed=0)

    class StopAfter(TrainerCallback):
        def __init__(self, last):
            self.last = last

        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step >= self.last:
                control.should_training_stop = True

    def train(output_dir, stop_after=steps, resume=None):
        model = example.tiny_llama(seed=0)
        opt, scheduler, refactorizer = example.build_optimizer("lowrank", model, steps, seed=0)
        args = TrainingArguments(output_dir=str(output_dir), max_steps=steps, per_device_train_batch_size=batch_size,
                                 report_to=[], use_cpu=True, save_strategy="steps", save_steps=3, disable_tqdm=True,
                                 seed=0, data_seed=0, logging_steps=steps, max_grad_norm=1.0)
        trainer = Trainer(model=model, args=args, train_dataset=train_set, optimizers=(opt, scheduler),
                          callbacks=[RefactorizerCallback(refactorizer), StopAfter(stop_after)])
        trainer.train(resume_from_checkpoint=resume)
        return model, refactorizer

    straight, straight_refactorizer = train(tmp_path / "straight")
    train(tmp_path / "interrupted", stop_after=3)
    checkpoint = tmp_path / "interrupted" / "checkpoint-3"
    resumed, resumed_refactorizer = train(tmp_path / "interrupted", resume=str(checkpoint))
    assert straight_refactorizer.refactorizations == resumed_refactorizer.refactorizations == 3
    assert resumed_refactorizer.step_count == steps
    for (name, p), q in zip(straight.named_parameters(), resumed.parameters()):
        assert torch.equal(p, q), name


@pytest.mark.parametrize("optimizer", ["sophia", "adahessian"])
def test_hf_hessian_trainer_steps_like_the_closure_protocol(optimizer, tmp_path):
    """HessianTrainer's steps (backward(create_graph=True) on refresh steps, then the Trainer's plain step()) give
    the parameters of opt.step(closure) on the same batches: same gradients, same probes, same Hz."""
    pytest.importorskip("transformers", reason="needs the hf extra: pip install '.[hf]'")
    pytest.importorskip("accelerate", reason="needs the hf extra: pip install '.[hf]'")
    import copy

    import torch
    from transformers import TrainingArguments

    example = load_example("hf_trainer")
    HessianTrainer, _, _, _ = example._trainer_classes()
    batches = []

    class RecordingTrainer(HessianTrainer):
        def training_step(self, model, inputs, num_items_in_batch=None):
            batches.append({key: value.clone() for key, value in inputs.items()})
            return super().training_step(model, inputs, num_items_in_batch)

    steps, batch_size = 3, 4  # Sophia (update_period=5): a refresh step, then two plain ones; AdaHessian: 3 refreshes
    model = example.tiny_llama(seed=0)
    reference = copy.deepcopy(model)
    opt, scheduler, _ = example.build_optimizer(optimizer, model, steps, seed=0)
    reference_opt, _, _ = example.build_optimizer(optimizer, reference, steps, seed=0)
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=steps, per_device_train_batch_size=batch_size,
                             report_to=[], use_cpu=True, save_strategy="no", disable_tqdm=True, max_grad_norm=0.0,
                             logging_steps=steps, seed=0)
    train_set = example.ByteWindows(example.corpus(), count=steps * batch_size, seed=0)
    RecordingTrainer(model=model, args=args, train_dataset=train_set, optimizers=(opt, scheduler)).train()
    assert len(batches) == steps
    for batch in batches:
        # The Trainer's loss: the sum over the shifted labels that count, over their number (not a mean): AdaHessian
        # divides by |z⊙Hz| + eps, so a last-bit difference in Hz would move the steps of its near-zero entries.
        counted = (batch["labels"][:, 1:] != -100).sum()
        reference_opt.step(lambda: reference(**batch, num_items_in_batch=counted).loss)
    for (name, p), q in zip(model.named_parameters(), reference.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6, msg=lambda m: f"{name}: {m}")
    for p, q in zip(model.parameters(), reference.parameters()):
        for key, value in opt.state[p].items():
            torch.testing.assert_close(value, reference_opt.state[q][key], rtol=1e-5, atol=1e-8)
    # No gradient keeps the second-order graph alive after training (the reference cycle create_graph warns of).
    assert all(p.grad is None or not p.grad.requires_grad for p in model.parameters())


@pytest.mark.filterwarnings("ignore:Using backward\\(\\) with create_graph=True")
@pytest.mark.parametrize("optimizer", ["sophia", "adahessian"])
def test_lightning_automatic_optimization_with_a_create_graph_backward_steps_like_the_closure_protocol(optimizer):
    # Lightning's automatic closure runs training_step and the module's backward hook, then returns the loss;
    # with the hook passing create_graph=True the optimizer takes Hz through the graph p.grad carries. That closure
    # was refused on refresh steps ("the closure called backward()") until it was read as backward(create_graph).
    L = require_lightning()
    import copy

    import torch
    import torch.nn.functional as F

    import optim

    generator = torch.Generator().manual_seed(0)
    x, y = torch.randn(48, 5, generator=generator), torch.randint(0, 3, (48,), generator=generator)
    make_optimizer = {"sophia": lambda p: optim.SophiaH(p, lr=1e-2, update_period=2, seed=0),
                      "adahessian": lambda p: optim.AdaHessian(p, lr=1e-2, seed=0)}[optimizer]

    class Module(L.LightningModule):
        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            self.net = torch.nn.Sequential(torch.nn.Linear(5, 16), torch.nn.Tanh(), torch.nn.Linear(16, 3))

        def training_step(self, batch, index):
            return F.cross_entropy(self.net(batch[0]), batch[1])

        def backward(self, loss, *args, **kwargs):
            loss.backward(create_graph=True)

        def configure_optimizers(self):
            return make_optimizer(self.parameters())

    module = Module()
    reference = copy.deepcopy(module.net)
    reference_opt = make_optimizer(reference.parameters())
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=16)
    L.Trainer(max_steps=3, logger=False, enable_checkpointing=False, enable_progress_bar=False,
              enable_model_summary=False, accelerator="cpu").fit(module, loader)
    for batch_x, batch_y in loader:
        reference_opt.step(lambda: F.cross_entropy(reference(batch_x), batch_y))
    for p, q in zip(module.net.parameters(), reference.parameters()):
        torch.testing.assert_close(p, q, rtol=0, atol=0)


def test_lightning_validation_measures_the_sharpness_under_its_inference_mode():
    # Lightning runs validation_step under torch.inference_mode(): the monitor's GGN raised there ("Inference
    # tensors cannot be saved for backward"). Measured in the hook, the records are those measured outside.
    L = require_lightning()

    import torch
    import torch.nn.functional as F

    import optim

    generator = torch.Generator().manual_seed(0)
    x, y = torch.randn(32, 5, generator=generator), torch.randint(0, 3, (32,), generator=generator)
    records = {curvature: [] for curvature in optim.hessian.monitor.CURVATURES}

    class Module(L.LightningModule):
        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            self.net = torch.nn.Sequential(torch.nn.Linear(5, 16), torch.nn.Tanh(), torch.nn.Linear(16, 3))

        def validation_step(self, batch, index):
            assert torch.is_inference_mode_enabled()
            for curvature, measured in records.items():
                monitor = optim.SharpnessMonitor(self.net, F.cross_entropy, lr_from=0.1, probes=2,
                                                 curvature=curvature)
                measured.append(monitor.measure(index, batch))

    module = Module()
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=16)
    L.Trainer(logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
              accelerator="cpu").validate(module, loader)
    for curvature, measured in records.items():
        assert len(measured) == 2
        for index, (batch_x, batch_y) in enumerate(loader):
            expected = optim.SharpnessMonitor(module.net, F.cross_entropy, lr_from=0.1, probes=2,
                                              curvature=curvature).measure(index, (batch_x, batch_y))
            for key in ("lambda_max", "trace"):
                assert abs(measured[index][key] - expected[key]) <= 1e-5 * abs(expected[key]), (curvature, key)


@pytest.mark.parametrize("setup", ["refactorizer", "low_rank_adamw"])
def test_lightning_resumes_the_low_rank_run_from_a_mid_training_checkpoint(tmp_path, setup):
    """Lightning checkpoints the optimizer; the refactorizer's schedule travels in its state dict. The refactorizer
    counts in ``optimizer_step`` (after the step and before ModelCheckpoint's ``on_train_batch_end``, which runs
    ahead of the module's own hook), or LowRankAdamW counts inside its step: resumed from step 3 of 6, the run
    refactorizes on the same steps and ends bit for bit where the uninterrupted one does."""
    L = require_lightning()
    import torch
    import torch.nn.functional as F

    import optim

    generator = torch.Generator().manual_seed(0)
    x, y = torch.randn(96, 8, generator=generator), torch.randn(96, 4, generator=generator)

    class Module(L.LightningModule):
        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            self.net = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 4))
            # Converted here, not in configure_optimizers: Lightning restores the weights before it builds optimizers
            optim.to_low_rank(self.net, 3, target=["0", "2"])

        def training_step(self, batch, index):
            return F.mse_loss(self.net(batch[0]), batch[1])

        def configure_optimizers(self):
            if setup == "low_rank_adamw":
                opt = optim.LowRankAdamW(self.net, lr=1e-2, rank=None, every=2, recovery_steps=2)
                self.refactorizer = opt.refactorizer
                return opt
            opt = optim.AdamW(self.parameters(), lr=1e-2)
            self.refactorizer = optim.Refactorizer(self.net, opt, every=2, recovery_steps=2)
            return opt

        def optimizer_step(self, *args, **kwargs):
            super().optimizer_step(*args, **kwargs)
            if setup == "refactorizer":
                self.refactorizer.step()

    def loader():
        return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=32)

    settings = dict(logger=False, enable_progress_bar=False, enable_model_summary=False, accelerator="cpu")
    straight = Module()
    L.Trainer(max_steps=6, enable_checkpointing=False, **settings).fit(straight, loader())
    saving = L.pytorch.callbacks.ModelCheckpoint(dirpath=tmp_path, every_n_train_steps=3, save_top_k=-1)
    L.Trainer(max_steps=6, callbacks=[saving], **settings).fit(Module(), loader())
    [checkpoint] = [path for path in tmp_path.iterdir() if "step=3" in path.name]
    resumed = Module()
    L.Trainer(max_steps=6, enable_checkpointing=False, **settings).fit(resumed, loader(), ckpt_path=str(checkpoint))
    assert straight.refactorizer.refactorizations == resumed.refactorizer.refactorizations == 3
    for (name, p), q in zip(straight.named_parameters(), resumed.parameters()):
        assert torch.equal(p, q), name
