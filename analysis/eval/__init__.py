"""What a model gets right: tasks and their items (:mod:`.tasks`), the inference engine (:mod:`.engine`),
scoring a task (:mod:`.evaluate`), the statistics of a result (:mod:`.metrics`), and the
lm-evaluation-harness bridge (:mod:`.lmeval`)."""
