"""`ditctl eval`: how well checkpoints do, compared with the base model.

- inputs.py    the validation rows (val split, or the held-out slice of training) and their
               inputs (from the precompute cache, else the encoders)
- metrics.py   the interface of image metrics, and their plug-ins (entry-point group
               `ditctl.image_metrics`; the demo's concept score is one)
- clip.py      the built-in CLIP score
- evaluate.py  `plan_eval` / `run_eval`: which models; validation loss, comparison images and
               image scores for each
- report.py    metrics.json, report.html, charts and tensorboard scalars; `--compare`

The validation loss itself is `ditctl.engine.validation` (evaluation during training uses it too).
"""
