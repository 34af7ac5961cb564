"""Full garbage collections that walk only what a piece of work made."""

import contextlib
import gc


@contextlib.contextmanager
def collections_skip_older_objects():
    """Freezes the objects that exist when the block starts (`gc.freeze`)
    until it ends, unless the process froze some itself.

    The TFLite converter runs a full `gc.collect()` in every conversion (TF
    2.21's `lite.py`, to free the SavedModel it loaded), and a full
    collection walks every object of the process. In a long-lived one (a
    notebook, a search, a test worker holding ~2 GB of Keras and TF
    objects) that took seconds per conversion: 55 s of a 66-s CLI test in a
    test worker. Frozen objects are not walked; the ones the block makes
    are, and what they free, they free as before. The frozen ones go back
    to the oldest generation when the block ends and are collected as
    usual. (A process that froze objects itself, e.g. a server before
    forking, is left alone: `gc.unfreeze` would undo its freeze.)
    """
    if gc.get_freeze_count():
        yield
        return
    gc.freeze()
    try:
        yield
    finally:
        gc.unfreeze()
