"""The `hlkeras` console script, with TensorFlow's native log lines filtered.

TensorFlow and absl write some lines (oneDNN notices, CPU-feature hints, the
LiteRT delegate notice, the int8 calibrator's settings) from C++ straight to
file descriptor 2, some of them while TensorFlow is imported and before
`TF_CPP_MIN_LOG_LEVEL` applies. This launcher starts before `import hlkeras`
(which imports Keras and, on the TensorFlow backend, TensorFlow), points
descriptor 2 at a pipe, and forwards every line except those; Python's
warnings, errors and tracebacks pass through. `hlkeras ... --verbose` turns
the filter off.

It is a package of its own because importing anything inside `hlkeras`
imports TensorFlow first.
"""

import os
import re
import sys
import threading

NATIVE_LOG_LINE = re.compile(
    r"^(?:[IWEF]\d{4} \d\d:\d\d:\d\d"  # absl: I0000 00:00:1795... file.cc:123]
    r"|WARNING: All log messages before absl::InitializeLog\(\)"
    r"|INFO: Created TensorFlow Lite"
    r"|fully_quantize: \d+, inference_type: "  # the TFLite calibrator, per int8 conversion
    r"|To enable the following instructions: .* rebuild TensorFlow"
    r"|WARNING: Logging before InitGoogleLogging\(\))"
)


class NativeLogFilter:
    """Forwards the lines written to file descriptor 2, except native TF logs."""

    def start(self):
        sys.stderr.flush()
        self.original = os.dup(2)
        read_end, write_end = os.pipe()
        os.dup2(write_end, 2)
        os.close(write_end)
        self.thread = threading.Thread(target=self._forward, args=(read_end,), daemon=True)
        self.thread.start()

    def _forward(self, read_end):
        with os.fdopen(read_end, "rb") as pipe:
            for line in pipe:
                if not NATIVE_LOG_LINE.match(line.decode("utf-8", "replace")):
                    os.write(self.original, line)

    def stop(self):
        sys.stderr.flush()
        os.dup2(self.original, 2)  # the pipe's last writer closes: the reader ends
        self.thread.join(timeout=5)
        os.close(self.original)


def main():
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    if "--verbose" in sys.argv[1:]:
        os.environ["TF_CPP_MIN_LOG_LEVEL"] = "0"
        from hlkeras.cli import main as cli_main

        return cli_main()
    native_logs = NativeLogFilter()
    native_logs.start()
    try:
        from hlkeras.cli import main as cli_main

        return cli_main()
    finally:
        native_logs.stop()
