"""The tiled loss (ringattn/train/loss.py) equals the plain one in float64: the objective with and
without z-loss, the metrics (cross-entropy, argmax with ties) and the gradients of hidden states,
head weights and loss weights; through the model for tied and untied embeddings, with the
vocabulary sharded over `tensor`; and the compiled train step holds no [tokens, vocab] buffer."""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import linen as nn
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from ringattn.mesh import make_mesh, mesh_axes_for
from ringattn.nn.config import AttentionConfig, ModelConfig
from ringattn.nn.model import Transformer, head
from ringattn.run.params import abstract_params
from ringattn.train import loss, state, step
from ringattn.train.loss import LossConfig

B, T, E, V = 2, 24, 8, 40


def problem(seed=0, ties=False):
    """h [B, T, E], w [E, V], targets, weights in float64; with `ties` several columns of w are
    equal, so logits tie (argmax takes the first) and some targets sit on a tie."""
    rng = np.random.default_rng(seed)
    h = rng.normal(size=(B, T, E))
    w = rng.normal(size=(E, V))
    targets = rng.integers(0, V, (B, T)).astype(np.int32)
    if ties:
        w[:, 7] = w[:, 3] = w[:, 21]  # logits 3, 7, 21 equal: argmax can only be 3
        w[:, [3, 7, 21]] *= 4  # ... and often the max
        targets[:, ::3] = 7
        targets[:, 1::3] = 3
    weights = rng.uniform(size=(B, T)) * (rng.uniform(size=(B, T)) > 0.2)
    return jnp.asarray(h), jnp.asarray(w), jnp.asarray(targets), jnp.asarray(weights)


def value_and_grads(fn, h, w, targets, weights):
    def objective(h, w, weights):
        out = fn(h, w, targets, weights)
        return out.total, (out.ce, out.right_BT)

    grad = jax.value_and_grad(objective, argnums=(0, 1, 2), has_aux=True)
    (total, (ce, right)), grads = jax.jit(grad)(h, w, weights)
    return total, ce, right, grads


@pytest.mark.parametrize(
    "chunk, shards, z_loss, ties",
    [(4, 1, 0.0, False), (8, 4, 1e-3, True), (6, 4, 0.0, True), (T, 3, 1e-3, False),
     (64, 2, 0.0, True)],
)  # fmt: skip
def test_tiled_equals_plain_float64(chunk, shards, z_loss, ties):
    """Tiles of 4, 6 and 8 tokens per row, one tile (T), a tile longer than the rows; the rows
    in 1 to 4 shards (6 tokens in 4 shards: tiles of whole rows' runs instead)."""
    h, w, targets, weights = problem(ties=ties)
    plain = functools.partial(lambda h, w, t, k: loss.plain(head(h, w), t, k, z_loss))
    tiled = functools.partial(loss.tiled, chunk_size=chunk, z_loss=z_loss, shards=shards)
    want, got = (value_and_grads(f, h, w, targets, weights) for f in (plain, tiled))
    logits = np.asarray(h) @ np.asarray(w)
    # The plain loss is optax's cross-entropy and numpy's argmax.
    ce = optax.softmax_cross_entropy_with_integer_labels(logits, targets)
    np.testing.assert_allclose(want[1], np.sum(np.asarray(weights) * ce), rtol=1e-13)
    np.testing.assert_array_equal(want[2], logits.argmax(-1) == np.asarray(targets))
    if ties:
        assert 0 < int(want[2].sum()) and (np.asarray(targets) == 7).any()
    np.testing.assert_allclose(got[0], want[0], rtol=1e-13)
    np.testing.assert_allclose(got[1], want[1], rtol=1e-13)
    np.testing.assert_array_equal(got[2], want[2])
    for name, g, r in zip(("h", "w", "weights"), got[3], want[3], strict=True):
        np.testing.assert_allclose(g, r, rtol=1e-12, atol=1e-14, err_msg=name)
        assert np.abs(r).max() > 0


def test_tiled_in_bfloat16_is_the_plain_loss_to_rounding():
    h, w, targets, weights = problem()
    h, w = h.astype(jnp.bfloat16), w.astype(jnp.bfloat16)
    tiled = functools.partial(loss.tiled, chunk_size=8)
    plain = lambda h, w, t, k: loss.plain(head(h, w), t, k)  # noqa: E731
    got, want = (value_and_grads(f, h, w, targets, weights) for f in (tiled, plain))
    assert got[3][0].dtype == jnp.bfloat16 and got[3][1].dtype == jnp.bfloat16
    np.testing.assert_allclose(got[0], want[0], rtol=1e-6)
    for g, r in zip(got[3], want[3], strict=True):
        g, r = np.asarray(g, np.float32), np.asarray(r, np.float32)
        assert np.abs(g - r).max() <= 2e-2 * np.abs(r).max()


def test_errors():
    h, w, targets, weights = problem()
    with pytest.raises(ValueError, match=r"`chunk_size` \(5\) must divide the sequence length"):
        loss.tiled(h, w, targets, weights, chunk_size=5)
    with pytest.raises(ValueError, match="`chunk_size` must be an int >= 0"):
        LossConfig(chunk_size=-1)
    with pytest.raises(ValueError, match="`z_loss` must be >= 0"):
        LossConfig(z_loss=-0.1)


def test_tiled_on_a_sharded_vocabulary_equals_plain_float64():
    """h sharded over `context` along T, the head's w over `tensor` along V (V / 2 per device):
    values and gradients are the unsharded plain loss's, in float64."""
    h, w, targets, weights = problem(ties=True)
    mesh = make_mesh(dict(tensor=2, context=4))
    put = lambda x, *spec: jax.device_put(x, NamedSharding(mesh, P(*spec)))  # noqa: E731
    h, targets, weights = put(h, None, "context"), put(targets, None, "context"), put(weights)
    w = put(w, None, "tensor")
    tiled = functools.partial(loss.tiled, chunk_size=8, z_loss=1e-2, shards=4)
    got = value_and_grads(tiled, h, w, targets, weights)
    want = value_and_grads(
        lambda h, w, t, k: loss.plain(head(h, w), t, k, 1e-2),
        *jax.device_get((h, w, targets, weights)),
    )
    assert got[3][1].sharding.spec == P(None, "tensor")
    for a, b in zip(got[:3], want[:3], strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-13)
    for g, r in zip(got[3], want[3], strict=True):
        np.testing.assert_allclose(g, r, rtol=1e-12, atol=1e-14)


# Through the model: step.forward's objective and parameter gradients, tiled against plain, for
# tied (scaled or Hugging Face's unscaled) and untied heads. float64 parameters and activations
# (RMSNorm and RoPE compute in float32 inside, the same ops on both sides).
MODEL = ModelConfig(
    vocab_size=V, num_layers=1, d_model=16, num_heads=2, num_kv_heads=2, head_dim=8, mlp_dim=32,
    dtype="float64", param_dtype="float64", attention=AttentionConfig(impl="dense"),
)  # fmt: skip


def batch():
    rng = np.random.default_rng(3)
    ids = rng.integers(0, V, (B, T + 1)).astype(np.int32)
    weights = (rng.uniform(size=(B, T)) > 0.1).astype(np.float32)
    pos = np.broadcast_to(np.arange(T, dtype=np.int32), (B, T))
    return dict(inputs=ids[:, :-1], targets=ids[:, 1:], weights=weights, positions=pos,
                segment_ids=np.ones((B, T), np.int32), answer_mask=weights > 0)  # fmt: skip


def objective_and_grads(cfg, mesh, loss_config, params):
    model = Transformer(cfg, mesh)
    fn = functools.partial(step.forward, model, loss_config=loss_config)
    (objective, (ce, right)), grads = jax.jit(jax.value_and_grad(fn, has_aux=True))(params, batch())
    return objective, ce, right, grads


def model_params(cfg):
    b = batch()
    inputs = (b["inputs"], b["positions"], b["segment_ids"])
    return nn.unbox(Transformer(cfg).init(jax.random.key(0), *inputs))["params"]


def assert_same(got, want, rtol):
    np.testing.assert_allclose(got[0], want[0], rtol=rtol)
    np.testing.assert_allclose(got[1], want[1], rtol=rtol)
    np.testing.assert_array_equal(got[2], want[2])
    for path, g in jax.tree_util.tree_leaves_with_path(got[3]):
        r = functools.reduce(lambda t, k: t[k.key], path, want[3])
        err = np.abs(np.asarray(g) - np.asarray(r)).max()
        assert err <= rtol * np.abs(r).max(), (jax.tree_util.keystr(path), err)


@pytest.mark.parametrize("tied, scaled", [(True, True), (True, False), (False, True)])
def test_model_tiled_equals_plain(tied, scaled):
    cfg = dataclasses.replace(MODEL, tie_embeddings=tied, scale_tied_logits=scaled)
    params = model_params(cfg)
    want = objective_and_grads(cfg, None, LossConfig(z_loss=1e-2), params)
    got = objective_and_grads(cfg, None, LossConfig(chunk_size=8, z_loss=1e-2), params)
    assert ("embedding" if tied else "unembedding") in got[3]
    assert_same(got, want, 1e-12)


@pytest.mark.parametrize("chunk, gather", [(8, True), (24, False)])
def test_model_tiled_on_a_tensor_sharded_vocabulary_equals_plain(chunk, gather):
    """The model on a (tensor 2, context 4) mesh (the vocabulary, heads and MLP over tensor):
    equal to the plain loss on one device to the rounding of its float32 norms, whose sums the
    mesh splits differently; with tiles of 8 tokens a row (fewer than V / 2: the tile's tokens
    gathered, V over all 8 devices) and of 24 (each device its own tokens of a tile)."""
    cfg = dataclasses.replace(MODEL, tie_embeddings=False)
    params = model_params(cfg)
    mesh = make_mesh(dict(tensor=2, context=4))
    assert step.gathers_tiles(Transformer(cfg, mesh), chunk, T) == gather
    want = objective_and_grads(cfg, None, step.PLAIN, params)
    placed = jax.device_put(params, jax.tree.map(lambda x: x.sharding, abstract_params(cfg, mesh)))
    got = objective_and_grads(cfg, mesh, LossConfig(chunk_size=chunk), placed)
    assert got[3]["unembedding"].sharding.spec == P(None, "tensor")
    assert_same(got, want, 1e-6)


def _step_on_tensor_2_context_4(vocab, helpers):
    """(cfg, model, compiled_shapes): a float32 model of vocabulary `vocab` on a (tensor 2,
    context 4) mesh, and the buffer shapes of its compiled train step for a LossConfig."""
    cfg = dataclasses.replace(MODEL, vocab_size=vocab, dtype="float32", param_dtype="float32")
    mesh = make_mesh(dict(tensor=2, context=4))
    model, tx = Transformer(cfg, mesh), optax.adamw(1e-3)
    abstract, shardings = state.state_shardings(model, tx, mesh, cfg.rules)
    data = step.batch_sharding(mesh, mesh_axes_for(cfg.rules, "act_batch"))
    dtypes = dict(weights=jnp.float32, answer_mask=jnp.bool_)
    abstract_batch = {
        k: jax.ShapeDtypeStruct((B, 64), dtypes.get(k, jnp.int32), sharding=data)
        for k in step.BATCH_KEYS
    }

    def compiled_shapes(loss_config):
        jitted = step.jit_train_step(model, tx, shardings, data, mesh, loss_config)
        return helpers.hlo_shapes(jitted.lower(abstract, abstract_batch).compile().as_text())

    return cfg, model, compiled_shapes


def test_compiled_step_holds_no_tokens_by_vocabulary_buffer(helpers):
    """The train step on a (tensor 2, context 4) mesh: plain, some buffer holds every local
    token's logits ([B, T / 4, V / 2] and the like); tiled by 8 tokens per row, no buffer with a
    vocabulary dim (the head's weights [E, V] aside) holds more than one tile's tokens (B x 8 /
    4) per device."""
    vocab = 202  # V / 2 = 101: a dim nothing else has (V / 8 is not whole: tokens split)
    cfg, model, compiled_shapes = _step_on_tensor_2_context_4(vocab, helpers)
    assert not step.gathers_tiles(model, 8, 64)

    def vocab_buffers(loss_config):
        return {s for s in compiled_shapes(loss_config) if vocab // 2 in s or vocab in s}

    def most_tokens(shapes):  # of the buffers with a vocabulary dim but not the head's [E, V]
        shapes = [s for s in shapes if cfg.d_model not in s]
        return max(int(np.prod(s)) // (vocab // 2 if vocab // 2 in s else vocab) for s in shapes)

    assert most_tokens(vocab_buffers(step.PLAIN)) >= B * 64 // 4  # every local token's logits
    assert most_tokens(vocab_buffers(LossConfig(chunk_size=8))) == B * 8 // 4  # one tile's


def test_compiled_step_with_gathered_tiles_splits_the_vocabulary_over_every_device(helpers):
    """Tiles of 8 tokens a row on a (tensor 2, context 4) mesh with V = 104 (8 x 13): each device
    holds every token of a tile (B x 8) on V / 8 = 13 entries, and nothing sized by tokens and
    V / 2 or V (the head's weights' slices [E, V / 2] aside): the head's weights are never
    gathered whole nor their gradient summed whole."""
    vocab = 104
    cfg, model, compiled_shapes = _step_on_tensor_2_context_4(vocab, helpers)
    assert step.gathers_tiles(model, 8, 64)
    shapes = compiled_shapes(LossConfig(chunk_size=8))
    assert (B, 8, vocab // 8) in shapes  # a tile's logits: all its tokens, V / 8
    wide = {s for s in shapes if vocab in s or vocab // 2 in s}
    assert wide and all(cfg.d_model in s and np.prod(s) <= cfg.d_model * vocab // 2 for s in wide)
