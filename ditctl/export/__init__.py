"""`ditctl export`: turn a training checkpoint into something other tools load.

- plan.py         which checkpoint, which kind (merged / full / lora), where; early refusals
- merge.py        fold LoRA adapters into the base weights (fp32)
- lora_formats.py PEFT folder and single-file comfy layouts, and the key mapping between them
- parity.py       reload the export from disk and compare its output with the run's
- model_card.py   README.md: base model, data, config, metrics, samples, licence, usage
- exporter.py     `export_checkpoint`, which runs the above in order, atomically
"""

from .exporter import ExportResult, export_checkpoint
from .plan import ExportPlan, plan_export

__all__ = ["ExportPlan", "ExportResult", "export_checkpoint", "plan_export"]
