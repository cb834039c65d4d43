"""The shared core of training and serving: bundles, architectures, transforms, images, prediction.

Nothing here knows about Flask or training loops.
"""
