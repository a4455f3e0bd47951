"""Training of embedding models (``python -m latentembed train``).

:mod:`~latentembed.training.trainer` (:func:`train`) runs these steps, one module each:
:mod:`.config` (:class:`TrainConfig` and the checks that need no data), :mod:`.data` (JSONL
rows, bundled sets, evaluation sets, batches), :mod:`.plan` (the run's rows and stage plan),
:mod:`.resume` (the resolved settings, what a resume checks), :mod:`.model_setup` (model,
template, what trains), :mod:`.distributed` (process group, DDP), :mod:`.state` (the run's
objects and the loop's position), :mod:`.steps` (one step's loss: accumulation, GradCache; the
optimizer step), :mod:`.loop` (stages, schedule, evaluations and checkpoints when due),
:mod:`.checkpoint` (periodic checkpoints, what resuming reads), :mod:`.logs` (JSONL, TensorBoard,
progress, memory), :mod:`.held_out` (evaluation), :mod:`.output` (``--output DIR``); :mod:`.tiny`
is the demo's model and :mod:`.cli` the command line.
"""

from .config import TrainConfig
from .trainer import train

__all__ = ["TrainConfig", "train"]
