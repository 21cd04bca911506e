"""`lopd run PIPELINE`: execute a declarative pipeline (TOML or YAML) of rollout, score, train and eval stages.

A pipeline names its models and prompt sets, then lists stages; a stage refers to models, prompt sets and
earlier stages by name. Every stage gets a key: the hash of its own spec and the keys of the stages it
reads, so the key changes exactly when its inputs change. Finished stages are recorded in
`<root>/runs/<pipeline>/seed<N>/state.json`; a rerun (or a run that was interrupted) skips every stage
whose key is recorded with an existing output, and `--dry-run` prints that plan without running anything.
Rollout and score stages are content-addressed on top of that: a stage that must run but whose artifact
already exists costs nothing (a cache hit in the ledger).

vLLM engine options come from an `[engine]` table (every engine), a model's own `engine` table (a [models]
entry written `{ path = "...", engine = { ... } }`) and a stage's `engine` table, later ones winning; see
docs/engine.md. Only the options that change numbers (lopd.engine.NUMERIC_ENGINE_ARGS) enter stage keys, so
moving a teacher to more GPUs does not redo finished stages.
"""
