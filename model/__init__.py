"""The shared core of training and serving: bundles, architectures, transforms, images, prediction, export.

Nothing here knows about Flask, gunicorn or training loops, and imports go one way (tests/test_layout.py):

    files           atomic_write, file_lock, file_sha256          (no torch)
    images          decode_image, IMAGE_SUFFIXES                  (no torch)
    preprocessing   Preprocessing: the eval preprocessing, typed  (no torch)
    simple_cnn      the small CNN architecture
    registry        architectures by name, their pretrained preprocessing
    bundle          Bundle: the .pth file format, read/save/load, model_from_bundle
    transforms      eval and train transforms built from a Preprocessing
    predictor       Predictor (abstract: preprocess -> infer -> postprocess), TorchPredictor
    export_metadata what an exported file carries about itself (ExportMetadata)
    onnx_runner     OnnxPredictor and the one reader of an ONNX file's metadata
    export          python -m model.export: ONNX / TorchScript / int8, with a parity check
    default         python -m model.default: the offline ImageNet default bundle
"""
