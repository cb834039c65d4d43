"""The shared core of training and serving: bundles, architectures, transforms, images, prediction, export.

Nothing here knows about Flask, gunicorn or training loops, and imports go one way (tests/test_layout.py):

    files           atomic_write, file_lock, file_sha256          (no torch)
    images          open_image, load_image, decode_image, IMAGE_SUFFIXES (no torch)
    preprocessing   Preprocessing: the eval preprocessing, typed  (no torch)
    pixels          the eval preprocessing itself: image -> uint8 (C, crop, crop) (no torch)
    bundle_format   the bundle format's name, version and BundleError (no torch)
    predictor       Predictor (abstract: preprocess -> infer -> postprocess), numpy (no torch)
    export_metadata what an exported file carries about itself (ExportMetadata) (no torch)
    onnx_runner     OnnxPredictor and the one reader of an ONNX file's metadata (no torch)
    simple_cnn      the small CNN architecture
    registry        architectures by name, their pretrained preprocessing
    bundle          Bundle: the .pth file format, read/save/load, model_from_bundle
    normalization   NormalizedInput: uint8 -> normalised floats, the network's first step
    transforms      torchvision transforms for training's float batches (eval and train)
    torch_predictor TorchPredictor: the torch backend, CPU or CUDA
    explain         GradCam: heat maps of where a network found a class (Captum), and their overlay
    export          python -m model.export: ONNX / TorchScript / int8, with a parity check
    default         python -m model.default: the offline ImageNet default bundle
"""
