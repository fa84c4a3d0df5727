"""Orbax checkpoints of a run directory, `<workdir>/checkpoints/<step>`: the train state and the
data iterator's state (an imported run's checkpoint 0 holds parameters only). Async saves, the
last k kept, restores from the newest checkpoint that reads: an unreadable one (a crash mid-write
on a filesystem without atomic renames, a deleted file) is reported and the one before it used;
when checkpoints exist and none reads, UnreadableRun is raised (a run never silently restarts)."""

from __future__ import annotations

import os

import orbax.checkpoint as ocp
from absl import logging


class UnreadableRun(RuntimeError):
    """A run directory holds checkpoints but none of them reads into the state asked for."""

    def __init__(self, directory, failures):
        step, error = failures[0]
        super().__init__(
            f"None of the checkpoints {[s for s, _ in failures]} in {directory} reads into the "
            f"state asked for; nothing was restored. The newest, {step}: {type(error).__name__}: "
            f"{str(error)[:400]}\nA checkpoint of another model (shape, structure) or of "
            "parameters only (an import) starts a new run with "
            f"--config.init_from={os.path.dirname(directory)} and a new --workdir."
        )


class Checkpointer:
    def __init__(self, workdir, *, keep=3, async_save=True):
        self.directory = os.path.join(os.path.abspath(workdir), "checkpoints")
        self.manager = ocp.CheckpointManager(
            self.directory,
            options=ocp.CheckpointManagerOptions(
                max_to_keep=keep, create=True, enable_async_checkpointing=async_save
            ),
        )

    def save(self, step, state, data_state):
        """Start saving (async); returns at once. A step saved already is skipped."""
        if step in self.manager.all_steps():
            return
        self.manager.save(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardSave(state), data=ocp.args.JsonSave(data_state)
            ),
            force=True,
        )

    def restore_latest(self, abstract_state):
        """(step, state, data_state) of the newest checkpoint that reads into `abstract_state`,
        or None if there is no checkpoint."""
        args = ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract_state), data=ocp.args.JsonRestore()
        )
        found = self._newest(args)
        return found and (found[0], found[1]["state"], found[1]["data"])

    def restore_params(self, abstract_params):
        """(step, params) of the newest checkpoint whose parameters read into `abstract_params`
        (ShapeDtypeStructs with shardings: Orbax reshards and casts); the optimizer state and the
        step are left on disk. None if there is no checkpoint."""
        item = {"params": abstract_params}
        args = ocp.args.Composite(
            state=ocp.args.PyTreeRestore(
                item=item,
                restore_args=ocp.checkpoint_utils.construct_restore_args(item),
                partial_restore=True,
            )
        )
        found = self._newest(args)
        return found and (found[0], found[1]["state"]["params"])

    def _newest(self, args):
        failures = []
        for step in sorted(self.manager.all_steps(), reverse=True):
            try:
                return int(step), self.manager.restore(step, args=args)
            except Exception as e:  # noqa: BLE001 -- any failure to read means: try an older one
                failures.append((step, e))
                logging.warning(
                    "Checkpoint %d is unreadable (%s: %s).", step, type(e).__name__, str(e)[:300]
                )
                print(
                    f"checkpoint {step} is unreadable ({type(e).__name__}); trying the previous "
                    "one",
                    flush=True,
                )
        if failures:
            raise UnreadableRun(self.directory, failures)
        return None

    def wait(self):
        self.manager.wait_until_finished()

    def close(self):
        self.manager.wait_until_finished()
        self.manager.close()
