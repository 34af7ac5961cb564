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
    objects) that took seconds per conversion (py-spy: `gc_collect_main`
    under the converter); with this, a TF test pass spends 148-150 s in
    collections instead of 329 s. Frozen objects are not walked; the ones
    the block makes are, and what they free, they free as before. The
    frozen ones go back to the oldest generation when the block ends and
    are collected as usual. (A process that froze objects itself, e.g. a server before
    forking, is left alone: `gc.unfreeze` would undo its freeze.)

    Keep the blocks short: garbage older than a block waits for the next
    collection after it. A whole search run frozen made that one
    collection larger (50 s in a test worker), so only conversions are.
    """
    if gc.get_freeze_count():
        yield
        return
    gc.freeze()
    try:
        yield
    finally:
        gc.unfreeze()
