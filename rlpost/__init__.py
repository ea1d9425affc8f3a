"""rlpost: asynchronous RL post-training for LLMs (partial rollouts over Redis, DeepSpeed MoE).

Installed, the top-level folders ``rollout/``, ``trainer/``, ``envs/`` and ``configs/`` become
``rlpost.rollout`` etc. (setuptools package-dir mapping). Run from a source tree that is *not*
installed, e.g. the copy ``ray job submit --working-dir .`` uploads, the same names resolve to
that tree's sibling folders, so a job never mixes its own files with another checkout's.
"""

import os as _os

__version__ = "0.1.0"

_root = _os.path.dirname(_os.path.dirname(_os.path.abspath(__file__)))
if _os.path.isfile(_os.path.join(_root, "pyproject.toml")) and _os.path.isdir(_os.path.join(_root, "trainer")):
    __path__.append(_root)  # noqa: F821  (module __path__ of this package)
