"""Orbax checkpoints of the train state and the data iterator's state, under
`<workdir>/checkpoints/<step>`: async saves, the last k kept, resume from the newest readable
one."""

from __future__ import annotations

import os

import orbax.checkpoint as ocp
from absl import logging


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
        """(step, state, data_state) from the newest checkpoint that reads, or None if there is
        none. An unreadable checkpoint (a crash mid-write on a filesystem without atomic renames,
        a deleted file) is reported and the one before it used."""
        for step in sorted(self.manager.all_steps(), reverse=True):
            try:
                restored = self.manager.restore(
                    step,
                    args=ocp.args.Composite(
                        state=ocp.args.StandardRestore(abstract_state), data=ocp.args.JsonRestore()
                    ),
                )
            except Exception as e:  # noqa: BLE001 -- any failure to read means: try an older one
                logging.warning(
                    "Checkpoint %d is unreadable (%s: %s); trying the previous one.",
                    step,
                    type(e).__name__,
                    str(e)[:300],
                )
                print(
                    f"checkpoint {step} is unreadable ({type(e).__name__}); trying the previous "
                    "one",
                    flush=True,
                )
                continue
            return step, restored["state"], restored["data"]
        return None

    def wait(self):
        self.manager.wait_until_finished()

    def close(self):
        self.manager.wait_until_finished()
        self.manager.close()
