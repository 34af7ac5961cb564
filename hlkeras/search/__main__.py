"""`python -m hlkeras.search SETTINGS.json`: one process (chief or worker)
of a search started by `hlkeras.search.workers.run_chief_and_workers`."""

import json
import os
import sys

from hlkeras import _files

# TensorFlow's C++ start-up logging drowns the search's own output.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


def main(settings_path):
    from hlkeras.search.run import run_search
    from hlkeras.search.workers import error_path

    with open(settings_path) as f:
        settings = json.load(f)
    outcome = run_search(log=lambda line: print(line, flush=True), **settings)
    if outcome.error and os.environ.get("KERASTUNER_TUNER_ID") == "chief":
        # The process that started the chief reports it as its own error.
        _files.atomic_write_text(error_path(settings["directory"]), outcome.error)
        return 1
    if outcome.error:
        print(
            f"hlkeras tune ({os.environ.get('KERASTUNER_TUNER_ID')}): error: {outcome.error}",
            file=sys.stderr,
        )
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
