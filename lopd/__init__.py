"""lopd: offline on-policy distillation. The package, in pipeline order:

- models/: loading models and tokenizers, what produced a checkpoint (lineage) and the guards that check a
  student against its cache; engine.py builds vLLM engines on top; fingerprint.py keys every artifact.
- prompts.py, verifier.py, environment.py, contexts.py: what the stages read (prompt sets, rewards, tools,
  privileged contexts).
- Stage 1: rollout.py: a model generates; rollout_set.py: the rollouts on disk.
- Stage 2: score.py: a teacher scores them once; cache/: the score sets (format, writer, reader, maintenance).
- Stage 3: train/: training from the cache with a loss from losses/; drift and refresh re-roll stale rows during
  training; alignment is the teacher/outcome diagnostic and token filter.
- Stage 4: evaluate.py: accuracy under a verifier.
- pipeline/: `lopd run` over those stages (plan -> stages -> run); demo.py: `lopd demo`.
- cost/: device time per stage; storage.py: where artifacts live; limits.py, errors.py, faults.py: shared rules.
- cli.py: the command line over all of it; toy/: the bundled toy worlds; boxed.py: a boxed-answer verifier.

No two modules, and no two of these parts, import each other (tests/test_import_graph.py).
"""
