"""The main job: a character-level language model (model.py), its trainer (train.py),
sampler (sample.py) and the `lstmkit demo` that trains on the Python standard library (demo.py)."""
