"""The main job on a CPU: ``python -m latentembed demo`` (:mod:`.run`), its data (:mod:`.assets`,
:mod:`.wikipedia`) and its baseline (:mod:`.bm25`)."""

from .run import DemoOptions, run_demo

__all__ = ["DemoOptions", "run_demo"]
