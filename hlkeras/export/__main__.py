"""`python -m hlkeras.export REQUEST.json`: the TensorFlow-backend conversion
of a JAX or torch model (`hlkeras.export.convert`)."""

import sys

from hlkeras.export.convert import subprocess_main

if __name__ == "__main__":
    sys.exit(subprocess_main(sys.argv[1]))
