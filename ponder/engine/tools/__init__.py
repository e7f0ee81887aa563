"""The engine's tools, apart from its runtime: the deterministic tiny-model factory (`tiny/`) and
the sizing calculator (`model_size`, `parallel_size`, over `checkpoint_tensors`). Importing one
loads no torch; making a tiny model's weights does, inside the call."""
