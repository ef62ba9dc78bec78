"""Region proposals: selective search, its on-disk cache, published proposal files, recall.

    boxes = selective_search(rgb_image)                       # search.py
    props = compute_proposals(records, cache_dir, cfg.proposals)  # store.py: parallel, cached
    props = load_proposals("voc_2007_test.mat", image_ids)    # files.py: R-CNN .mat or our .npz
    result = proposal_recall(props_list, gt_boxes_list)       # recall.py

Nothing here imports torch at module level, so the spawned selective-search
workers stay small.
"""
from detector.proposals.files import (dataset_proposals, load_proposals, load_rcnn_mat, read_proposals_npz,
                                      write_proposals_npz)
from detector.proposals.recall import (AR_IOUS, TOP_NS, curve_ns, format_recall, plot_recall, proposal_recall,
                                       recall_to_json)
from detector.proposals.search import ALGO_VERSION, MODES, search_options, selective_search
from detector.proposals.store import ProposalSet, ProposalStore, compute_proposals, proposals_for, sharded_proposals

__all__ = ["selective_search", "search_options", "MODES", "ALGO_VERSION", "compute_proposals", "sharded_proposals",
           "ProposalStore", "ProposalSet", "proposals_for", "dataset_proposals", "load_proposals", "load_rcnn_mat",
           "read_proposals_npz",
           "write_proposals_npz", "proposal_recall", "format_recall", "recall_to_json", "plot_recall", "curve_ns",
           "AR_IOUS", "TOP_NS"]
