"""Training: `python -m train` trains a memzoo model on a synthetic memory task on one machine.

This is the first, single-device form of the training command; the sharded loop (mesh, orbax
checkpoints, tfds/grain pipelines, memory tasks) grows here under the training issue.
"""
