"""mmrank: a multimodal CTR ranker (SCL item encoder, SimTier, MAKE) in production on Kubernetes.

The parts are subpackages: `mmrank.encoders` (phase 1 and the embedder), `mmrank.predictors`
(phase 2 and serving) and `mmrank.operator` (the Kubernetes operator). Modules directly under
`mmrank` are the small common package the parts share: the API models, the store, the shop data.
"""

__version__ = "0.1.0"
