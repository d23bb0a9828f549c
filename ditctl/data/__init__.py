"""Training data: sources (CSV / folder), safe image decoding, the manifest, buckets, transforms.

Importing this package stays cheap (no torch): ingest worker processes import
`ditctl.data.images` and nothing heavier.
"""
