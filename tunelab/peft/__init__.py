"""Parameter-efficient fine-tuning: train a small part of a frozen pretrained model.

    lora       LoRALinear, apply_lora / merge_lora / unmerge_lora / unload_lora, rsLoRA, DoRA, named adapters
    adapters   bottleneck adapters, Houlsby (after attention and feed-forward) or Pfeiffer (feed-forward only)
    prompt     prompt tuning (learned input vectors) and prefix tuning (learned keys and values per layer)
    ia3        learned scaling of keys, values and the feed-forward input
    selective  freeze, BitFit, the last k layers, count_parameters
    qlora      LoRA on a frozen NF4 base with double-quantized constants (the one module that imports quant)
    inject     what they share: finding target modules by name, swapping them, trained copies of new heads
    saving     the adapter folder (adapter_config.json + adapter_model.safetensors) in peft's layout

Every method module has the same verbs: `apply_*` adapts a model, and `save_adapter(model, folder)` /
`load_adapter(model, folder)` write and read what it trained: in peft's files where peft has the method (LoRA,
DoRA, IA3, prompt and prefix tuning), so that each library reads the other's adapters; as our own tensor names
otherwise (bottleneck adapters, BitFit, last layers). Each method is checked against peft where peft has it
(tests/peft).
"""
