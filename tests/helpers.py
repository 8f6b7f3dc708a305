"""Plain helpers shared by several test modules (fixtures are in conftest.py); imported as ``from helpers import ...``
(pytest puts this folder on sys.path)."""

import numpy as np

# Quality is irrelevant to the tests that use it: a short fit without augmentation or neighbour pairs (~2 s on the
# digits).
QUICK_FIT = dict(seed=0, verbose=False, pretrain_epochs=3, phase1_epochs=2, phase2_epochs=2, augment=False,
                 neighbors=0)


def tiny(path, seed=0):
    """Write three well-separated 5-d Gaussian blobs (60 rows, float32) to ``path`` (.npy); return ``path``."""
    rng = np.random.default_rng(seed)
    x = np.concatenate([rng.normal(m, 1.0, size=(20, 5)) for m in (-6, 0, 6)]).astype(np.float32)
    np.save(path, x)
    return path
