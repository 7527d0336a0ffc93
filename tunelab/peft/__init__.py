"""Parameter-efficient fine-tuning: train a small part of a frozen pretrained model.

    lora       LoRALinear, apply_lora / merge_lora / unmerge_lora / unload_lora, rsLoRA, DoRA, named adapters,
               save_adapter / load_adapter in Hugging Face peft's files
    adapters   bottleneck adapters, Houlsby (after attention and feed-forward) or Pfeiffer (feed-forward only)
    prompt     prompt tuning (learned input vectors) and prefix tuning (learned keys and values per layer)
    ia3        learned scaling of keys, values and the feed-forward input
    selective  freeze, BitFit, the last k layers, count_parameters
    inject     what they share: finding target modules by name, swapping them, trained copies of new heads
    saving     peft's on-disk layout (adapter_config.json + adapter_model.safetensors)

Each method is checked against peft where peft has it (tests/peft).
"""
