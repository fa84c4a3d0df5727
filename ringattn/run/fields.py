"""Where each field of a run's config comes from: one rule for a fresh run, a run started from
another run's parameters (`init_from`), a rerun in the same workdir (resume) and code calling
`train_and_evaluate(config)`.

Model fields are of three kinds:
- SHAPE (the parameters' shapes): always the run's. A config may set one only to the run's value;
  another value with init_from or on resume is an error that names it.
- FUNCTION (what the parameters compute: RoPE, window, soft cap, sinks, norm eps, tied-logit
  scale): the run's unless the config requests another value. With init_from the change is made
  and shown in a table; on resume it is an error (start a new run from this one instead).
- SPEED (how it is computed: attention implementation, layout, blocks, kernel, remat, scan,
  chunks, dtypes, sharding rules): the config's, or the platform's / ModelConfig's default where
  the config leaves it None; never the run's.

"Requested" is mechanical: configs/ leave SHAPE and FUNCTION fields None; a config file or flag
that sets one requests it. For a fresh model None is ModelConfig's default.

Other fields (task, task_params, data, optimizer, seed, init_from ...) are the config's. A rerun in
the same workdir may change only the RESUMABLE ones and SPEED model fields (but not scan_layers:
the checkpoints store the layers one way). The vocabulary is SHAPE (`vocab_size`) plus the run's
tokenizer files (`<run>/hf/`, followed through init_from), which nothing changes.
"""

from __future__ import annotations

import dataclasses
import json

import ml_collections

from ringattn.nn.config import ModelConfig, upgrade

SHAPE = ("vocab_size", "num_layers", "d_model", "num_heads", "num_kv_heads", "head_dim")
SHAPE += ("v_head_dim", "mlp_dim", "tie_embeddings")
FUNCTION = ("rope", "attention.local_window_size", "attention.global_every")
FUNCTION += ("attention.logits_soft_cap", "attention.sinks", "scale_tied_logits", "norm_eps")
SPEED = ("attention.impl", "attention.layout", "attention.axis", "attention.block_q")
SPEED += ("attention.block_k", "attention.head_chunks", "attention.prefill", "attention.kernel")
SPEED += ("remat", "scan_layers", "mlp_chunk_size", "dtype", "param_dtype", "rule_overrides")
# Speed-only, but the checkpoints store the layers stacked or one by one: a rerun keeps it.
CHECKPOINT_LAYOUT = ("scan_layers",)
# Top-level fields a rerun in the same workdir may change (besides SPEED model fields).
RESUMABLE = ("num_train_steps", "log_every_steps", "eval_every_steps", "eval_batches")
RESUMABLE += ("checkpoint_every_steps", "keep_checkpoints", "mesh")
RESUMABLE += ("eval_task_params", "eval_at_start", "loss_chunk_size")  # the loss's tiles: speed
# What the trainer records in a run's config.json: the init_from table. Not a setting.
RECORD = "init_from_changes"
SUBCONFIGS = ("rope", "attention")


def kind(key):
    """ "shape", "function" or "speed" of a model field ("d_model", "rope.theta" ...)."""
    for name, keys in (("shape", SHAPE), ("function", FUNCTION), ("speed", SPEED)):
        if key in keys or key.split(".")[0] in keys:
            return name
    raise ValueError(
        f"run fields: model field {key!r} has no kind; add it to ringattn/run/fields.py."
    )


def resolve(model) -> dict:
    """A model field (any form; None: the default) as every ModelConfig field's value, nested
    dicts as a run's config.json stores them; `rule_overrides` as given."""
    fields = upgrade(model)
    out = dataclasses.asdict(ModelConfig.from_config(fields))
    del out["rules"]
    if fields.get("rule_overrides"):
        out["rule_overrides"] = _json(fields["rule_overrides"])
    return _json(out)


def merge_model(requested, run) -> dict:
    """The model of a run continued from `run`'s parameters (resolved): SHAPE and FUNCTION
    fields the run's unless `requested` sets them, SPEED fields `requested`'s."""
    ours, theirs = flat(upgrade(requested)), flat(resolve(run))
    merged = {}
    for key in sorted(set(ours) | set(theirs)):
        if kind(key) == "speed":
            merged[key] = ours.get(key)
        else:
            merged[key] = theirs.get(key) if ours.get(key) is None else ours[key]
    return resolve(nest(merged))


def speed_only(model) -> dict:
    """The SPEED fields of a model field, nested."""
    return nest({k: v for k, v in flat(upgrade(model)).items() if kind(k) == "speed"})


def changes(before, after):
    """[(field, before, after)] of two resolved models' fields that differ."""
    a, b = flat(before), flat(after)
    return [
        (f"model.{k}", a.get(k), b.get(k)) for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)
    ]


def fresh(config):
    """`config` with its model resolved (None: ModelConfig's defaults)."""
    return _with_model(config, resolve(config.model))


def start_from(config, source_config, source):
    """(`config` with the model of a run started from the parameters of the run `source` whose
    config is `source_config`, [(field, source's value, new value)]). A SHAPE field that the
    config sets to another value than the source's is an error naming it."""
    theirs = resolve(source_config.model)
    ours = flat(upgrade(config.model))
    wrong = [
        (f"model.{k}", v, ours[k])
        for k, v in flat(theirs).items()
        if kind(k) == "shape" and ours.get(k) is not None and ours[k] != v
    ]
    if wrong:
        raise ValueError(
            f"init_from: a run started from {source}'s parameters has {source}'s shape, but the "
            f"config sets these shape fields to other values:\n{table(wrong, source)}\n"
            "Leave them unset (configs/default.py does, but for the variants that describe a "
            f"fresh model: `test`, `7b_1m`), set them to {source}'s values, or drop "
            "--config.init_from to train a fresh model."
        )
    merged = merge_model(config.model, theirs)
    return _with_model(config, merged), changes(theirs, merged)


def resume(config, stored, workdir):
    """(`config` with its model continued from the run in `workdir` whose config.json is
    `stored`, [(field, the run's value, the new value)] of what the rerun changes). A change a
    rerun may not make is an error naming the fields, old and new, and the ways forward."""
    theirs = resolve(stored.model)
    merged = merge_model(config.model, theirs)
    rows = changes(theirs, merged)
    new, old = _json(config.to_dict()), _json(stored.to_dict())
    if not new.get("init_from") and old.get("init_from"):  # left out: the run's provenance
        config = ml_collections.ConfigDict({**new, "init_from": old["init_from"]})
        new = _json(config.to_dict())
    for key in sorted((set(new) & set(old)) - {"model", RECORD}):
        if new[key] != old[key]:
            rows.append((key, old[key], new[key]))
    fixed = [r for r in rows if not resumable(r[0])]
    if fixed:
        kinds = {kind(f[6:]) for f, _, _ in fixed if f.startswith("model.")}
        forward = [f"  - a new run: a new --workdir (or remove {workdir} yourself);"]
        if kinds <= {"function", "speed"}:
            forward.append(
                f"  - the parameters of this run with the new values: --config.init_from={workdir} "
                "with a new --workdir (a fresh optimizer at step 0);"
            )
        forward.append(f"  - resuming: the run's values (in {workdir}/config.json).")
        raise ValueError(
            f"train_and_evaluate: {workdir} holds a run whose config differs where a rerun may "
            f"not change it; nothing in {workdir} was written.\n{table(fixed, 'the run')}\n"
            "Ways forward:\n" + "\n".join(forward) + "\n"
            f"A rerun may change {', '.join(RESUMABLE)} and the model's speed-only fields "
            f"({', '.join(s for s in SPEED if s not in CHECKPOINT_LAYOUT)})."
        )
    return _with_model(config, merged), rows


def resumable(field):
    """Whether a rerun in the same workdir may change `field` ("model.attention.impl" ...)."""
    if field.startswith("model."):
        key = field[len("model.") :]
        return kind(key) == "speed" and key not in CHECKPOINT_LAYOUT
    return field.split(".")[0] in RESUMABLE


def table(rows, source="the run"):
    """rows [(field, old, new)] as an aligned text table."""
    text = [("field", source, "new")] + [(f, _show(a), _show(b)) for f, a, b in rows]
    widths = [max(len(r[i]) for r in text) for i in range(2)]
    return "\n".join(f"  {f:<{widths[0]}}  {a:<{widths[1]}}  {b}" for f, a, b in text)


def _show(value):
    return "(unset)" if value is None else json.dumps(value)


def _with_model(config, model):
    out = ml_collections.ConfigDict(_json(config.to_dict()))
    out.model = ml_collections.ConfigDict(model)
    return out


def _json(x):
    """Plain JSON values (tuples as lists, ConfigDicts as dicts), as config.json holds them."""
    return json.loads(json.dumps(x.to_dict() if hasattr(x, "to_dict") else x))


def flat(model):
    """{"d_model": .., "rope.theta": .., "attention.impl": ..} of a (nested) model field."""
    out = {}
    for key, value in _json(model).items():
        if key in SUBCONFIGS:
            out.update({f"{key}.{k}": v for k, v in (value or {}).items()})
        else:
            out[key] = value
    return out


def nest(fields):
    """The nested form of a flat model dict."""
    out = {}
    for key, value in fields.items():
        head, _, rest = key.partition(".")
        if rest:
            out.setdefault(head, {})[rest] = value
        else:
            out[key] = value
    return out
