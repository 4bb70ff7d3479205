"""The CPAL equations (pure torch/numpy, no Ray). Each function's docstring names its equation."""
from cpal_ray.cpal.aware import (context_valid_mask, feature_alignment, neighbour_weights, positiveness_logits,
                                 prototype_aware_cam, select_neighbours)
from cpal_ray.cpal.bank import Context, PrototypeBank
from cpal_ray.cpal.cams import (background_map, centered_embedding, classification_loss, instance_prototypes,
                                normalized_cams, with_background)
from cpal_ray.cpal.kmeans import faiss_device, kmeans, kmeans_inertia
from cpal_ray.cpal.loss import (cpal_step, pacam_from_prototypes, prototype_aware_cam_from_outputs, self_loss,
                                total_loss)

__all__ = [
    "Context", "PrototypeBank", "background_map", "centered_embedding", "classification_loss", "context_valid_mask",
    "cpal_step", "faiss_device",
    "feature_alignment", "instance_prototypes", "kmeans", "kmeans_inertia", "neighbour_weights",
    "normalized_cams", "pacam_from_prototypes", "positiveness_logits", "prototype_aware_cam",
    "prototype_aware_cam_from_outputs", "select_neighbours", "self_loss", "total_loss", "with_background",
]
