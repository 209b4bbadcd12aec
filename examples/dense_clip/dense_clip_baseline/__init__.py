"""A dense-CLIP baseline benchmarked from outside ovseg-bench: the builder is `dense_clip_baseline.model:build`."""
