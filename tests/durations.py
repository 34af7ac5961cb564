"""Seconds per test file and backend from JUnit files, for the
heaviest-first order of `conftest.py`:

    python tests/durations.py tests/durations.json \\
        tensorflow=test-reports/tensorflow.xml jax=test-reports/jax.xml \\
        torch=test-reports/torch.xml
"""

import collections
import json
import sys
import xml.etree.ElementTree as ET


def file_seconds(junit_path):
    """`{tests/...py: seconds}` summed over the file's test cases."""
    seconds = collections.Counter()
    for case in ET.parse(junit_path).getroot().iter("testcase"):
        seconds[_test_file(case.get("classname"))] += float(case.get("time", 0))
    return {name: round(total, 1) for name, total in seconds.most_common()}


def _test_file(classname):
    """`tests.layers.test_x.TestCase` -> `tests/layers/test_x.py`."""
    parts = classname.split(".")
    while parts[-1][:1].isupper():  # a test class inside the module
        parts.pop()
    return "/".join(parts) + ".py"


def main(out_path, *backend_reports):
    durations = dict(report.split("=", 1) for report in backend_reports)
    durations = {backend: file_seconds(path) for backend, path in durations.items()}
    with open(out_path, "w") as file:
        json.dump(durations, file, indent=1, sort_keys=True)
        file.write("\n")


if __name__ == "__main__":
    main(*sys.argv[1:])
