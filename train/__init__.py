"""Training: `python -m train` trains any memzoo model on a memory task, on one CPU or a mesh.

Layout: mesh.py (device mesh, the logical-axis rule table), trainer.py (optimizer, sharded init,
jitted train/eval steps), checkpoint.py (orbax: resume, SIGTERM, damaged checkpoints),
metrics.py (progress bar, TensorBoard, FLOP/s), input.py (batches from train.data), loop.py (a
run), data/ (tasks, tfds builders, grain loaders), __main__.py (the command line).
"""
