"""Checkpoints for exact resume: `output_dir/checkpoint-STEP/` holds everything the next step reads.

- `state.pt`: the step; the trained tensors of each model (a LoRA adapter and any head, or every weight); optimizer
  and `torch.Generator` states; the data position; the rollout engine's call counter and weight version; and the
  process's RNG states (torch CPU and CUDA, python `random`, numpy).
- Under torchrun / accelerate, `state.pt` holds what every process shares (rank 0's), and `rank-R.pt` each process's
  own generators, rollout engine and RNG states. The models sharded with `fsdp` and their optimizers are saved
  by every process into `sharded/` with `torch.distributed.checkpoint`, which loads them into any number of
  processes (one included).
- `config.json`: the config class and the run's settings, compared with the resuming run's.
- `manifest.json`, written last: each other file's size and SHA-256. Resuming checks them before loading: `latest`
  skips a damaged or incomplete checkpoint with a warning naming it and resumes from the newest good one; a damaged
  checkpoint named explicitly is an error. A malformed manifest (of another shape, or naming a path outside the
  checkpoint) is damage too. A checkpoint without a manifest (written before manifests existed) is accepted with a
  warning; if its state cannot be read, `latest` goes on to the one before it. MDM SFT's Trainer checkpoints get a
  manifest too (`write_manifest`) and are chosen the same way (`good_checkpoint`). Hashing costs one read of each
  file at save and at resume: 0.5-1 GB/s on one core with SHA extensions (measured on a 2-core development machine,
  busy and idle), so 16-32 s each way for the 16 GB state of a fully fine-tuned 8B model, well under a second for a
  LoRA adapter's.

A checkpoint is written into a hidden temporary directory and renamed into place, so a run killed mid-save leaves
the earlier checkpoints as they were. Only the newest `save_total_limit` are kept. `write_directory` does the same
for `final/`: an interrupt while it is written leaves the old `final/` or the new one, whole. On Linux the two are
exchanged in one step (`renameat2` with RENAME_EXCHANGE); where that is unavailable the old one is renamed aside
first, and a kill between the two renames leaves it as `.final.old`, which the next `write_directory` puts back.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import functools
import hashlib
import json
import logging
import os
import random
import re
import shutil
import signal
import threading
from collections.abc import Callable
from dataclasses import asdict, dataclass

import numpy as np
import torch

logger = logging.getLogger(__name__)

STATE, CONFIG, MANIFEST = "state.pt", "config.json", "manifest.json"
AT_FDCWD, RENAME_EXCHANGE = -100, 2
NAME = re.compile(r"checkpoint-(\d+)")
# Settings the saved state depends on: resuming with other values cannot restore it.
STRUCTURE = ("model", "teacher", "use_lora", "lora_r", "lora_alpha", "lora_dropout", "lora_target_modules",
             "value_model", "discriminator_blocks", "ema", "task", "dataset", "dataset_path", "dataset_name",
             "dataset_config", "dataset_train_split", "train_size")
# Settings a resumed run may change without changing what it computes.
FREE = ("max_steps", "eval_steps", "save_steps", "save_total_limit", "resume", "output_dir", "overwrite_output_dir",
        "report_to", "logging_steps", "run_name", "project", "tensorboard", "push_to_hub", "hub_model_id",
        "hub_private_repo", "hub_token")
# What a run of the custom-loop trainers leaves in its output_dir besides its checkpoints.
RECORDS = ("metrics.jsonl", "completions.jsonl", "tensorboard", "final", "curves.png", "curve.png")


@dataclass
class CheckpointArguments:
    """Checkpoint settings of the custom-loop trainers (TraceRL, VRPO, DiDi)."""

    save_steps: int = 0
    """Save output_dir/checkpoint-STEP every this many steps and at the last step (0: never)."""
    save_total_limit: int | None = 2
    """Keep the newest this many checkpoints (None: keep all)."""
    resume: str | None = None
    """Continue a run exactly: a checkpoint directory, or 'latest' (or true) for the newest one in output_dir."""
    overwrite_output_dir: bool = False
    """Start a new run in an output_dir holding an earlier one by deleting that run's metrics, completions,
    TensorBoard logs, checkpoints, final model and plot first (without it, such an output_dir is refused)."""

    def __post_init__(self):
        if hasattr(super(), "__post_init__"):  # the config classes this one is mixed into
            super().__post_init__()
        self.resume = resume_setting(self.resume)
        if self.save_steps < 0:
            raise ValueError(f"save_steps must be 0 (no checkpoints) or positive, got {self.save_steps}")
        if self.save_total_limit is not None and self.save_total_limit < 1:
            raise ValueError(f"save_total_limit must be at least 1 or None (keep all), got {self.save_total_limit}")


def resume_setting(value) -> str | None:
    """`resume` as a recipe or the command line gives it: 'latest' (also true), None (also false), or a directory."""
    if value is True or str(value).lower() in ("true", "latest"):
        return "latest"
    if value is None or value is False or str(value).lower() == "false":
        return None
    return value


def checkpoints(output_dir: str) -> list[str]:
    """The finished checkpoint directories in `output_dir`, oldest step first."""
    if not os.path.isdir(output_dir):
        return []
    found = [(int(m.group(1)), name) for name in os.listdir(output_dir) if (m := NAME.fullmatch(name))]
    return [os.path.join(output_dir, name) for _, name in sorted(found)]


def checkpoint_due(config, step: int) -> bool:
    """Whether `step` ends with a checkpoint: every `save_steps` steps and at the last step."""
    return bool(config.save_steps) and (step % config.save_steps == 0 or step == config.max_steps)


def save_checkpoint(config, step: int, objects: dict) -> str:
    """Write output_dir/checkpoint-STEP with the state of `objects` (models, optimizers, generators, and anything
    with `state_dict`) and the RNG states; drop the oldest checkpoints beyond `save_total_limit`; returns the path.
    Under torchrun every process calls it (module docstring)."""
    from dlm_rl import distributed

    final = os.path.join(config.output_dir, f"checkpoint-{step}")
    temporary = os.path.join(config.output_dir, f".checkpoint-{step}.tmp")
    main = distributed.is_main()
    if main:
        shutil.rmtree(temporary, ignore_errors=True)  # left by a run killed mid-save
        os.makedirs(temporary)
    distributed.barrier()
    _release(objects)
    shared, own, sharded = _split(objects)
    if main:
        state = {"step": step, "rng": rng_states(), "world_size": distributed.world_size(),
                 "sharded": sorted(sharded), **{name: _state_of(obj) for name, obj in shared.items()}}
        _save(state, os.path.join(temporary, STATE))
    if distributed.world_size() > 1:
        own_state = {"rng": rng_states(), **{name: _state_of(obj) for name, obj in own.items()}}
        _save(own_state, os.path.join(temporary, f"rank-{distributed.rank()}.pt"))
    if sharded:
        import torch.distributed.checkpoint as dcp

        dcp.save(_sharded_states(sharded, objects), checkpoint_id=os.path.join(temporary, "sharded"))
    distributed.barrier()
    if main:
        with open(os.path.join(temporary, CONFIG), "w") as f:
            json.dump({"config_class": type(config).__name__, "step": step, "config": _plain(config)}, f, indent=2)
            _sync(f)
        write_manifest(temporary)
        if os.path.exists(final):  # a run resumed from an earlier checkpoint reaches this step again
            _remove(final)
        os.rename(temporary, final)
        found = checkpoints(config.output_dir)
        if config.save_total_limit is not None:
            for old in found[: -config.save_total_limit]:
                _remove(old)
        logger.info("saved %s", final)
    distributed.barrier()
    return final


def _save(state: dict, path: str) -> None:
    with open(path, "wb") as f:
        torch.save(state, f)
        _sync(f)


def _split(objects: dict) -> tuple[dict, dict, dict]:
    """`objects` as (shared by every process: rank 0 saves them, each process's own: its generators and rollout
    engine, sharded: models with sharded weights and their optimizers). In one process every object is shared."""
    from dlm_rl import distributed

    if distributed.world_size() == 1:
        return dict(objects), {}, {}
    sharded = {name: obj for name, obj in objects.items() if _is_sharded(obj)}
    sharded_parameters = {id(p) for obj in sharded.values() for p in obj.parameters()}
    sharded.update({name: obj for name, obj in objects.items() if isinstance(obj, torch.optim.Optimizer)
                    and any(id(p) in sharded_parameters for group in obj.param_groups for p in group["params"])})
    own = {name: obj for name, obj in objects.items()
           if name not in sharded and (isinstance(obj, torch.Generator) or name == "engine")}
    shared = {name: obj for name, obj in objects.items() if name not in sharded and name not in own}
    return shared, own, sharded


def _release(objects: dict) -> None:
    """Models whose sharded weights are gathered (`dlm_rl.sharding`) back to their shards, which are saved."""
    from dlm_rl import sharding

    for obj in objects.values():
        if isinstance(obj, torch.nn.Module):
            for module in obj.modules():
                sharding.release(module)


def _is_sharded(obj) -> bool:
    return isinstance(obj, torch.nn.Module) and any(type(p).__name__ == "DTensor" for p in obj.parameters())


def _model_of(optimizer, objects: dict) -> torch.nn.Module:
    """The model among `objects` that holds `optimizer`'s (first) parameters."""
    first = optimizer.param_groups[0]["params"][0]
    return next(obj for obj in objects.values()
                if isinstance(obj, torch.nn.Module) and any(p is first for p in obj.parameters()))


def _sharded_states(names, objects: dict) -> dict:
    """The `torch.distributed.checkpoint` state of the objects `names` in `objects`: a model's trained tensors, an
    optimizer's state keyed by its model's parameter names (that model being among `objects`)."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict

    states = {}
    for name in names:
        obj = objects[name]
        if isinstance(obj, torch.nn.Module):
            keep = trained_tensors(obj).keys()
            states[name] = {k: v for k, v in get_model_state_dict(obj).items() if k in keep}
        else:
            states[name] = get_optimizer_state_dict(_model_of(obj, objects), obj)
    return states


def load_checkpoint(config, objects: dict) -> int:
    """Restore `objects` and the RNG states from the checkpoint `config.resume` names; returns its step (without
    `resume`, 0)."""
    from dlm_rl import distributed

    if config.resume is None:
        return 0
    path, saved, state = _read_good_checkpoint(config)
    _compare(saved, config, path)
    world, saved_world = distributed.world_size(), state.get("world_size", 1)
    if world > 1 and world != saved_world:
        raise ValueError(f"checkpoint {path} was saved by {saved_world} process(es); resume it with as many (each "
                         "has its own generators and RNG states), or in one process")
    if saved_world > 1:  # this process's own part (in one process, rank 0's)
        own = torch.load(os.path.join(path, f"rank-{distributed.rank()}.pt"), map_location="cpu", weights_only=True)
        state = {**state, **own}
    sharded = set(state.get("sharded", ()))
    for name, obj in objects.items():
        if name not in state and name not in sharded:
            raise ValueError(f"checkpoint {path} has no {name!r} (it has {sorted(state)}); it was saved by another "
                             "kind of run")
        if name not in sharded:
            _restore(obj, state[name], f"checkpoint {path}: {name}")
    if sharded:
        _load_sharded(sorted(sharded), objects, os.path.join(path, "sharded"))
    set_rng_states(state["rng"])
    logger.info("resumed from %s at step %d", path, state["step"])
    return state["step"]


def _load_sharded(names: list[str], objects: dict, directory: str) -> None:
    """Load the objects `names` from a `torch.distributed.checkpoint` directory, resharded to this run's processes
    (or whole, in one process)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        set_model_state_dict,
        set_optimizer_state_dict,
    )

    states = _sharded_states(names, objects)
    dcp.load(states, checkpoint_id=directory)
    for name in names:
        obj = objects[name]
        if isinstance(obj, torch.nn.Module):
            set_model_state_dict(obj, states[name], options=StateDictOptions(strict=False))
        else:
            set_optimizer_state_dict(_model_of(obj, objects), obj, states[name])


def prepare_output_dir(config) -> None:
    """Before a new run loads anything: refuse an output_dir holding an earlier run's records (`RECORDS`,
    checkpoints), or with `overwrite_output_dir` delete them, so that nothing of the two runs is mixed. A resumed run
    appends to them. Every process of a distributed run may do it: each tolerates what another already deleted."""
    if config.resume is not None:
        return
    found = [path for name in RECORDS if os.path.lexists(path := os.path.join(config.output_dir, name))]
    found += checkpoints(config.output_dir)
    if not found:
        return
    held = ", ".join(os.path.basename(path) + "/" * os.path.isdir(path) for path in found)
    if not config.overwrite_output_dir:
        way = ("pass --resume latest to continue it" if checkpoints(config.output_dir)
               else "it saved no checkpoint to --resume from")
        raise ValueError(f"output_dir {config.output_dir} holds an earlier run ({held}): {way}; pass "
                         "--overwrite_output_dir true to delete it and start again, or choose another output_dir")
    logger.warning("overwrite_output_dir: deleting the earlier run in %s (%s)", config.output_dir, held)
    for path in found:
        if os.path.isdir(path) and not os.path.islink(path):
            shutil.rmtree(path, ignore_errors=True)
        else:
            with contextlib.suppress(FileNotFoundError):
                os.remove(path)


def start_run(config, objects: dict, main: bool):
    """(steps done before, the run's log): restore `objects` when resuming (`load_checkpoint`), and open the
    `RunLog` in the main process (None elsewhere), appending after the checkpoint's step when resuming."""
    from dlm_rl.run_log import RunLog

    done = load_checkpoint(config, objects)
    if not main:
        return done, None
    return done, RunLog(config.output_dir, config.report_to, config.logging_steps, config.run_name, config.project,
                        config=_plain(config), resume_step=done if config.resume else None)


def rng_states() -> dict:
    """This process's global RNG states: torch CPU (and CUDA), python `random` and numpy."""
    name, key, position, has_gauss, gauss = np.random.get_state()
    states = {"torch": torch.get_rng_state(), "python": random.getstate(),
              "numpy": (name, key.tolist(), position, has_gauss, gauss)}  # lists load with weights_only
    if torch.cuda.is_available():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def set_rng_states(states: dict) -> None:
    torch.set_rng_state(states["torch"])
    random.setstate(states["python"])
    name, key, position, has_gauss, gauss = states["numpy"]
    np.random.set_state((name, np.array(key, dtype=np.uint32), position, has_gauss, gauss))
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])


def trained_tensors(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The tensors a run changes: the trainable parameters (with LoRA, the adapter) and the saved buffers."""
    keep = {name for name, p in module.named_parameters() if p.requires_grad}
    keep |= {name for name, _ in module.named_buffers()}
    return {name: t for name, t in module.state_dict().items() if name in keep}


def refuse_earlier_run(output_dir: str) -> None:
    """A new run must not write over the checkpoints of an earlier one in the same output_dir."""
    if found := checkpoints(output_dir):
        raise ValueError(f"output_dir {output_dir} holds checkpoints of an earlier run (up to {found[-1]}); "
                         "pass --resume latest to continue it, or choose another output_dir")


def resolve_resume(resume: str, output_dir: str, marker: str = STATE) -> str:
    """The checkpoint directory `resume` names ('latest': the newest in output_dir that holds `marker`, so not one a
    kill cut short); it must hold `marker`."""
    if resume == "latest":
        found = [path for path in checkpoints(output_dir) if os.path.exists(os.path.join(path, marker))]
        if not found:
            raise FileNotFoundError(
                f"resume: 'latest' found no checkpoint-STEP directory in output_dir {output_dir}; name a "
                "checkpoint directory, or drop --resume to start a new run"
            )
        resume = found[-1]
    if not os.path.isdir(resume):
        raise FileNotFoundError(f"resume: checkpoint directory {resume} does not exist")
    if not os.path.exists(os.path.join(resume, marker)):
        raise FileNotFoundError(
            f"resume: {resume} is not a checkpoint of this trainer (no {marker}); name an output_dir/checkpoint-STEP "
            "directory written with save_steps > 0"
        )
    return resume


def good_checkpoint(resume: str, output_dir: str, marker: str = STATE) -> str:
    """The checkpoint directory `resume` names, holding `marker` and matching its manifest: for 'latest', the newest
    such one in output_dir, warning about each damaged one skipped; a damaged one named is an error."""

    def check(path: str) -> tuple[str, str | None]:
        if not os.path.exists(os.path.join(path, marker)):
            return path, f"{marker} is missing"
        return path, verify_checkpoint(path)

    return _first_whole(resume, output_dir, marker, check)[0]


def _read_good_checkpoint(config) -> tuple[str, dict, dict]:
    """(path, saved config, state) of the checkpoint `config.resume` names; for 'latest', of the newest one that is
    whole, warning about each damaged one skipped."""
    path, (saved, state) = _first_whole(config.resume, config.output_dir, STATE, _read_checkpoint)
    return path, saved, state


def _first_whole(resume: str, output_dir: str, marker: str, read: Callable[[str], tuple]) -> tuple[str, object]:
    """(path, what `read` found there) for the checkpoint `resume` names, `read(path)` giving (what it found, None)
    or (None, what is wrong); for 'latest', for the newest one in output_dir that `read` finds whole, warning about
    each damaged one skipped. A damaged checkpoint named is an error."""
    if resume != "latest":
        path = resume
        if not os.path.exists(os.path.join(path, MANIFEST)):  # else the manifest says what is missing
            path = resolve_resume(path, output_dir, marker)
        found, problem = read(path)
        if problem:
            raise ValueError(f"resume: checkpoint {path} is damaged: {problem}; resume from another checkpoint "
                             "(--resume latest picks the newest whole one)")
        return path, found
    paths = checkpoints(output_dir)
    if not paths:
        resolve_resume("latest", output_dir, marker)  # raises: nothing to resume
    damaged = []
    for path in reversed(paths):
        found, problem = read(path)
        if not problem:
            return path, found
        logger.warning("checkpoint %s is damaged (%s); trying the one before it", path, problem)
        damaged.append(f"{path}: {problem}")
    raise ValueError(f"resume: no whole checkpoint in output_dir {output_dir} (" + "; ".join(damaged)
                     + "); drop --resume to start a new run")


def _read_checkpoint(path: str) -> tuple[tuple[dict, dict] | None, str | None]:
    """((saved config, state), None), or (None, what is wrong) when the files fail their manifest or cannot be
    read."""
    problem = verify_checkpoint(path)
    if problem is None:
        try:
            with open(os.path.join(path, CONFIG)) as f:
                saved = json.load(f)
            state = torch.load(os.path.join(path, STATE), map_location="cpu", weights_only=True)
            return (saved, state), None
        except FileNotFoundError as error:
            problem = f"{os.path.basename(error.filename)} is missing"
        except Exception as error:  # a damaged file of a checkpoint without a manifest
            problem = f"it cannot be read ({type(error).__name__}: {error})"
    return None, problem


def verify_checkpoint(path: str) -> str | None:
    """What is wrong with checkpoint `path` by its manifest (malformed, a file missing, of another size or checksum),
    or None when nothing is. A checkpoint without a manifest, saved before manifests existed, passes with a
    warning."""
    manifest = os.path.join(path, MANIFEST)
    if not os.path.exists(manifest):
        logger.warning("checkpoint %s has no %s (saved by an earlier version): its files cannot be verified",
                       path, MANIFEST)
        return None
    try:
        with open(manifest) as f:
            content = json.load(f)
    except ValueError as error:
        return f"{MANIFEST} cannot be read ({error})"
    if malformed := _malformed(content):
        return f"{MANIFEST} is malformed: {malformed}"
    for name, expected in content["files"].items():
        file = os.path.join(path, name)
        if not os.path.isfile(file):
            return f"{name} is missing"
        if os.path.getsize(file) != expected["bytes"]:
            return f"{name} has {os.path.getsize(file)} bytes, the manifest says {expected['bytes']}"
        if file_sha256(file) != expected["sha256"]:
            return f"{name} does not match its checksum"
    return None


def _malformed(content) -> str | None:
    """What keeps a manifest from being `{"files": {relative path inside the checkpoint: {"bytes": int, "sha256":
    str}}}`, or None."""
    files = content.get("files") if isinstance(content, dict) else None
    if not isinstance(files, dict):
        return "it holds no 'files' mapping of names to sizes and checksums"
    for name, entry in files.items():
        if os.path.isabs(name) or any(part in ("", ".", "..") for part in name.split("/")):
            return f"it names {name!r}, a path outside the checkpoint"
        if not (isinstance(entry, dict) and type(entry.get("bytes")) is int and isinstance(entry.get("sha256"), str)):
            return f"its entry for {name} is {entry!r}, not a size in bytes and a sha256"
    return None


def write_directory(path: str, write: Callable[[str], None]) -> None:
    """Write directory `path` whole or not at all: `write(directory)` fills a hidden sibling, which then takes the
    place of `path`, exchanged with it in one step where the system can (`_exchange`), else after the old one is
    renamed aside. An error or interrupt inside `write` leaves the old `path` as it was; Ctrl-C and SIGTERM during
    the swap itself wait until it is done. An old `path` a kill left renamed aside is put back first."""
    parent, name = os.path.split(os.path.abspath(path))
    temporary, old = os.path.join(parent, f".{name}.tmp"), os.path.join(parent, f".{name}.old")
    if os.path.isdir(old) and not os.path.exists(path):
        logger.warning("%s is missing and %s is there (a kill cut its replacement short): putting it back", path, old)
        os.rename(old, path)
    shutil.rmtree(temporary, ignore_errors=True)  # left by a run killed while writing
    try:
        write(temporary)
    except BaseException:
        shutil.rmtree(temporary, ignore_errors=True)
        raise
    with _signals_held():
        if os.path.exists(path) and _exchange(temporary, path):
            shutil.rmtree(temporary, ignore_errors=True)
            return
        shutil.rmtree(old, ignore_errors=True)
        if os.path.exists(path):
            os.rename(path, old)
        os.rename(temporary, path)
        shutil.rmtree(old, ignore_errors=True)


def _exchange(first: str, second: str) -> bool:
    """Swap two paths in one step (Linux `renameat2` with RENAME_EXCHANGE): True when done, False where the kernel,
    the filesystem or libc cannot."""
    renameat2 = _renameat2()
    if renameat2 is None:
        return False
    if renameat2(AT_FDCWD, os.fsencode(first), AT_FDCWD, os.fsencode(second), RENAME_EXCHANGE) == 0:
        return True
    number = ctypes.get_errno()
    if number in (errno.ENOSYS, errno.EINVAL):
        return False
    raise OSError(number, os.strerror(number), first, None, second)


@functools.cache
def _renameat2():
    """libc's `renameat2`, or None where libc has none (glibc before 2.28, other systems)."""
    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except (AttributeError, OSError, TypeError):
        return None
    renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    renameat2.restype = ctypes.c_int
    return renameat2


@contextlib.contextmanager
def _signals_held():
    """Hold SIGINT and SIGTERM (in the main thread, where Python handles them) until the block is done, then
    deliver them."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    held = []
    names = [number for number in (signal.SIGINT, signal.SIGTERM) if signal.getsignal(number) is not None]
    previous = {number: signal.signal(number, lambda number, frame: held.append(number)) for number in names}
    try:
        yield
    finally:
        for number, handler in previous.items():
            signal.signal(number, handler)
        for number in held:
            signal.raise_signal(number)


def write_manifest(directory: str) -> None:
    """Record the size and SHA-256 of each file under `directory`, by its path relative to it, in
    `directory`/manifest.json, written last and atomically."""
    temporary = os.path.join(directory, f".{MANIFEST}.tmp")
    paths = sorted(os.path.join(root, name) for root, _, names in os.walk(directory) for name in names)
    files = {os.path.relpath(file, directory): {"bytes": os.path.getsize(file), "sha256": file_sha256(file)}
             for file in paths if file not in (temporary, os.path.join(directory, MANIFEST))}
    with open(temporary, "w") as f:
        json.dump({"algorithm": "sha256", "files": files}, f, indent=2)
        _sync(f)
    os.replace(temporary, os.path.join(directory, MANIFEST))


def file_sha256(path: str) -> str:
    """The hex SHA-256 of a file's bytes, read in blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 24), b""):
            digest.update(block)
    return digest.hexdigest()


def _compare(saved: dict, config, path: str) -> None:
    """Refuse a checkpoint of another trainer or structure; warn about other changed settings."""
    if saved["config_class"] != type(config).__name__:
        raise ValueError(f"checkpoint {path} was saved by a {saved['config_class']} run, not a "
                         f"{type(config).__name__} run")
    old, new = saved["config"], _plain(config)
    changed = {key: (old.get(key), new.get(key)) for key in old.keys() | new.keys()
               if key not in FREE and old.get(key) != new.get(key)}
    described = "; ".join(f"{key}: {a!r} -> {b!r}" for key, (a, b) in sorted(changed.items()))
    if any(key in STRUCTURE for key in changed):
        raise ValueError(f"checkpoint {path} was saved with other settings ({described}); resume with the "
                         "settings it was saved with")
    if changed:
        logger.warning("resuming %s with changed settings (%s): the run goes on, but not as the uninterrupted run "
                       "would have", path, described)


def _plain(config) -> dict:
    """The config as JSON values, without the hub token (it goes to checkpoints and trackers)."""
    plain = json.loads(json.dumps(asdict(config), default=str))
    if plain.get("hub_token") is not None:
        plain["hub_token"] = "<HUB_TOKEN>"
    return plain


def _state_of(obj):
    if isinstance(obj, torch.nn.Module):
        return trained_tensors(obj)
    if isinstance(obj, torch.Generator):
        return obj.get_state()
    return obj.state_dict()  # optimizers, the prompt stream, the rollout engine


def _restore(obj, state, where: str) -> None:
    if isinstance(obj, torch.nn.Module):
        expected = trained_tensors(obj)
        if expected.keys() != state.keys():
            extra, missing = sorted(state.keys() - expected.keys()), sorted(expected.keys() - state.keys())
            raise ValueError(f"{where} does not fit this run's model (unexpected {extra[:3]}, missing {missing[:3]});"
                             " resume with the model and LoRA settings it was saved with")
        obj.load_state_dict(state, strict=False)
    elif isinstance(obj, torch.Generator):
        obj.set_state(state)
    else:
        obj.load_state_dict(state)


def _remove(path: str) -> None:
    """Delete a checkpoint, first renaming it out of sight so that a kill mid-delete leaves no half checkpoint."""
    hidden = os.path.join(os.path.dirname(path), f".{os.path.basename(path)}.old")
    shutil.rmtree(hidden, ignore_errors=True)
    os.rename(path, hidden)
    shutil.rmtree(hidden)


def _sync(f) -> None:
    """Flush a file to disk, so that the rename that publishes the checkpoint never precedes its contents."""
    f.flush()
    os.fsync(f.fileno())
