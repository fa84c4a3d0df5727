"""Where each field of a run's config comes from (ringattn/run/fields.py): every model field has a
kind; unset fields come from the run, set ones are requested; a shape change with init_from and a
fixed field's change on a rerun are errors that name the fields; old `sliding_window` configs
still read."""

import dataclasses

import ml_collections
import pytest

from configs import default
from configs import streaming as streaming_config
from ringattn.nn.config import ModelConfig
from ringattn.run import fields

# A Mistral-style imported run: theta 1e5, a window of 7 keys to the left, HF's untied scale.
IMPORTED = dict(
    vocab_size=300, num_layers=2, d_model=64, num_heads=4, num_kv_heads=2, head_dim=16,
    mlp_dim=96, tie_embeddings=True, scale_tied_logits=False, norm_eps=1e-5,
    rope=dict(theta=1e5, scaling="none", factor=1.0),
    attention=dict(impl="ring", layout="zigzag", block_q=128, block_k=128,
                   local_window_size=7, global_every=0),
)  # fmt: skip


def config_with(model):
    c = default.get_config()
    c.model = ml_collections.ConfigDict(model)
    return c


def test_every_model_field_has_one_kind():
    """Each of ModelConfig's fields is in exactly one of SHAPE, FUNCTION, SPEED."""
    groups = dict(shape=fields.SHAPE, function=fields.FUNCTION, speed=fields.SPEED)
    keys = fields.flat(fields.resolve({}))
    assert {"d_model", "rope.theta", "attention.local_window_size", "attention.impl"} <= set(keys)
    for key in keys:
        names = [n for n, group in groups.items() if key in group or key.split(".")[0] in group]
        assert names == [fields.kind(key)], key
    with pytest.raises(ValueError, match="'attention.new_thing' has no kind"):
        fields.kind("attention.new_thing")


def test_default_config_requests_no_shape_or_function_field():
    """configs/default.py leaves them unset: a run started from another keeps them all."""
    flat = fields.flat(default.get_config().model)
    for key, value in flat.items():
        if fields.kind(key) != "speed":
            assert value is None, key
    # ... and a fresh model gets ModelConfig's defaults (the passkey model).
    assert ModelConfig.from_config(default.get_config().model) == dataclasses.replace(
        ModelConfig(), attention=dataclasses.replace(ModelConfig().attention, layout="zigzag")
    )


def test_init_from_with_the_default_config_keeps_the_runs_function():
    merged, rows = fields.start_from(default.get_config(), config_with(IMPORTED), "RUN")
    cfg = ModelConfig.from_config(merged.model)
    assert cfg.rope.theta == 1e5 and cfg.attention.local_window_size == 7
    assert cfg.norm_eps == 1e-5 and not cfg.scale_tied_logits and cfg.d_model == 64
    # Speed-only fields are the config's (blocks: the platform's), never the run's.
    assert cfg.attention.block_q is None
    assert [r[0] for r in rows] == ["model.attention.block_k", "model.attention.block_q"]


def test_requested_function_fields_change_and_show_in_the_table():
    c = default.get_config()
    c.model.rope.scaling, c.model.rope.factor = "yarn", 2.0
    c.model.attention.local_window_size = 3
    merged, rows = fields.start_from(c, config_with(IMPORTED), "RUN")
    cfg = ModelConfig.from_config(merged.model)
    assert (cfg.rope.scaling, cfg.rope.factor, cfg.rope.theta) == ("yarn", 2.0, 1e5)
    assert ("model.rope.scaling", "none", "yarn") in rows
    assert ("model.rope.factor", 1.0, 2.0) in rows
    assert ("model.attention.local_window_size", 7, 3) in rows
    text = fields.table(rows, "RUN")
    assert "model.rope.scaling" in text and '"yarn"' in text and "RUN" in text.splitlines()[0]


def test_extend_variant_gets_its_factor_and_original_length():
    """configs/default.py:extend sets rope.factor 4 and original_len 256 in the file: requested,
    so a run started from the 256-token model gets them, with the scaling from the flag."""
    c = default.get_config("extend")
    c.model.rope.scaling = "yarn"  # --config.model.rope.scaling=yarn
    merged, rows = fields.start_from(c, default.get_config(), "PASSKEY")
    rope = ModelConfig.from_config(merged.model).rope
    assert (rope.scaling, rope.factor, rope.original_len, rope.theta) == ("yarn", 4.0, 256, 1e4)
    changed = [r[0] for r in rows]
    assert changed == [f"model.rope.{k}" for k in ("factor", "original_len", "scaling")]


def test_shape_fields_with_init_from_are_an_error_naming_them():
    c = default.get_config()
    c.model.d_model, c.model.num_layers = 128, 2  # d_model differs from the run's, layers not
    with pytest.raises(ValueError, match=r"(?s)shape fields.*model.d_model\s+64\s+128") as e:
        fields.start_from(c, config_with(IMPORTED), "RUN")
    assert "num_layers" not in str(e.value)
    c.model.d_model = 64  # the run's own value: fine
    fields.start_from(c, config_with(IMPORTED), "RUN")
    with pytest.raises(ValueError, match="(?s)model.num_layers.*model.d_model"):
        fields.start_from(default.get_config("test"), config_with(IMPORTED), "RUN")


def test_rerun_may_change_steps_and_speed_only():
    stored = fields.fresh(default.get_config("test"))
    c = default.get_config("test")
    c.num_train_steps, c.eval_every_steps, c.mesh.data = 100, 5, 2
    c.model.attention.impl, c.model.remat = "allgather", "full"
    merged, rows = fields.resume(c, stored, "W")
    assert ("num_train_steps", 6, 100) in rows
    assert ("model.attention.impl", "ring", "allgather") in rows
    assert merged.model.remat == "full" and merged.num_train_steps == 100
    # A run started from another: a rerun that leaves init_from out keeps it, another is refused.
    stored.init_from = "SOURCE"
    merged, rows = fields.resume(c, stored, "W")
    assert merged.init_from == "SOURCE" and "init_from" not in [r[0] for r in rows]
    c.init_from = "OTHER"
    with pytest.raises(ValueError, match=r'init_from\s+"SOURCE"\s+"OTHER"'):
        fields.resume(c, stored, "W")


@pytest.mark.parametrize(
    "change, listed, init_from",
    [
        (dict(d_model=64), "model.d_model", False),
        (dict(rope_theta=1e5), "model.rope.theta", True),
        (dict(window=4), "model.attention.local_window_size", True),
        (dict(scan_layers=True), "model.scan_layers", True),
        (dict(task="multikey"), "task", True),
        (dict(learning_rate=1.0), "learning_rate", True),
    ],
)
def test_rerun_refuses_fixed_fields(change, listed, init_from):
    stored = fields.fresh(default.get_config("test"))
    c = default.get_config("test")
    for key, value in change.items():
        if key == "rope_theta":
            c.model.rope.theta = value
        elif key == "window":
            c.model.attention.local_window_size = value
        elif key in ("d_model", "scan_layers"):
            c.model[key] = value
        else:
            c[key] = value
    with pytest.raises(ValueError, match="nothing in W was written") as e:
        fields.resume(c, stored, "W")
    message = str(e.value)
    assert listed in message and "a new --workdir" in message
    assert ("--config.init_from=W" in message) == init_from
    assert "num_train_steps" in message  # what may change


def test_sliding_window_configs_still_read():
    """An old config (or config.json) with `sliding_window` s reads as local_window_size s - 1."""
    model = dict(IMPORTED, attention=dict(sliding_window=8, global_every=0))
    with pytest.warns(DeprecationWarning, match="sliding_window.*local_window_size"):
        cfg = ModelConfig.from_config(model)
    assert cfg.attention.local_window_size == 7
    with pytest.warns(DeprecationWarning):
        assert ModelConfig.from_config({"attention": {"sliding_window": 0}}).layer_window(0) is None
    # A config that still says sliding_window = 0 (no window) requests nothing: a run started
    # from a windowed model keeps its window.
    old_config = default.get_config()
    old_config.model.attention.sliding_window = 0
    with pytest.warns(DeprecationWarning):
        merged, _ = fields.start_from(old_config, config_with(IMPORTED), "RUN")
    assert ModelConfig.from_config(merged.model).attention.local_window_size == 7
    with pytest.raises(ValueError, match="not also the deprecated `sliding_window`"):
        ModelConfig.from_config({"attention": {"sliding_window": 8, "local_window_size": 3}})


def test_streaming_config_leaves_function_fields_unset_but_sinks():
    assert streaming_config.get_config().model.attention.sinks is None
    assert streaming_config.get_config("learned_sinks").model.attention.sinks is True
