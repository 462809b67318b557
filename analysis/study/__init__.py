"""A whole study over a grid: its config and run folder, the sweep that drives localization, transplants and
evaluations (:mod:`.sweep`), the points it evaluates (:mod:`.points`), and where they run (locally,
raced, or on Ray: :mod:`.race`, :mod:`.cluster`)."""
