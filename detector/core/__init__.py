"""What detection and classification share: the conv trunks and their geometry, conv maps
once per image per scale and their cache, the window -> cells projection and the per-window
scale choice, spatial pyramid pooling, the fc head, the `WindowEmbedder` that joins them,
and the checked model file."""
