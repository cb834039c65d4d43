"""LitServe and BentoML serving the project's own ONNX export beside the service: ``python -m bench.peers.run``.

Outside the test suite and the project's requirements: each peer runs from its own virtual environment
under bench/peers/.venvs/ (made on first use), with a plain Pillow + numpy handler (plain.py).
"""
