"""Image similarity for the metric guard: works for same- and cross-modality pairs."""

from __future__ import annotations

import numpy as np

BINS = 32


def normalized_mutual_information(a: np.ndarray, b: np.ndarray, bins: int = BINS) -> float:
    """(H(A) + H(B)) / H(A, B): 1 for independent images, 2 for identical ones."""
    a = np.asarray(a, dtype=np.float64).ravel()
    b = np.asarray(b, dtype=np.float64).ravel()
    joint, _, _ = np.histogram2d(a, b, bins=bins)
    return nmi_of_histogram(joint)


def nmi_of_histogram(joint: np.ndarray) -> float:
    """Normalized mutual information of a joint histogram (counts of A's bins by B's)."""
    joint = np.asarray(joint, dtype=np.float64)
    total = joint.sum()
    if total == 0:
        return 1.0
    p = joint / total

    def entropy(q: np.ndarray) -> float:
        q = q[q > 0]
        return float(-(q * np.log(q)).sum())

    joint_entropy = entropy(p.ravel())
    if joint_entropy == 0:
        return 2.0
    return (entropy(p.sum(axis=0)) + entropy(p.sum(axis=1))) / joint_entropy
