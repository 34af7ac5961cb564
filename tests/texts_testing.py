"""Text data the tests generate: a CSV of tickets whose class one keyword
decides (`hlkeras train --text-column` learns it in a few epochs)."""

import csv

import numpy as np

KEYWORDS = {
    "billing": ["invoice", "refund"],
    "tech": ["crash", "error"],
    "sales": ["price", "demo"],
}


def write_keyword_csv(path, rows, seed=0):
    """Tickets of filler words whose class is decided by one keyword; text i
    starts with the words `a<tens digit> b<units digit>` of i, so a test can
    find its row from in-vocabulary words."""
    rng = np.random.default_rng(seed)
    filler = [f"w{i}" for i in range(60)]
    labels = []
    with open(path, "w", newline="") as file:
        writer = csv.writer(file)
        writer.writerow(["id", "text", "label"])
        for i in range(rows):
            label = list(KEYWORDS)[i % 3]
            words = [f"a{i // 10 % 10}", f"b{i % 10}"] + list(
                rng.choice(filler, rng.integers(3, 12))
            )
            words.insert(int(rng.integers(2, len(words) + 1)), str(rng.choice(KEYWORDS[label])))
            writer.writerow([i, " ".join(words) + ".", label])
            labels.append(label)
    return labels
