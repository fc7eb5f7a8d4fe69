"""Checkpoints with orbax-checkpoint (the recipe is in the how-to on checkpoints).

The whole optimizer state (ksbopt states, a stateful steer target, ``inject_hyperparams``,
``MultiSteps`` and the ``monitor`` state with its diagnostics and recursions) is a pytree of
arrays, NamedTuples and ``None``: orbax saves it and restores it against the abstract tree
of a fresh ``init``. A run stopped at step k and resumed from the checkpoint, with freshly
built transformations and a freshly compiled step, ends BIT-IDENTICAL to the run that went
through: the restored values are the saved ones and every step is the same deterministic
program.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import support
from support import registry

import ksbopt

ocp = pytest.importorskip("orbax.checkpoint")  # the optional extra "checkpoint"

LR, MOMENTUM, WEIGHT_DECAY = 0.1, 0.9, 1e-3


def _steer_equilibrium(case):
    """Heavy ball with weight decay, steer to the rotational equilibrium (a stateful target),
    all under the monitor with the exact-recursion dynamics."""
    sym = list(case.symmetries)
    tx = optax.chain(
        optax.add_decayed_weights(WEIGHT_DECAY),
        optax.sgd(LR, momentum=MOMENTUM),
        ksbopt.steer(sym, ksbopt.targets.equilibrium(LR, WEIGHT_DECAY, MOMENTUM), 0.5),
    )
    dyn = ksbopt.dynamics.sgd(LR, momentum=MOMENTUM, weight_decay=WEIGHT_DECAY)
    return ksbopt.monitor(tx, sym, dynamics=dyn)


def _retract_scheduled_steer(case):
    """Gradient accumulation around monitor(heavy ball, scheduled steer of the rescale
    charges, retract of the translation charges)."""
    rescale, translation = case.symmetries
    schedule = optax.linear_schedule(1.0, 2.0, 4)
    tx = optax.chain(
        optax.sgd(LR, momentum=MOMENTUM),
        optax.inject_hyperparams(ksbopt.steer)([rescale], target=schedule, rate=0.5),
        ksbopt.retract([translation]),
    )
    return optax.MultiSteps(ksbopt.monitor(tx, list(case.symmetries), learning_rate=LR), 2)


CONFIGS = {
    "steer_equilibrium": ("scale_batchnorm", _steer_equilibrium),
    "multisteps_steer_retract": ("relu_softmax", _retract_scheduled_steer),
}


def _make_step(case, tx):
    """A freshly traced and compiled train step (one per call)."""

    @support.jit
    def step(params, state, k):
        g = jax.grad(case.loss)(params)
        # Deterministic per-step variation that keeps the symmetry (a scaled gradient).
        g = jax.tree.map(lambda x: (x * (1 + 0.5 * jnp.sin(k))).astype(x.dtype), g)
        u, state = tx.update(g, state, params)
        return optax.apply_updates(params, u), state

    return step


def _train(step, params, state, start, stop):
    for k in range(start, stop):
        params, state = step(params, state, jnp.float32(k))
    return params, state


def _abstract(tree):
    return jax.tree.map(ocp.utils.to_shape_dtype_struct, tree)


@pytest.mark.parametrize(
    ("config", "dtype"),
    [
        ("steer_equilibrium", jnp.float32),
        ("steer_equilibrium", jnp.bfloat16),
        ("multisteps_steer_retract", jnp.float32),
    ],
    ids=lambda x: x if isinstance(x, str) else jnp.dtype(x).name,
)
def test_stop_and_resume_is_bit_identical(tmp_path, config, dtype):
    case_name, make_tx = CONFIGS[config]
    case = support.CASES_BY_NAME[case_name]
    n, k = 6, 3

    # The uninterrupted run.
    tx = make_tx(case)
    params0 = case.params(dtype)
    want_params, want_state = _train(_make_step(case, tx), params0, tx.init(params0), 0, n)

    # Stop at step k and save.
    params, state = _train(_make_step(case, tx), params0, tx.init(params0), 0, k)
    saved = {"params": params, "opt_state": state, "step": jnp.int32(k)}
    checkpointer = ocp.StandardCheckpointer()
    checkpointer.save(tmp_path / "ckpt", saved)
    checkpointer.wait_until_finished()

    # A new "process": new transformations, new abstract target from a fresh init, a newly
    # compiled step.
    tx = make_tx(case)
    target = {
        "params": case.params(dtype),
        "opt_state": tx.init(case.params(dtype)),
        "step": jnp.int32(0),
    }
    restored = checkpointer.restore(tmp_path / "ckpt", _abstract(target))
    checkpointer.close()
    assert jax.tree.structure(restored) == jax.tree.structure(saved)
    support.assert_dtypes(restored, saved)
    support.assert_equal(restored, saved)
    got_params, got_state = _train(
        _make_step(case, tx), restored["params"], restored["opt_state"], int(restored["step"]), n
    )

    support.assert_equal(got_params, want_params)
    support.assert_equal(got_state, want_state)
    # The run really moved, and the ksbopt parts of the state are in the checkpoint.
    assert support.rel_err(want_params, params0) > 1e-3
    assert int(optax.tree.get(restored["opt_state"], "monitor_count")) > 0
    assert optax.tree.get(restored["opt_state"], "target_state") is not None


def _registry_params():
    # The peers and the entries the contract battery runs only with -m slow: -m slow here too.
    return [
        pytest.param(s, marks=pytest.mark.slow if s.role == "peer" or s.is_slow("contract") else ())
        for s in registry.optimizers()
    ]


@pytest.mark.parametrize("spec", _registry_params(), ids=repr)
def test_every_optimizer_state_restores_and_resumes(tmp_path, spec):
    """Every optimizer of the registry: its state after k steps, saved and restored against
    the abstract tree of a fresh ``init``, is the saved one bit for bit (structure, dtypes,
    values), and the run resumed from it ends bit-identical to the run that went through."""
    case = support.CASES_BY_NAME["scale_batchnorm"]
    tx = spec.chain(case.symmetries, loss=case.loss)
    step = _make_step(case, tx)
    params0 = case.params()
    want = _train(step, params0, tx.init(params0), 0, 4)
    params, state = _train(step, params0, tx.init(params0), 0, 2)
    checkpointer = ocp.StandardCheckpointer()
    checkpointer.save(tmp_path / "ckpt", {"params": params, "opt_state": state})
    checkpointer.wait_until_finished()
    fresh = spec.chain(case.symmetries, loss=case.loss).init(case.params())
    target = {"params": case.params(), "opt_state": fresh}
    restored = checkpointer.restore(tmp_path / "ckpt", _abstract(target))
    checkpointer.close()
    assert jax.tree.structure(restored) == jax.tree.structure(target)
    support.assert_dtypes(restored, target)
    support.assert_equal(restored, {"params": params, "opt_state": state})
    got = _train(step, restored["params"], restored["opt_state"], 2, 4)
    support.assert_equal(got, want)
    assert support.rel_err(want[0], params0) > 1e-4, "the run did not move"


def test_checkpoint_manager_roundtrip(tmp_path):
    """The same through ``ocp.CheckpointManager`` (step-numbered directories, keep the last
    two): the latest step restores the full state exactly."""
    case = support.CASES_BY_NAME["relu_softmax"]
    tx = _retract_scheduled_steer(case)
    step = _make_step(case, tx)
    params = case.params()
    state = tx.init(params)
    options = ocp.CheckpointManagerOptions(max_to_keep=2)
    with ocp.CheckpointManager(tmp_path / "run", options=options) as manager:
        for k in range(4):
            params, state = step(params, state, jnp.float32(k))
            manager.save(k + 1, args=ocp.args.StandardSave({"params": params, "opt_state": state}))
        manager.wait_until_finished()
        assert manager.all_steps() == [3, 4]
        target = {"params": case.params(), "opt_state": tx.init(case.params())}
        restored = manager.restore(
            manager.latest_step(), args=ocp.args.StandardRestore(_abstract(target))
        )
    support.assert_equal(restored, {"params": params, "opt_state": state})


def test_nnx_optimizer_stop_and_resume_is_bit_identical(tmp_path):
    """flax.nnx: model and ``nnx.Optimizer`` states (a monitored heavy ball + retract) saved
    at step k and restored into a model and optimizer built from a different seed: the
    resumed run ends bit-identical to the uninterrupted one."""
    nnx = pytest.importorskip("flax.nnx")
    x = np.random.default_rng(70).normal(size=(8, 3)).astype(np.float32)
    y = np.random.default_rng(71).normal(size=(8, 2)).astype(np.float32)

    class MLP(nnx.Module):
        def __init__(self, rngs):
            self.l1 = nnx.Linear(3, 4, rngs=rngs)
            self.l2 = nnx.Linear(4, 2, rngs=rngs)

        def __call__(self, x):
            return self.l2(jax.nn.relu(self.l1(x)))

    sym = [ksbopt.Rescale(incoming=["l1/kernel", "l1/bias"], outgoing="l2/kernel")]

    def build(seed):
        model = MLP(nnx.Rngs(seed))
        tx = optax.chain(optax.sgd(0.05, momentum=MOMENTUM), ksbopt.retract(sym))
        monitored = ksbopt.monitor(tx, sym, learning_rate=0.05)
        return model, nnx.Optimizer(model, monitored, wrt=nnx.Param)

    def loss(model):
        return jnp.mean(jnp.square(model(x) - y))

    @nnx.jit
    def train_step(model, optimizer):
        optimizer.update(model, nnx.grad(loss)(model))

    n, k = 6, 3
    model, optimizer = build(0)
    start = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    for _ in range(n):
        train_step(model, optimizer)
    want = nnx.to_pure_dict(nnx.state(model, nnx.Param))

    model, optimizer = build(0)
    for _ in range(k):
        train_step(model, optimizer)
    checkpointer = ocp.StandardCheckpointer()
    checkpointer.save(tmp_path / "model", nnx.state(model))
    checkpointer.save(tmp_path / "optimizer", nnx.state(optimizer))
    checkpointer.wait_until_finished()
    saved_optimizer = jax.tree.map(jnp.copy, nnx.state(optimizer))

    model, optimizer = build(1)  # different weights: the restore must overwrite them
    nnx.update(model, checkpointer.restore(tmp_path / "model", _abstract(nnx.state(model))))
    nnx.update(
        optimizer, checkpointer.restore(tmp_path / "optimizer", _abstract(nnx.state(optimizer)))
    )
    checkpointer.close()
    support.assert_equal(nnx.state(optimizer), saved_optimizer)
    for _ in range(n - k):
        train_step(model, optimizer)

    got = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    support.assert_equal(got, want)
    assert support.rel_err(want, start) > 1e-3
    # The retraction held through the restart (float32: 64 eps retraction + rounding).
    support.assert_rel_close(ksbopt.charges(got, sym), ksbopt.charges(start, sym), 1e-5, "nnx")


def test_restore_with_other_declarations_raises(tmp_path):
    """The declarations are code, not state: a transformation rebuilt with other groups has
    other state shapes (or structure), and orbax refuses to restore into it."""
    case = support.CASES_BY_NAME["scale_batchnorm"]
    params = case.params()
    per_unit = optax.chain(optax.sgd(LR), ksbopt.retract(ksbopt.Scale("dense/*", axis=-1)))
    checkpointer = ocp.StandardCheckpointer()
    checkpointer.save(tmp_path / "ckpt", per_unit.init(params))
    checkpointer.wait_until_finished()
    per_layer = optax.chain(optax.sgd(LR), ksbopt.retract(ksbopt.Scale("dense/*", axis=None)))
    more = optax.chain(
        optax.sgd(LR),
        ksbopt.retract([ksbopt.Scale("dense/*", axis=-1), ksbopt.Scale("out/*", axis=-1)]),
    )
    for other in (per_layer, more):
        with pytest.raises(ValueError):
            checkpointer.restore(tmp_path / "ckpt", _abstract(other.init(params)))
    checkpointer.close()
