"""Where a study lives: the storage URL, opening it, and Optuna's heartbeat.

Any storage URL SQLAlchemy knows (``sqlite:///...``, ``postgresql://user:pw@host/db``,
``mysql://...``) opens an ``optuna.storages.RDBStorage``; ``journal:///path/file.log``
opens Optuna's journal storage on a file (a shared file system, no database server).

Every storage runs Optuna's heartbeat: a trial whose process stops beating for
``grace_period`` seconds (SIGKILL, lost node) is failed by the next worker that starts
a trial, and, for DoTS, ``RetryFailedTrialCallback`` enqueues its point again so a
live worker evaluates it. Optuna 5.0's JournalStorage has no heartbeat of its own
(optuna issue 6615); ``mergekit_rlvr.search.journal`` adds it until Optuna ships one.
"""

from __future__ import annotations

import inspect
import os
import time
import warnings

from mergekit_rlvr.errors import UserError

#: retries of a point whose worker died (a point that kills every worker stops there)
MAX_RETRY = 2


def storage_url(storage, out_dir: str) -> str:
    return storage or "sqlite:///" + os.path.abspath(os.path.join(out_dir, "study.db"))


def public_url(url: str) -> str:
    """The storage URL without its password, for messages and reports."""
    if url.startswith("journal:"):
        return url
    try:
        from sqlalchemy.engine import make_url

        return make_url(url).render_as_string(hide_password=True)
    except Exception:  # noqa: BLE001
        return url


def journal_path(url: str) -> str:
    """``journal:///abs/file.log`` -> /abs/file.log; ``journal://rel/file.log`` -> rel/file.log."""
    path = url[len("journal://"):]
    if not path:
        raise UserError(f"--storage {url}: expected journal:///path/to/file.log")
    return path


def heartbeat_kwargs(cls, interval: int, grace: int, retry: bool) -> dict:
    """Optuna's heartbeat arguments for ``cls`` (the callback's name changed in 4.9)."""
    from optuna.storages import RetryFailedTrialCallback

    kwargs = {"heartbeat_interval": interval, "grace_period": grace}
    if retry:
        names = inspect.signature(cls.__init__).parameters
        key = "heartbeat_stale_trial_callback" if "heartbeat_stale_trial_callback" in names \
            else "failed_trial_callback"
        kwargs[key] = RetryFailedTrialCallback(max_retry=MAX_RETRY)
    return kwargs


def _open_rdb(url: str, interval: int, grace: int, retry: bool):
    import optuna

    kwargs = {}
    if url.startswith("sqlite"):
        from mergekit_rlvr.search.sqlite import tune_sqlite

        kwargs = {"connect_args": {"timeout": 60}}
        tune_sqlite()
    beat = heartbeat_kwargs(optuna.storages.RDBStorage, interval, grace, retry)
    last = None
    for attempt in range(5):  # processes starting together race to create the tables
        try:
            return optuna.storages.RDBStorage(url, engine_kwargs=kwargs, **beat)
        except ImportError as error:
            raise UserError(f"--storage {public_url(url)}: no database driver for it ({error}); for PostgreSQL"
                            " install mergekit-rlvr[search] (psycopg2-binary)") from None
        except Exception as error:  # noqa: BLE001 - a bad URL or unreachable database is one line
            last = error
            if type(error).__name__ not in ("OperationalError", "IntegrityError"):
                break
            time.sleep(0.3 * (attempt + 1))
    raise UserError(f"--storage {public_url(url)}: cannot open it ({str(last).splitlines()[0]})")


def open_storage(url: str, heartbeat_interval: int = 10, grace_period: int = 30, retry: bool = True):
    """The Optuna storage behind ``url``, heartbeat on; ``retry``: a stale trial's
    point is enqueued again (RetryFailedTrialCallback)."""
    import optuna

    if "://" not in url:
        raise UserError(f"--storage {public_url(url)}: expected an Optuna storage URL such as"
                        " sqlite:///path/study.db, postgresql://user@host/db or journal:///path/study.log")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        warnings.simplefilter("ignore", FutureWarning)
        if url.startswith("journal:"):
            from mergekit_rlvr.search.journal import open_journal

            return open_journal(journal_path(url), heartbeat_interval, grace_period, retry)
        return _open_rdb(url, heartbeat_interval, grace_period, retry)
