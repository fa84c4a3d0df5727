"""A run directory, below the training loop: what train/, evals/ and hf/ all read and write.

directory.py   <workdir>/config.json: read (old spellings upgraded), write, the check before a
               rerun writes anything (`prepare`)
fields.py      where each field of a run's config comes from (fresh, init_from, resume)
checkpoint.py  Orbax checkpoints under <workdir>/checkpoints/
params.py      the parameters' abstract tree and their restore, in any layer structure
load.py        a run rebuilt for inference (`load_run`)
"""
