"""Models and the pieces they are built from. Imports nothing from peft, quant or tasks."""
