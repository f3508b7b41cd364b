"""DPO Studio's Gradio app and CLI: wires storage and dpo_core together."""
