"""Where a task lives in a model: probe sets and metrics (:mod:`.probe`), activation shifts
(:mod:`.shifts`), attribution and activation patching (:mod:`.patching`), weight-space scores
(:mod:`.weightspace`), and the rankings and plans made from them (:mod:`.localize`, :mod:`.select`)."""
