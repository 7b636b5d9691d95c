"""Orbax CheckpointManager wrapper: the train state plus the data-iterator state, atomically.

Each checkpoint is a step directory `<dir>/<step>/` with two items: `state` (the sharded
`TrainState`, written by every host for its shards) and `data` (the JSON iterator state of this
run's input pipeline). Orbax writes into a temporary directory and renames it when complete, so a
killed save never leaves a checkpoint that restore would pick up. Restoring takes an abstract state
carrying the target shardings, so a checkpoint written on one mesh restores onto any other.
`load_model_state` reads a step's model-state collections alone (BatchNorm statistics, for
exports), as `hub.load_params_from_checkpoint` reads its params.
"""

from __future__ import annotations

import os
from typing import Any

import jax
import orbax.checkpoint as ocp


class CheckpointMismatchError(ValueError):
    """A checkpoint whose tree or shapes differ from the state this config builds."""


def abstract_with_shardings(abstract: Any, shardings: Any) -> Any:
    """ShapeDtypeStructs carrying the shardings restore should place the arrays with."""
    return jax.tree.map(
        lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings
    )


class Checkpointer:
    """Saves every `every_steps`, keeps `max_to_keep`, restores the latest complete step.

    Args:
      directory: where step directories go (created if missing).
      every_steps: save cadence used by `should_save`.
      max_to_keep: number of step directories retained (oldest deleted first).
      async_save: write in a background thread while training continues.
    """

    def __init__(
        self, directory: str, *, every_steps: int, max_to_keep: int, async_save: bool = True
    ):
        self.directory = os.path.abspath(directory)
        self.every_steps = int(every_steps)
        options = ocp.CheckpointManagerOptions(
            max_to_keep=max_to_keep,
            create=True,
            enable_async_checkpointing=async_save,
        )
        self._manager = ocp.CheckpointManager(
            self.directory, options=options, item_names=("state", "data")
        )

    def latest_step(self) -> int | None:
        return self._manager.latest_step()

    def all_steps(self) -> list[int]:
        return list(self._manager.all_steps())

    def should_save(self, step: int) -> bool:
        return self.every_steps > 0 and step % self.every_steps == 0

    def save(self, step: int, state: Any, data_state: Any) -> None:
        """Starts saving `state` (+ JSON `data_state`) as step `step`; returns before it ends
        when async. A save for a step that already exists is skipped."""
        if step in self._manager.all_steps():
            return
        self._manager.save(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardSave(state),
                data=ocp.args.JsonSave(data_state if data_state is not None else {}),
            ),
            force=True,
        )

    def restore(self, step: int, abstract_state: Any) -> tuple[Any, Any]:
        """Restores step `step` onto the shardings carried by `abstract_state`."""
        try:
            restored = self._manager.restore(
                step,
                args=ocp.args.Composite(
                    state=ocp.args.StandardRestore(abstract_state),
                    data=ocp.args.JsonRestore(),
                ),
            )
        except ValueError as e:
            first = str(e).strip().splitlines()[0]
            raise CheckpointMismatchError(
                f"checkpoint {self.directory}/{step} does not fit this run's train state (did the "
                f"model or optimizer config change?): {first}"
            ) from e
        return restored.state, restored.data

    def wait(self) -> None:
        self._manager.wait_until_finished()

    def close(self) -> None:
        self._manager.wait_until_finished()
        self._manager.close()


def save_params(directory: str, params: Any) -> None:
    """Params-only export (`<directory>/params`), synchronous; the directory must not exist."""
    with ocp.StandardCheckpointer() as ckptr:
        ckptr.save(os.path.join(os.path.abspath(directory), "params"), params)


def load_params(directory: str, abstract: Any | None = None) -> Any:
    """Reads a params-only export, onto `abstract`'s shardings when given (else host arrays)."""
    path = os.path.join(os.path.abspath(directory), "params")
    if not os.path.isdir(path):
        raise FileNotFoundError(f"no params-only Orbax export at {path}")
    with ocp.StandardCheckpointer() as ckptr:
        return ckptr.restore(path, abstract) if abstract is not None else ckptr.restore(path)


def _saved_tree(state_dir: str) -> Any:
    """The tree metadata (nested dicts of array metadata) of a saved train state."""
    from etils import epath

    # The item handler reads the tree metadata alone (the step-level metadata file lives one
    # directory up, where the checkpointer's `metadata` would look for it and warn).
    meta = ocp.PyTreeCheckpointHandler().metadata(epath.Path(state_dir))
    return getattr(meta, "tree", meta)


def load_model_state(state_dir: str, target: Any) -> dict[str, Any]:
    """The collections of a saved `TrainState.model_state` that `target` names, on the host CPU.

    A partial restore: nothing else (params, optimizer state) is read. Collections the checkpoint
    does not hold (a run whose task has no model state) are left out of the result.

    Args:
      state_dir: a step's `state` item (`<workdir>/checkpoints/<step>/state`).
      target: `{collection: tree}` of arrays or `ShapeDtypeStruct`s with the expected shapes.

    Returns:
      `{collection: tree}` of the saved collections present in both, as host arrays.

    Raises:
      CheckpointMismatchError: a saved collection's tree or shapes differ from `target`'s.
    """
    saved = _saved_tree(state_dir)
    saved = saved.get("model_state") if isinstance(saved, dict) else None
    names = [c for c in target if isinstance(saved, dict) and c in saved]
    if not names:
        return {}
    cpu = jax.sharding.SingleDeviceSharding(jax.devices("cpu")[0])
    abstract = {
        c: jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=cpu), target[c])
        for c in names
    }
    restore_args = jax.tree.map(
        lambda a: ocp.ArrayRestoreArgs(sharding=a.sharding, global_shape=a.shape, dtype=a.dtype),
        abstract,
    )
    try:
        with ocp.PyTreeCheckpointer() as ckptr:
            restored = ckptr.restore(
                state_dir,
                args=ocp.args.PyTreeRestore(
                    item={"model_state": abstract},
                    restore_args={"model_state": restore_args},
                    partial_restore=True,
                ),
            )
    except ValueError as e:
        first = str(e).strip().splitlines()[0]
        raise CheckpointMismatchError(
            f"the model state in {state_dir} does not fit {sorted(names)}: {first}"
        ) from e
    return dict(restored["model_state"])
