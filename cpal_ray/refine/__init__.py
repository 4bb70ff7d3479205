"""IRN-style affinity refinement (pure torch, no Ray): pixel pairs, affinity labels from seeds,
affinities from a boundary map, their loss, and the random walk that propagates CAMs."""
from cpal_ray.refine.affinity import (
    IRN_BETA,
    IRN_EPS,
    IRN_EXP_TIMES,
    IRN_FEATURE_STRIDE,
    IRN_RADIUS,
    IRN_SEM_SEG_BG_THRES,
    IRN_TRAIN_RADIUS,
    AffinityLabels,
    affinity_labels,
    affinity_loss,
    affinity_matrix,
    boundary_affinity,
    labels_from_walk,
    pair_indices,
    pair_offsets,
    pair_walk,
    path_points,
    propagate_cams,
    random_walk,
    transition_matrix,
)

__all__ = [
    "IRN_BETA", "IRN_EPS", "IRN_EXP_TIMES", "IRN_FEATURE_STRIDE", "IRN_RADIUS", "IRN_SEM_SEG_BG_THRES",
    "IRN_TRAIN_RADIUS", "AffinityLabels", "affinity_labels", "affinity_loss", "affinity_matrix", "boundary_affinity",
    "labels_from_walk", "pair_indices", "pair_offsets", "pair_walk", "path_points", "propagate_cams", "random_walk",
    "transition_matrix",
]
