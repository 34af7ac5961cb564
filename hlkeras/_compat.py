"""Every use of a private Keras, KerasTuner or LiteRT API, each behind one function.

Upstream can change a private name in any release. Keeping each use here,
with a docstring saying what the public API lacks and a test in
`tests/test_compat.py` that fails loudly when upstream changes it, means a
Keras or LiteRT upgrade breaks one known place instead of silently breaking
a feature.
"""

import os
import time


def sublayers(layer, include_self=False, recursive=True):
    """Every layer nested in `layer`, depth-first, in tracking order (only
    its direct sublayers when not `recursive`).

    Keras 3 has no public recursive sublayer walk: `Model.layers` lists only
    the top level, and a `TransformerBlock`'s FFN or a nested model's layers
    are below it. Keras itself (`Model.metrics`, `Model.layers`) and
    KerasHub use `Layer._flatten_layers` for this.
    """
    return list(layer._flatten_layers(include_self=include_self, recursive=recursive))


def get_keras_mask(tensor):
    """The Keras mask attached to `tensor` (or None).

    `keras.layers.MultiHeadAttention.call` reads and clears its inputs' masks
    with these private helpers; hlkeras' subclass does the same so that it
    handles masks exactly as Keras does. There is no public equivalent.
    """
    from keras.src import backend

    return backend.get_keras_mask(tensor)


def set_keras_mask(tensor, mask):
    """Attaches `mask` (None clears it) to `tensor`; see `get_keras_mask`."""
    from keras.src import backend

    backend.set_keras_mask(tensor, mask)


def lora_base_kernel(layer):
    """The frozen kernel variable of a Keras `Dense` / `EinsumDense` with LoRA
    enabled. Its public `kernel` is then the merged tensor `W + scale * A @ B`,
    not a variable; Keras' own tests and saving code read `_kernel`.
    """
    return layer._kernel


def is_graph_model(model):
    """Whether `model` is a functional or Sequential model (it has an op graph
    that `keras.models.clone_model` can rebuild); there is no public flag.
    """
    import keras

    return isinstance(model, keras.Sequential) or hasattr(model, "_operations")


def tflite_op_details(interpreter):
    """The `{"op_name": ..., ...}` dicts of every op in a LiteRT interpreter.

    `ai_edge_litert.interpreter.Interpreter` has no public op listing; its
    `_get_ops_details` is what TensorFlow's own TFLite tooling uses.
    """
    return interpreter._get_ops_details()


# --- KerasTuner ----------------------------------------------------------------
# KerasTuner 1.4 exports its tuners and oracles but not its distributed-mode
# helpers, its metric bookkeeping or any hook into how it writes state files.


def kerastuner_role():
    """`"chief"`, `"worker"`, or None when the search is not distributed.

    KerasTuner reads the role from `KERASTUNER_TUNER_ID` /
    `KERASTUNER_ORACLE_IP` in `keras_tuner.src.distribute.utils`, which it
    does not export.
    """
    from keras_tuner.src.distribute import utils

    if not utils.has_chief_oracle():
        return None
    return "chief" if utils.is_chief_oracle() else "worker"


def trial_metrics(histories, objective):
    """The `{metric: value}` dict KerasTuner records for a trial whose
    executions returned `histories` (the best epoch per the objective).

    Returning this dict from `Tuner.run_trial` is the public way to report
    extra metrics; building it is `tuner_utils.convert_to_metrics_dict`,
    which is not exported.
    """
    from keras_tuner.src.engine import tuner_utils

    return dict(tuner_utils.convert_to_metrics_dict(histories, objective))


def save_tuner_state_with(tuner, save_json):
    """Makes `tuner` write its state files (its own `tuner0.json`, and, with
    a local oracle, `oracle.json` and every `trial_*/trial.json`) through
    `save_json(path, state)`, on these objects only.

    KerasTuner writes them in place through `keras_tuner.src.utils.save_json`
    and offers no hook; patching that function would change every tuner in
    the process. This replaces the `save` methods of these instances, using
    the private file-name helpers KerasTuner's own `save` uses.
    """
    oracle = tuner.oracle

    def save_tuner():
        if not tuner._is_worker():
            oracle.save()
        save_json(tuner._get_tuner_fname(), tuner.get_state())

    tuner.save = save_tuner
    if not tuner._is_worker():
        oracle.save = lambda: save_json(oracle._get_oracle_fname(), oracle.get_state())
        oracle._save_trial = lambda trial: save_json(
            os.path.join(oracle._get_trial_dir(trial.trial_id), "trial.json"), trial.get_state()
        )


def record_only_running_trials_as_ongoing(oracle):
    """Makes `oracle.json` list a trial as ongoing only while it runs.

    `Oracle.end_trial` saves its state before it drops the finished trial
    from `ongoing_trials`, and a reload sends every ongoing trial to be run
    again. A kill right after that save (or a chief, which saves nothing
    more) would re-run a completed trial on resume. There is no public hook
    between the two, so this wraps the instance's `get_state`.
    """
    get_state = oracle.get_state

    def get_state_of_running_trials():
        state = get_state()
        state["ongoing_trials"] = {
            tuner_id: trial_id
            for tuner_id, trial_id in state["ongoing_trials"].items()
            if oracle.trials[trial_id].status == "RUNNING"
        }
        return state

    oracle.get_state = get_state_of_running_trials


def retry_orphaned_running_trials(oracle):
    """Queues for a re-run every trial a reloaded oracle holds as RUNNING but
    will not run again.

    `Oracle.create_trial` writes the new trial's `trial.json` before it saves
    `oracle.json`. `Oracle.reload` loads every trial file but retries only the
    ongoing trials `oracle.json` lists, so a kill between the two writes
    leaves a RUNNING trial that is never run, and the search ends with it
    unfinished. The retry queue is private; there is no public hook.
    """
    queued = set(oracle._retry_queue)
    for trial_id, trial in oracle.trials.items():
        if trial.status == "RUNNING" and trial_id not in queued:
            oracle._retry_queue.append(trial_id)


def serve_oracle(oracle, poll_seconds=0.2):
    """Runs the chief: serves `oracle` over KerasTuner's gRPC service on
    `$KERASTUNER_ORACLE_IP:$KERASTUNER_ORACLE_PORT` until the oracle stopped
    handing out trials and no worker is running one.

    KerasTuner's own `oracle_chief.start_server` does the same with 20 s
    polls, which would add up to 20 s to every distributed search; its
    servicer, stop condition and protos are not exported.
    """
    from concurrent import futures

    import grpc
    from keras_tuner.src import protos
    from keras_tuner.src.distribute import oracle_chief

    address = f"{os.environ['KERASTUNER_ORACLE_IP']}:{os.environ['KERASTUNER_ORACLE_PORT']}"
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=1))
    servicer = oracle_chief.OracleServicer(oracle)
    protos.get_service_grpc().add_OracleServicer_to_server(servicer, server)
    if not server.add_insecure_port(address):
        raise RuntimeError(f"The chief cannot listen on {address}.")
    server.start()
    try:
        while not (servicer.stop_triggered and oracle_chief.exit_chief(oracle)):
            time.sleep(poll_seconds)
    finally:
        server.stop(grace=1.0)
        oracle.save()


class TunerOverrides:
    """A tuner mixin overriding two private `keras_tuner.Tuner` methods.

    The tuner's hypermodel must have `declare_hyperparameters(hp)`.
    """

    def _populate_initial_space(self):
        # The space is flat (no conditional scopes), so declaring it is
        # enough. KerasTuner's default also builds a model from the default
        # values, and would abort the whole search if that one combination
        # is impossible, instead of failing just that trial.
        hp = self.oracle.get_space()
        self.hypermodel.declare_hyperparameters(hp)
        self.oracle.update_space(hp)

    def _configure_tensorboard_dir(self, callbacks, trial, execution=0):
        # KerasTuner 1.4.8 imports `tensorboard` on the TF backend for every
        # trial, TensorBoard callback or not; tensorflow-cpu 2.21 does not
        # install it, so every trial would fail with ModuleNotFoundError.
        if any(type(c).__name__ == "TensorBoard" for c in callbacks):
            super()._configure_tensorboard_dir(callbacks, trial, execution)
