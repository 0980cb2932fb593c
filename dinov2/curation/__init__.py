"""Data curation: an uncurated image pool -> a curated FileList for pretraining (the DINOv2 LVD-142M recipe).

Stages, each its own module and command (``python -m dinov2.curation STAGE``):
:mod:`~dinov2.curation.embed` (embeddings in chunks on disk, :mod:`~dinov2.curation.store`),
:mod:`~dinov2.curation.dedup` (copies inside the pool and of evaluation sets),
:mod:`~dinov2.curation.clustering` (hierarchical spherical k-means, balanced sampling),
:mod:`~dinov2.curation.retrieve` (nearest neighbours or cluster members of seed images);
:mod:`~dinov2.curation.pipeline` chains them. faiss is imported only when a stage needs it.
"""
