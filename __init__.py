"""sparse-embed: a bucket of images -> sparse-attention embeddings (Delta Lake) -> a sharded
FAISS index, on Ray.

The repository's top-level folders install as this one namespace (pyproject.toml maps
them): `sparse_embed.pipeline` (the Ray jobs: embed/, index/, store/, view/),
`sparse_embed.encoders` (models registered in timm), `sparse_embed.jobs` (the CLI) and
`sparse_embed.infra` (local object store, Ray launcher). Importing this package imports
nothing heavy; each module imports torch, ray, faiss or pyarrow where it needs them.
"""
__version__ = "0.1.0"
