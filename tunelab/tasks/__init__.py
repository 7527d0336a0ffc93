"""End-to-end jobs that combine core, peft and quant."""
