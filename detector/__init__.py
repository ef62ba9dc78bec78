"""SPP-net object detection: conv features once per image, spatial pyramid pooling,
fine-tuned fc layers, per-class linear SVMs, box regression.

    import detector
    model = detector.load("data/runs/demo/model.safetensors")
    result = model.detect("image.jpg")   # dict(boxes, scores, labels, label_names)

and image classification with the same SPP layer:

    clf = detector.load_classifier("data/runs/flowers17/model.safetensors")
    clf.classify("image.jpg", views="full")   # dict(scores, label, label_name, top5)
"""
__version__ = "0.1.0"


def load(path, device: str = "auto"):
    """Load a trained detector (see detector.detection.detector)."""
    from detector.detection.detector import load as _load

    return _load(path, device)


def detect(image, model, **kwargs):
    """Detect objects in `image` with `model` (an SPPDetector or a model file path)."""
    from detector.detection.detector import detect as _detect

    return _detect(image, model, **kwargs)


def load_classifier(path, device: str = "auto"):
    """Load a trained SPP-net classifier (see detector.classification.classifier)."""
    from detector.classification.classifier import load_classifier as _load

    return _load(path, device)
