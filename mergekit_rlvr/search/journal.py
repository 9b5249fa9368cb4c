"""Optuna's journal storage on a file, with Optuna's heartbeat.

Optuna 5.0's ``JournalStorage`` does not implement ``BaseHeartbeat`` (optuna issue
6615), so a worker killed mid-trial would leave its trial RUNNING forever. This
subclass adds the four heartbeat methods and nothing else: each beat is one journal
entry (a trial system attribute holding the beating host's wall clock), a RUNNING
trial whose last beat is older than ``grace_period`` is stale, and Optuna's own
machinery does the rest (the heartbeat thread around each trial, ``fail_stale_trials``
before each trial, ``RetryFailedTrialCallback``). Workers' clocks must agree to within
a fraction of the grace period (NTP). Where the installed Optuna's JournalStorage has
its own heartbeat, that one is used instead.

This is the one module that touches ``optuna.storages._heartbeat`` (the base class
Optuna's own storages use for the heartbeat, and the heartbeat thread that
``study.optimize`` runs around each trial, run here around an ask/tell trial).
"""

from __future__ import annotations

import os
import time

from mergekit_rlvr.errors import UserError

HEARTBEAT_ATTR = "mergekit_rlvr:heartbeat"


def _heartbeat_class():
    import optuna
    from optuna.storages._heartbeat import BaseHeartbeat
    from optuna.trial import TrialState

    class HeartbeatJournalStorage(optuna.storages.JournalStorage, BaseHeartbeat):
        def __init__(self, backend, heartbeat_interval: int, grace_period: int, callback=None):
            super().__init__(backend)
            self._beat_interval = int(heartbeat_interval)
            self._beat_grace = int(grace_period)
            self._beat_callback = callback

        def record_heartbeat(self, trial_id: int) -> None:
            try:
                self.set_trial_system_attr(trial_id, HEARTBEAT_ATTR, time.time())
            except optuna.exceptions.UpdateFinishedTrialError:
                pass  # another worker failed it as stale meanwhile: nothing left to beat

        def _get_stale_trial_ids(self, study_id: int) -> list:
            now = time.time()
            running = self.get_all_trials(study_id, deepcopy=False, states=(TrialState.RUNNING,))
            return [t._trial_id for t in running
                    if HEARTBEAT_ATTR in t.system_attrs and now - t.system_attrs[HEARTBEAT_ATTR] > self._beat_grace]

        def get_heartbeat_interval(self):
            return self._beat_interval

        def get_heartbeat_stale_trial_callback(self):
            return self._beat_callback

        def get_failed_trial_callback(self):  # the name before Optuna 4.9
            return self._beat_callback

    return HeartbeatJournalStorage


def trial_heartbeat(study, trial):
    """The heartbeat thread ``study.optimize`` runs around each trial (a context
    manager; nothing where the storage has no heartbeat), for an ask/tell trial."""
    from optuna.storages._heartbeat import get_heartbeat_thread

    return get_heartbeat_thread(trial._trial_id, study._storage)


def open_journal(path: str, heartbeat_interval: int, grace_period: int, retry: bool):
    import optuna
    from optuna.storages._heartbeat import BaseHeartbeat
    from optuna.storages.journal import JournalFileBackend

    from mergekit_rlvr.search.storage import heartbeat_kwargs

    directory = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(directory):
        raise UserError(f"--storage journal://{path}: directory {directory} does not exist")
    try:
        backend = JournalFileBackend(path)
    except OSError as error:
        raise UserError(f"--storage journal://{path}: cannot open it ({error})") from None
    if issubclass(optuna.storages.JournalStorage, BaseHeartbeat):  # a future Optuna's own heartbeat
        kwargs = heartbeat_kwargs(optuna.storages.JournalStorage, heartbeat_interval, grace_period, retry)
        return optuna.storages.JournalStorage(backend, **kwargs)
    kwargs = heartbeat_kwargs(optuna.storages.RDBStorage, heartbeat_interval, grace_period, retry)
    callback = next((v for k, v in kwargs.items() if k.endswith("callback")), None)
    return _heartbeat_class()(backend, heartbeat_interval, grace_period, callback)
