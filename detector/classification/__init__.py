"""Image classification with the same SPP layer (paper section 3): `SPPClassifier` and
`classify()`, test-time views on feature maps, crops through the trunk, training on cached
conv maps, and top-1/top-5 evaluation over an image-folder split."""
