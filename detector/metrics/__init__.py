"""Scoring detections as the official tools do: the PASCAL VOC devkit's AP (`voc`), COCO
metrics through pycocotools (`coco`), and the devkit's and COCO's result files."""
