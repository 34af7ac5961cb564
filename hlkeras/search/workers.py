"""A chief and N workers on this machine over KerasTuner's gRPC mode.

`run_chief_and_workers` starts `python -m hlkeras.search SETTINGS.json` as
the chief (KERASTUNER_TUNER_ID=chief) and as `worker0`, `worker1`, ... on
127.0.0.1, waits for them, and kills every process group it started on the
way out, whatever happens. On several machines, start the same search on
each with those variables set by hand (see the README).
"""

import json
import os
import signal
import socket
import subprocess
import sys
import time

from hlkeras import _files
from hlkeras.search import reports
from hlkeras.search.outcome import BEST_MODEL
from hlkeras.search.outcome import BEST_TFLITE
from hlkeras.search.outcome import SearchError
from hlkeras.search.outcome import SearchOutcome
from hlkeras.search.outcome import retrained_val_accuracy

SETTINGS_JSON = "search_settings.json"
LOG_DIR = "logs"
CHIEF_ERROR_FILE = "chief_error.txt"


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _prepare_dataset(settings):
    # Once, here, so the processes do not race to write it (and a bad
    # dataset fails before any process starts).
    from hlkeras import data

    try:
        data.load_for(settings)
    except data.DatasetError as error:
        raise SearchError(str(error)) from None


def run_chief_and_workers(settings, log=print):
    """Runs the search of `settings` (checked, with `directory` set) in a
    chief and `settings["workers"]` worker processes.

    Returns:
        The `SearchOutcome`, read back from the files the chief wrote.
    """
    _prepare_dataset(settings)
    directory = settings["directory"]
    log_dir = os.path.join(directory, LOG_DIR)
    os.makedirs(log_dir, exist_ok=True)
    if os.path.exists(error_path(directory)):
        os.remove(error_path(directory))  # an earlier run's
    settings_path = os.path.join(log_dir, SETTINGS_JSON)
    _files.atomic_write_json(settings_path, {**settings, "workers": 0})
    command = [sys.executable, "-m", "hlkeras.search", settings_path]
    env = {
        **os.environ,
        "KERASTUNER_ORACLE_IP": "127.0.0.1",
        "KERASTUNER_ORACLE_PORT": str(_free_port()),
    }
    log(
        f"hlkeras tune: chief + {settings['workers']} workers on "
        f"127.0.0.1:{env['KERASTUNER_ORACLE_PORT']}; worker logs in {log_dir}"
    )
    processes = []
    try:
        chief = _start(command, env, "chief", processes)
        workers = [
            _start(command, env, f"worker{i}", processes, log_path=_worker_log(log_dir, i))
            for i in range(settings["workers"])
        ]
        _wait_for_chief(chief, workers, log_dir)
        if chief.returncode != 0:
            return SearchOutcome(directory, error=_chief_error(directory, chief.returncode))
        for i, worker in enumerate(workers):
            if worker.wait(timeout=60) != 0:
                raise SearchError(f"worker{i} failed; see {_worker_log(log_dir, i)}")
    finally:
        for process in processes:
            if process.poll() is None:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()
    return read_outcome(directory)


def error_path(directory):
    """Where the chief writes why its search has no best model."""
    return os.path.join(directory, LOG_DIR, CHIEF_ERROR_FILE)


def _chief_error(directory, returncode):
    path = error_path(directory)
    if os.path.exists(path):
        with open(path) as f:
            return f.read().strip()
    return f"the chief exited with status {returncode}"


def _worker_log(log_dir, index):
    return os.path.join(log_dir, f"worker{index}.log")


def _start(command, env, tuner_id, processes, log_path=None):
    """Starts one process in its own process group (so it can be killed
    with its children) and appends it to `processes`."""
    output = open(log_path, "wb") if log_path else None
    try:
        process = subprocess.Popen(
            command,
            env={**env, "KERASTUNER_TUNER_ID": tuner_id},
            stdout=output,
            stderr=subprocess.STDOUT if output else None,
            start_new_session=True,
        )
    finally:
        if output:
            output.close()
    processes.append(process)
    return process


def _wait_for_chief(chief, workers, log_dir):
    while chief.poll() is None:
        crashed = [i for i, w in enumerate(workers) if w.poll() not in (None, 0)]
        if crashed:
            # The chief would wait forever for the crashed worker's trial.
            i = crashed[0]
            status = workers[i].returncode
            raise SearchError(
                f"worker{i} exited with status {status}; see {_worker_log(log_dir, i)}"
            )
        time.sleep(0.5)


def read_outcome(directory):
    """The `SearchOutcome` of a finished search, from its files."""
    outcome = SearchOutcome(
        directory, rows=reports.read_trials_csv(os.path.join(directory, reports.TRIALS_CSV))
    )
    best_trial = os.path.join(directory, reports.BEST_TRIAL_JSON)
    if not os.path.exists(best_trial):
        outcome.error = f"no trial completed; see {directory}/{reports.TRIALS_CSV}"
        return outcome
    with open(best_trial) as f:
        outcome.best_values = json.load(f)["hyperparameters"]
    with open(os.path.join(directory, reports.BEST_SPEC_JSON)) as f:
        outcome.best_spec = json.load(f)
    if os.path.exists(os.path.join(directory, BEST_MODEL)):
        outcome.best_path = os.path.join(directory, BEST_MODEL)
        outcome.best_val_accuracy = retrained_val_accuracy(directory)
    if os.path.exists(os.path.join(directory, BEST_TFLITE)):
        outcome.best_tflite = os.path.join(directory, BEST_TFLITE)
    return outcome
