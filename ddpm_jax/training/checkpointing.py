"""Checkpoints that survive preemption, torn saves and bit rot, and refuse a foreign workdir.

Each checkpoint is an Orbax step directory `<workdir>/checkpoints/<step>/`
with two items: `state` (the whole `TrainState`) and `meta` (JSON: the config,
and the shape and dtype of every state array). Orbax writes a step into a
temporary directory and renames it when complete, so a save killed halfway
leaves no step behind, and it deletes the oldest of `keep` checkpoints only
after a newer one is complete.

After a save is complete, process 0 adds `manifest.json`: the size and
SHA-256 of every file of the step. Restoring verifies it first, so a
truncated, deleted or overwritten file is found without handing Orbax a
broken step; a step that fails the manifest or Orbax's restore is skipped
with a warning naming the step and the problem, and the newest readable one
is used. A training run moves the skipped steps to
`<workdir>/checkpoints_unreadable/` (never deleting them) so that its next
saves do not collide with them.
"""
import hashlib
import json
import logging
import time
from typing import Any, Callable, Dict, List, Optional, Tuple

import jax
import ml_collections
import orbax.checkpoint as ocp
from etils import epath

from ddpm_jax.models import unet
from ddpm_jax.runtime import parallel, storage
from ddpm_jax.training import train_state

CHECKPOINT_SUBDIR = "checkpoints"
UNREADABLE_SUBDIR = "checkpoints_unreadable"
MANIFEST = "manifest.json"
# The fields that define what a checkpoint's network computes: a workdir
# whose checkpoints differ in any of them belongs to another model.
IDENTITY_FIELDS = ("model", "diffusion", "data.image_size", "data.channels")
# Fields added after checkpoints were first written, with the value that older
# checkpoints, which lack them, behaved as.
LATER_FIELDS = {"model.num_classes": 0, "training.label_dropout": 0.1, "sampling.guidance": 0.0,
                "optim.ema_warmup": False, "optim.ema_start": 0, "sampling.clip_denoised": False,
                "training.steps_per_call": 1, "data.image_key": "image",
                "data.train_split": "train", "data.converted_data_dir": "",
                "data.in_memory_max_bytes": 1 << 30, "data.worker_count": 2,
                "sampling.solver_order": 2, "sampling.step_spacing": "time",
                "sampling.dynamic_threshold": 0.0, "diffusion.objective": "eps",
                "diffusion.loss_weighting": "none", "diffusion.min_snr_gamma": 5.0,
                "diffusion.terminal_snr": "design"}
# Fields renamed after checkpoints were first written: old name -> new name.
RENAMED_FIELDS = {"sampling.ddim_steps": "sampling.steps"}

log = logging.getLogger(__name__)


class CheckpointError(RuntimeError):
    """No checkpoint of a workdir can be used; the message names the directory and why."""


class ConfigMismatchError(CheckpointError):
    """The workdir's checkpoints belong to a different model config."""


class SaveError(RuntimeError):
    """A checkpoint could not be written: Orbax's background save or its manifest failed.

    The message names the step, the directory and the cause in one line (the cause's
    traceback is the exception's `__cause__`); earlier checkpoints are left intact.
    """


def _flatten(tree: Any, prefix: str = "") -> Dict[str, Any]:
    """{'a.b': leaf} of nested dicts; lists are leaves."""
    if isinstance(tree, dict):
        out = {}
        for key, value in tree.items():
            out.update(_flatten(value, f"{prefix}{key}."))
        return out
    return {prefix[:-1]: tree}


def _json_ready(config) -> Dict[str, Any]:
    """The config as plain JSON types (tuples become lists), as stored in a checkpoint."""
    as_dict = config.to_dict() if isinstance(config, ml_collections.ConfigDict) else config
    return json.loads(json.dumps(as_dict))


def upgrade_config(stored: Dict[str, Any]) -> Dict[str, Any]:
    """A stored config (nested dicts) in today's field names, with the old-behaviour value
    of each of LATER_FIELDS it lacks."""
    config = {section: dict(fields) if isinstance(fields, dict) else fields
              for section, fields in stored.items()}
    for old, new in RENAMED_FIELDS.items():
        (old_section, old_name), (new_section, new_name) = old.split("."), new.split(".")
        fields = config.get(old_section, {})
        if old_name in fields and new_name not in config.get(new_section, {}):
            config.setdefault(new_section, {})[new_name] = fields.pop(old_name)
    for path, value in LATER_FIELDS.items():
        section, name = path.split(".")
        if isinstance(config.get(section), dict):
            config[section].setdefault(name, value)
    return config


def config_differences(stored: Dict[str, Any], config) -> Tuple[List[str], List[str]]:
    """(identity differences, other differences) between a stored config (in today's fields,
    `upgrade_config`, as `Checkpointer` reads it) and `config`, each as
    'config.field: checkpoint X, now Y'."""
    old, new = _flatten(_json_ready(stored)), _flatten(_json_ready(config))
    identity, other = [], []
    for key in sorted(set(old) | set(new)):
        if old.get(key, "<absent>") != new.get(key, "<absent>"):
            line = (f"config.{key}: checkpoint {old.get(key, '<absent>')!r}, "
                    f"now {new.get(key, '<absent>')!r}")
            is_identity = any(key == f or key.startswith(f + ".") for f in IDENTITY_FIELDS)
            (identity if is_identity else other).append(line)
    return identity, other


def state_shapes(state: Any) -> Dict[str, List]:
    """{'path/to/leaf': [shape, dtype]} of a (possibly abstract) state."""
    flat, _ = jax.tree_util.tree_flatten_with_path(state)
    return {jax.tree_util.keystr(path): [list(leaf.shape), str(leaf.dtype)] for path, leaf in flat}


def _file_digest(path: epath.Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _step_files(step_dir: epath.Path) -> Dict[str, epath.Path]:
    """Every file under a step directory but the manifest."""
    return {name: path for name, path in storage.files_under(step_dir).items()
            if name != MANIFEST}


def write_manifest(step_dir: epath.Path) -> None:
    """Record size and SHA-256 of every file of a complete step (written all or nothing)."""
    entries = {name: {"size": p.stat().length, "sha256": _file_digest(p)}
               for name, p in sorted(_step_files(step_dir).items())}
    storage.write_bytes(step_dir / MANIFEST, json.dumps(entries, indent=1).encode())


def verify_manifest(step_dir: epath.Path) -> Optional[str]:
    """The first problem of a step's files against its manifest, or None if all match
    (or if the step has no readable manifest, which a save killed after completing leaves)."""
    path = step_dir / MANIFEST
    try:
        entries = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    files = _step_files(step_dir)
    for name, entry in entries.items():
        if name not in files:
            return f"file {name} is missing"
        size = files[name].stat().length
        if size != entry["size"]:
            return f"file {name} has {size} bytes, {entry['size']} were written"
        if _file_digest(files[name]) != entry["sha256"]:
            return f"file {name} differs from what was written (SHA-256 mismatch)"
    return None


def _short(error: BaseException) -> str:
    lines = str(error).strip().splitlines()
    first = lines[0] if lines else ""
    return f"{type(error).__name__}: {first[:200]}"


class Checkpointer:
    """Saves and restores a workdir's checkpoints; every process of a run makes one."""

    def __init__(self, workdir: str, keep: int):
        # Orbax's background save thread refuses relative paths.
        self.workdir = storage.absolute(workdir)
        self.directory = self.workdir / CHECKPOINT_SUBDIR
        self._manager = ocp.CheckpointManager(
            self.directory, options=ocp.CheckpointManagerOptions(max_to_keep=keep, create=True))
        self._unsealed: List[int] = []  # saved steps whose manifest is not yet written

    def all_steps(self) -> List[int]:
        return list(self._manager.all_steps())

    def save(self, step: int, state: Any, config) -> None:
        """Start saving `state` as checkpoint `step` (asynchronous; see `wait`).
        Raises SaveError if this or the previous save failed."""
        self.wait()
        meta = {"config": _json_ready(config), "shapes": state_shapes(state), "step": step}
        try:
            self._manager.save(step, args=ocp.args.Composite(
                state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)))
        except Exception as e:  # noqa: BLE001 -- whatever the cause, the step is not saved
            raise self._save_error([step], e) from e
        self._unsealed.append(step)

    def wait(self) -> None:
        """Block until every started save is complete on disk and has its manifest.

        An exception in Orbax's background save thread surfaces here, as a SaveError.
        """
        steps, self._unsealed = self._unsealed, []
        try:
            self._manager.wait_until_finished()
            if jax.process_index() == 0:
                existing = set(self._manager.all_steps())
                for step in steps:
                    if step in existing:  # not already deleted by max_to_keep
                        write_manifest(self.directory / str(step))
        except Exception as e:  # noqa: BLE001 -- whatever the cause, the step is not saved
            raise self._save_error(steps, e) from e
        parallel.barrier("ddpm_jax_checkpoint_manifests")

    def _save_error(self, steps: List[int], cause: BaseException) -> SaveError:
        saved = [s for s in self._manager.all_steps() if s not in steps]
        kept = (f"the newest complete checkpoint is step {max(saved)}" if saved
                else "no checkpoint was completed")
        lines = str(cause).strip().splitlines()
        what = f"checkpoint {', '.join(map(str, steps))}" if steps else "a checkpoint"
        return SaveError(f"saving {what} to {self.directory} failed: {type(cause).__name__}: "
                         f"{lines[0] if lines else ''} ({kept})")

    def restore_latest(self, abstract_state: Callable[[Dict[str, Any]], Any], config=None, *,
                       allow_config_change: bool = False, move_unreadable: bool = False
                       ) -> Optional[Tuple[Any, int, Dict[str, Any]]]:
        """(state, step, stored config) of the newest readable checkpoint; None if there is none.

        abstract_state: stored config dict -> the state's `jax.ShapeDtypeStruct`s
          (with shardings) to restore into.
        config: the run's config; a checkpoint of a different model (IDENTITY_FIELDS)
          raises ConfigMismatchError unless `allow_config_change`.
        move_unreadable: move skipped steps to <workdir>/checkpoints_unreadable/.
        Raises CheckpointError if checkpoints exist but none is readable, or if the
        newest readable one does not fit the state's shapes.
        """
        steps = sorted(self._manager.all_steps(), reverse=True)
        if not steps:
            return None
        skipped: List[Tuple[int, str]] = []
        result = None
        for step in steps:
            problem, meta = self._read_meta(step)
            if problem is None:
                if config is not None:
                    self._check_config(step, meta["config"], config, allow_config_change)
                abstract = abstract_state(meta["config"])
                self._check_shapes(step, meta.get("shapes"), abstract)
                try:
                    restored = self._manager.restore(step, args=ocp.args.Composite(
                        state=ocp.args.StandardRestore(abstract)))
                    result = (restored["state"], step, meta["config"])
                except Exception as e:  # noqa: BLE001 -- any failure means unreadable
                    problem = f"its arrays cannot be read ({_short(e)})"
            if result is not None:
                break
            skipped.append((step, problem))
            log.warning("Skipping checkpoint %s: %s", self.directory / str(step), problem)
        if result is None:
            listing = "; ".join(f"step {s}: {p}" for s, p in skipped)
            raise CheckpointError(
                f"no readable checkpoint in {self.directory} ({listing}). Move that directory "
                f"away to start from scratch, or restore a good copy of it.")
        if skipped:
            log.warning("Resuming from checkpoint %s, the newest readable one; skipped %s",
                        self.directory / str(result[1]),
                        ", ".join(f"step {s} ({p})" for s, p in skipped))
            if move_unreadable:
                self._move_aside([s for s, _ in skipped])
        return result

    def _read_meta(self, step: int) -> Tuple[Optional[str], Optional[Dict[str, Any]]]:
        problem = verify_manifest(self.directory / str(step))
        if problem is not None:
            return problem, None
        try:
            meta = self._manager.restore(step, args=ocp.args.Composite(
                meta=ocp.args.JsonRestore()))["meta"]
        except Exception as e:  # noqa: BLE001
            return f"its metadata cannot be read ({_short(e)})", None
        if not isinstance(meta, dict) or not isinstance(meta.get("config"), dict):
            return "its metadata holds no config", None
        meta["config"] = upgrade_config(meta["config"])  # the one place a stored config enters
        return None, meta

    def _check_config(self, step: int, stored: Dict[str, Any], config,
                      allow_config_change: bool) -> None:
        identity, other = config_differences(stored, config)
        if identity and not allow_config_change:
            raise ConfigMismatchError(
                f"{self.workdir} holds checkpoints of a different model (step {step}):\n  "
                + "\n  ".join(identity)
                + "\nUse another --workdir, or pass --allow_config_change to continue from "
                  "these checkpoints with the new config.")
        if identity or other:
            log.warning("Config differs from checkpoint step %d's; using the new values:\n  %s",
                        step, "\n  ".join(identity + other))

    def _check_shapes(self, step: int, stored: Optional[Dict[str, List]], abstract: Any) -> None:
        expected = state_shapes(abstract)
        if stored is not None and stored != expected:
            diff = [f"{k}: checkpoint {stored.get(k)}, model {expected.get(k)}"
                    for k in sorted(set(stored) | set(expected))
                    if stored.get(k) != expected.get(k)]
            raise CheckpointError(
                f"checkpoint {self.directory / str(step)} does not fit this model's state "
                f"({len(diff)} arrays differ, e.g. {diff[0]}). Use another --workdir.")

    def _move_aside(self, steps: List[int]) -> None:
        if jax.process_index() == 0:
            target_root = self.workdir / UNREADABLE_SUBDIR
            target_root.mkdir(parents=True, exist_ok=True)
            for step in steps:
                target = target_root / f"{step}-{time.strftime('%Y%m%d-%H%M%S')}"
                storage.move(self.directory / str(step), target)
                log.warning("Moved unreadable checkpoint step %d to %s", step, target)
        parallel.barrier("ddpm_jax_move_unreadable")
        self._manager.reload()

    def close(self) -> None:
        self.wait()
        self._manager.close()


def load_inference_params(workdir: str, use_ema: bool = True, mesh=None
                          ) -> Tuple[ml_collections.ConfigDict, Any, int]:
    """(config, params, step) of the newest readable checkpoint in `workdir`, for sampling.

    The config in today's fields (`upgrade_config`); the EMA parameters unless `use_ema`
    is False, replicated over `mesh` (default: all devices). Unreadable newer checkpoints
    are skipped with a warning and left in place. Raises CheckpointError if there is none.
    """
    workdir_path = epath.Path(workdir)
    if not (workdir_path / CHECKPOINT_SUBDIR).is_dir():
        raise CheckpointError(f"{workdir_path} has no {CHECKPOINT_SUBDIR}/ directory: "
                              f"it is not the --workdir of a training run")
    mesh = parallel.make_mesh() if mesh is None else mesh

    def abstract_state(stored_config: Dict[str, Any]):
        config = ml_collections.ConfigDict(stored_config)
        return abstract_train_state(config, parallel.replicated(mesh))

    checkpointer = Checkpointer(workdir, keep=1 << 30)  # never deletes: it saves nothing
    try:
        restored = checkpointer.restore_latest(abstract_state)
    finally:
        checkpointer.close()
    if restored is None:
        raise CheckpointError(f"no checkpoint in {workdir_path / CHECKPOINT_SUBDIR}")
    state, step, stored_config = restored
    return (ml_collections.ConfigDict(stored_config),
            state.ema_params if use_ema else state.params, step)


def abstract_train_state(config, sharding) -> Any:
    """The TrainState's shapes and dtypes for `config`, each with `sharding`, computing nothing."""
    model = unet.create_model(config)
    optimizer = train_state.make_optimizer(config)
    shapes = jax.eval_shape(lambda key: train_state.create_train_state(
        config, model, optimizer, key), jax.random.key(0))
    return jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sharding),
                        shapes)
