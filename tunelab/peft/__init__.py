"""Parameter-efficient fine-tuning methods (LoRA, adapters, soft prompts, IA3, BitFit)."""
