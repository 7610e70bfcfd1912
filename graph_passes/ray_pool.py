"""Rounding a block's sites as Ray tasks (``executor="ray"``, extra ``[ray]``).

The pool looks like the local one to the pipeline: ``submit(fn, *args)`` returns a
``concurrent.futures.Future``, so ``in_order``/``result_of`` hand results back in site order and the
output is the same bytes. Each task gets the method's config, the weight and its statistics through Ray's
object store (a statistics record shared by sibling sites, q/k/v say, is stored once), and asks for one GPU
where the cluster has GPUs, else one CPU. An error the method raises comes back as itself; a task that
Ray loses (its worker died, its node went away) comes back as :class:`RayTaskLost`.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import os
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from typing import Any

import numpy as np

from .errors import InvalidOptionError
from .parallel import _SINGLE_THREAD_ENV
from .rounding.base import SiteStats

__all__ = ["RayPool", "RayTaskLost", "ray_pool"]

_INSTALL = 'executor="ray" needs Ray: pip install "optimum-adaround[ray]"'
_SHARED_REFS = 4
"""Statistics records kept in the object store for reuse: sibling sites are submitted one after another."""
_LOOPBACK = "127.0.0.1"
# Ray advertises (and its servers bind) the host's outward address on Linux unless this flag, read by
# every Ray process at import, marks the node as single-machine: then everything listens on loopback only.
_SINGLE_MACHINE_ENV = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"


class RayTaskLost(Exception):
    """Ray could not finish a rounding task for a reason outside the method (a worker or node died)."""


def _own_copy(value: Any) -> Any:
    """``value`` with writable arrays: the object store hands a task read-only views of its buffers, where a
    local worker process gets arrays of its own."""
    if isinstance(value, np.ndarray) and not value.flags.writeable:
        return value.copy()
    if isinstance(value, SiteStats):
        extra = {k: _own_copy(v) for k, v in value.extra.items()}
        return dataclasses.replace(value, hessian=_own_copy(value.hessian), extra=extra)
    return value


def _call(fn: Callable[..., Any], *args: Any) -> Any:
    """What a task runs: ``fn`` on copies it may write to, as in a local worker."""
    return fn(*(_own_copy(a) for a in args))


def _import_ray() -> Any:
    try:
        import ray
    except ImportError as e:  # also when ``sys.modules["ray"]`` is None
        raise InvalidOptionError(_INSTALL) from e
    return ray


class RayPool:
    """Submits functions as Ray tasks; ``workers`` is how many the pipeline keeps running at once."""

    def __init__(self, ray: Any, workers: int) -> None:
        self.ray, self.workers = ray, workers
        gpus = ray.cluster_resources().get("GPU", 0) > 0
        self._options = {
            "num_cpus": 1,
            "num_gpus": 1 if gpus else 0,
            "max_retries": 0,  # a crash is reported, like a dead local worker, not run again
            "runtime_env": {"env_vars": dict.fromkeys(_SINGLE_THREAD_ENV, "1")},
        }
        self._call = ray.remote(_call)
        self._shared: collections.OrderedDict[int, tuple[SiteStats, Any]] = collections.OrderedDict()
        self._running: set[Any] = set()

    def submit(self, fn: Callable[..., Any], *args: Any) -> Future:
        """Run ``fn(*args)`` as a Ray task; the future holds its result or the method's own exception."""
        task = self._call.options(name=getattr(fn, "__name__", "task"), **self._options)
        ref = task.remote(fn, *(self._stored(a) if isinstance(a, SiteStats) else a for a in args))
        self._running.add(ref)
        out: Future = Future()
        ref.future().add_done_callback(lambda done: self._settle(ref, done, out))
        return out

    def _stored(self, stats: SiteStats) -> Any:
        """The object-store ref of ``stats``, put once for all the sites that share it (the record is kept
        alongside, so its id cannot be reused while cached)."""
        key = id(stats)
        if key not in self._shared:
            self._shared[key] = (stats, self.ray.put(stats))
            while len(self._shared) > _SHARED_REFS:
                self._shared.popitem(last=False)
        return self._shared[key][1]

    def _settle(self, ref: Any, done: Future, out: Future) -> None:
        self._running.discard(ref)
        errors = self.ray.exceptions
        try:
            out.set_result(done.result())
        except errors.RayTaskError as e:  # the method raised: hand back its own exception
            cause = getattr(e, "cause", None)
            if isinstance(cause, Exception) and not isinstance(cause, errors.RayError):
                cause.__cause__ = e  # keeps the worker's traceback (in Ray's error) for a bug report
                out.set_exception(cause)
            else:
                out.set_exception(e)
        except errors.RayError as e:
            out.set_exception(RayTaskLost(_one_line(e)))
        except BaseException as e:
            out.set_exception(e)

    def cancel_running(self) -> None:
        """Cancel the tasks still running (after an error, on a cluster that outlives this run)."""
        for ref in list(self._running):
            with contextlib.suppress(Exception):
                self.ray.cancel(ref)


def _one_line(e: BaseException) -> str:
    reason = (str(e).strip().splitlines() or [""])[0]
    return f"{type(e).__name__}: {reason}".rstrip(": ")


@contextlib.contextmanager
def _single_machine(ray: Any) -> Iterator[None]:
    """Make a local start advertise and listen on loopback only: Ray's processes started now read the
    flag from the environment, this one read it at import."""
    constants: Any = getattr(getattr(ray, "_private", None), "ray_constants", None)
    saved_env = os.environ.get(_SINGLE_MACHINE_ENV)
    saved_flag = getattr(constants, "ENABLE_RAY_CLUSTER", None)
    os.environ[_SINGLE_MACHINE_ENV] = "0"
    if saved_flag is not None:
        constants.ENABLE_RAY_CLUSTER = False
    try:
        yield
    finally:
        if saved_env is None:
            os.environ.pop(_SINGLE_MACHINE_ENV, None)
        else:
            os.environ[_SINGLE_MACHINE_ENV] = saved_env
        if saved_flag is not None:
            constants.ENABLE_RAY_CLUSTER = saved_flag


def _connect(ray: Any, address: str | None) -> bool:
    """Join ``address`` or start a quiet loopback-only local instance; False when this process is already
    connected (that connection is used as it is and left open)."""
    if ray.is_initialized():
        return False
    quiet = {"include_dashboard": False, "configure_logging": False}
    if address is not None:
        try:
            ray.init(address=address, **quiet)
        except (ConnectionError, TimeoutError, RuntimeError, ray.exceptions.RayError) as e:
            raise InvalidOptionError(
                f"ray_address={address!r}: could not join a Ray cluster there ({_one_line(e)}); give its "
                "head's host:port, or leave ray_address out for a local instance"
            ) from e
        return True
    with _single_machine(ray):
        ray.init(address="local", _node_ip_address=_LOOPBACK, **quiet)
    return True


def _cluster_workers(ray: Any) -> int:
    """One task per GPU of the cluster, else one per CPU."""
    resources = ray.cluster_resources()
    return max(1, int(resources.get("GPU", 0)) or int(resources.get("CPU", 1)))


@contextlib.contextmanager
def ray_pool(workers: int | None, address: str | None = None) -> Iterator[RayPool]:
    """A :class:`RayPool` on the cluster at ``address`` (None: a local instance on 127.0.0.1, shut down on
    exit), running ``workers`` tasks at once (None: one per GPU of the cluster, else one per CPU).

    A cluster that was joined is only disconnected from on exit; a connection this process already had is
    used and left open.
    """
    ray = _import_ray()
    connected = _connect(ray, address)
    try:
        pool = RayPool(ray, workers if workers is not None else _cluster_workers(ray))
        try:
            yield pool
        finally:
            pool.cancel_running()
    finally:
        if connected:
            ray.shutdown()
