"""Runs the `hlkeras` command line and SIGKILLs itself at a chosen training
batch: `python tests/kill_at_batch.py FIT EPOCH BATCH -- ARGS...` kills the
process at batch BATCH of epoch EPOCH of its FIT-th `Model.fit` call (1 is
the first).

The kill -9 tests use it instead of a parent that watches files and times
its kill: where the kill lands no longer depends on how busy the machine is,
so those tests need not run alone.
"""

import os
import signal
import sys

import keras


class KillAtBatch(keras.callbacks.Callback):
    def __init__(self, epoch, batch):
        super().__init__()
        self.kill_epoch, self.kill_batch, self.epoch = epoch, batch, None

    def on_epoch_begin(self, epoch, logs=None):
        self.epoch = epoch

    def on_train_batch_end(self, batch, logs=None):
        if (self.epoch, batch) == (self.kill_epoch, self.kill_batch):
            os.kill(os.getpid(), signal.SIGKILL)


def main(argv):
    fit_call, epoch, batch = (int(value) for value in argv[:3])
    assert argv[3] == "--", argv
    calls = []
    keras_fit = keras.Model.fit

    def fit(model, *args, callbacks=None, **kwargs):
        calls.append(None)
        if len(calls) == fit_call:
            # Last, so the run's own callbacks (its backup) see every epoch end first.
            callbacks = list(callbacks or []) + [KillAtBatch(epoch, batch)]
        return keras_fit(model, *args, callbacks=callbacks, **kwargs)

    keras.Model.fit = fit
    from hlkeras import cli

    return cli.main(argv[4:])


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
