"""DPO Studio's ML library: model loading, paired generation, DPO losses and trainer.

Knows nothing of the database or the UI.
"""
