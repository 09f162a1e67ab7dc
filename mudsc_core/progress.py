"""The two progress callbacks of the core.

- :data:`Progress` ``(stage, fraction, message)``: what entry points (``merge``, ``merge_files``,
  ``merge_checkpoints``) report; stages are the job's (``collecting_activations``, ``matching``,
  ``merging``, ...). It may raise :class:`~mudsc_core.errors.MergeCanceled` to stop the merge.
- :data:`StageProgress` ``(fraction, message)``: what a step inside one stage reports to its caller.
"""

from __future__ import annotations

from collections.abc import Callable

Progress = Callable[[str, float, str], None]
StageProgress = Callable[[float, str], None]
