"""SPP-net object detection: conv features once per image, spatial pyramid pooling,
fine-tuned fc layers, per-class linear SVMs, box regression."""
__version__ = "0.1.0"
