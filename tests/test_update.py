"""train/update.py: the cond-guarded optimizer update takes the same step, or none."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxrepro.train.update import guarded_update


def _setup():
    r = np.random.default_rng(0)
    params = {"w": jnp.asarray(r.standard_normal((4, 3)), jnp.float32), "b": jnp.zeros(3)}
    grads = jax.tree.map(lambda p: jnp.asarray(r.standard_normal(p.shape), jnp.float32), params)
    tx = optax.adam(1e-2)
    opt_state = tx.init(params)
    # one plain step first, so the moments are not zero
    updates, opt_state = tx.update(grads, opt_state, params)
    return tx, optax.apply_updates(params, updates), opt_state, grads


def test_taken_step_is_the_optax_step():
    tx, params, opt_state, grads = _setup()

    @jax.jit
    def plain(params, opt_state, grads):
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, optax.tree.norm(updates)

    got = jax.jit(lambda *a: guarded_update(tx, *a, jnp.bool_(True)))(params, opt_state, grads)
    want = plain(params, opt_state, grads)
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)
    assert float(got[2]) > 0


def test_skipped_step_changes_nothing():
    tx, params, opt_state, grads = _setup()
    grads = jax.tree.map(lambda g: g * jnp.nan, grads)  # what a skipped step looks like
    p, o, norm = jax.jit(lambda *a: guarded_update(tx, *a, jnp.bool_(False)))(
        params, opt_state, grads
    )
    for a, b in zip(jax.tree.leaves((p, o)), jax.tree.leaves((params, opt_state)), strict=True):
        assert np.asarray(a).tobytes() == np.asarray(b).tobytes()
    assert float(norm) == 0.0


def test_update_norm_can_be_left_out_and_apply_is_checked():
    tx, params, opt_state, grads = _setup()
    _, _, norm = guarded_update(tx, params, opt_state, grads, jnp.bool_(True), update_norm=False)
    assert np.isnan(float(norm))
    with pytest.raises(ValueError, match="scalar bool"):
        guarded_update(tx, params, opt_state, grads, jnp.ones(2, bool))
    with pytest.raises(ValueError, match="scalar bool"):
        guarded_update(tx, params, opt_state, grads, jnp.float32(1.0))


def test_finetune_may_have_its_own_schedule_and_warmup():
    """finetune.schedule / warmup_steps replace optimizer.*'s in fine-tuning only."""
    from jaxrepro import config as config_lib
    from jaxrepro.train import optimizer as optimizer_lib

    c = config_lib.base()
    c.pretrain.steps = c.finetune.steps = 100
    c.optimizer.lr, c.optimizer.schedule, c.optimizer.warmup_steps = 1e-3, "cosine", 10
    pre = optimizer_lib.schedule(c, "pretrain", 100)
    same = optimizer_lib.schedule(c, "finetune", 100)  # unset: the optimizer's schedule
    np.testing.assert_array_equal(
        [pre(t) for t in (0, 5, 50, 99)], [same(t) for t in (0, 5, 50, 99)]
    )
    c.finetune.lr, c.finetune.schedule, c.finetune.warmup_steps = 3e-3, "constant", 0
    config_lib.validate(c)
    ft = optimizer_lib.schedule(c, "finetune", 100)
    assert [float(ft(t)) for t in (0, 50, 99)] == pytest.approx([3e-3] * 3)
    assert float(optimizer_lib.schedule(c, "pretrain", 100)(99)) < 1e-4  # pretrain: still cosine
    c.finetune.schedule = "linear"
    with pytest.raises(config_lib.ConfigError, match="finetune.schedule"):
        config_lib.validate(c)
